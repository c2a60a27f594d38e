"""The serving engine, the OpenAI-compatible HTTP server (through the official `openai` client) and the chat CLI."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from baichuan2.model.generate import generate
from baichuan2.utils.io import InputError
from tests.serve.conftest import CONTEXT

CHINESE = [{"role": "user", "content": "你好，今天天气怎么样？"}]


def test_stream_pieces_join_to_the_greedy_completion(engine):
    cfg = engine.sampling(temperature=0, max_new_tokens=40)
    ids = engine.chat_prompt(CHINESE, cfg.max_new_tokens)
    expected_ids = generate(engine.model, [ids], cfg)[0]
    expected_ids = expected_ids[: expected_ids.index(2)] if 2 in expected_ids else expected_ids
    pieces = list(engine.stream(ids, cfg))
    text = "".join(p.text for p in pieces)
    assert text == engine.tok.decode(expected_ids)
    # Partial UTF-8 sequences are held back: no piece shows a replacement character the final text lacks.
    if "\ufffd" not in text:
        assert all("\ufffd" not in p.text for p in pieces)
    last = pieces[-1]
    assert last.finish_reason in ("stop", "length") and last.prompt_tokens == len(ids)
    assert last.completion_tokens == len(expected_ids)
    assert engine.complete(ids, cfg).text == text


def test_stop_strings_cut_the_text(engine):
    cfg = engine.sampling(temperature=0, max_new_tokens=40)
    ids = engine.text_prompt("Hello", cfg.max_new_tokens)
    full = engine.complete(ids, cfg).text
    assert len(full) > 4
    stop = full[2:4]
    cut = engine.complete(ids, cfg, [stop])
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_prompt_errors(engine):
    with pytest.raises(InputError, match="last message"):
        engine.chat_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 8)
    with pytest.raises(InputError, match="role"):
        engine.chat_prompt([{"role": "bot", "content": "a"}], 8)
    with pytest.raises(InputError, match="context"):
        engine.text_prompt("word " * CONTEXT, 8)
    with pytest.raises(InputError, match="context"):
        engine.chat_prompt(CHINESE, CONTEXT)
    with pytest.raises(ValueError):
        engine.sampling(top_p=1.5)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    url, key = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_chat_stream_equals_non_stream(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    kw = dict(model="tiny", messages=CHINESE, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 24 and full.usage.total_tokens > full.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_client_completions_and_stop(client):
    full = client.completions.create(model="tiny", prompt="Hello there", temperature=0, max_tokens=20)
    text = full.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello there", temperature=0, max_tokens=20, stream=True))
    assert streamed == text
    if len(text) > 3:
        cut = client.completions.create(model="tiny", prompt="Hello there", temperature=0, max_tokens=20,
                                        stop=[text[1:3]])
        assert cut.choices[0].text == text[: text.index(text[1:3])] and cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", messages=CHINESE, temperature=1.0, top_p=1.0, max_tokens=16, seed=7,
              extra_body={"top_k": 0})
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_bad_requests_get_openai_errors(client, server):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="gpt-4", messages=CHINESE)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "bot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * CONTEXT, max_tokens=8)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.UnprocessableEntityError, match="top_p"):
        client.chat.completions.create(model="tiny", messages=CHINESE, top_p=2.0)
    url, key = server
    bad_key = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    # Not JSON at all, and JSON of the wrong shape: 422 with the OpenAI error body, never a 500.
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 422 and "message" in r.json()["error"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": "hi"},
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # health needs no key


def test_concurrent_requests_all_complete_identically(client):
    def ask(_):
        return client.chat.completions.create(model="tiny", messages=CHINESE, temperature=0,
                                              max_tokens=8).choices[0].message.content

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    assert len(set(answers)) == 1


def test_chat_cli_streams_keeps_history_and_clears(checkpoint):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "baichuan2.cli", "chat", str(checkpoint), "--greedy", "true",
                                           "--max_new_tokens", "6"], encoding="utf-8", timeout=120)
    child.expect("User: ")
    child.sendline("你好")
    child.expect("Baichuan 2: ")
    child.expect("User: ")
    child.sendline("clear")
    child.expect("conversation cleared")
    child.expect("User: ")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_completion_prompts_follow_the_tokenizer_bos_setting(checkpoint):
    """/v1/completions encodes like the checkpoint's tokenizer: Baichuan 2's add_bos_token is false, so the
    prompt is tokenizer(prompt) alone; with add_bos_token true it starts with BOS."""
    from baichuan2.serve.engine import Engine

    engine = Engine(str(checkpoint), max_seqs=1)
    try:
        plain = engine.tok.encode("Hello there")
        engine.tok.add_bos_token = False
        assert engine.text_prompt("Hello there", 8) == plain
        engine.tok.add_bos_token = True
        assert engine.text_prompt("Hello there", 8) == [engine.tok.bos_id] + plain
        assert engine.text_prompt("", 8) == [engine.tok.bos_id]
    finally:
        engine.close()
