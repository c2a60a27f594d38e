"""Llama-family weights through the system: exact GQA / tied-embedding conversion with a plain head,
self-verification, config round-trip, and generate / chat / serve on the converted checkpoint.

The model is a tiny Llama built offline with transformers (tests/tiny_llama.py: GQA, tied embeddings,
byte-level BPE tokenizer.json, ChatML template, list eos); the real SmolLM2 check is
benchmarks/real_weights.py."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import baichuan2  # noqa: F401  (registers model_type "baichuan")
from baichuan2.cli import main as cli
from baichuan2.model import convert
from baichuan2.model.checkpoint import CheckpointError, config_from_hf, config_to_hf, load_pretrained
from baichuan2.model.config import ModelConfig
from baichuan2.model.generate import SamplingConfig, generate
from baichuan2.tokenizer import Tokenizer
from baichuan2.tokenizer.chat import build_chat_input
from tests.tiny_llama import build_tiny_llama

transformers = pytest.importorskip("transformers")
PROMPTS = ["Hello, how are you today?", "def add(a, b):", "café 北京 🙂", "The quick brown fox"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="module")
def converted(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "bc"
    cli(["convert", "from-llama", str(llama_dir), str(out)])
    return out


@pytest.fixture(scope="module")
def reference(llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@torch.no_grad()
def test_gqa_tied_llama_converts_exactly(converted, reference):
    data = json.loads((converted / "config.json").read_text())
    assert data["norm_head"] is False and data["tokenizer_class"] != "BaichuanTokenizer"
    model = load_pretrained(converted).eval()
    assert model.lm_head.normalize is False
    tok = Tokenizer.from_pretrained(converted)
    for text in PROMPTS:
        ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
        assert (model(ids).logits - reference(ids).logits).abs().max().item() < 1e-5
    # left padding: the padded row equals the unpadded one in transformers
    ids = torch.tensor([[2, 2, 2] + tok.encode("Hello there friend")])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ours = model(ids, attention_mask=mask).logits[0, 3:]
    assert (ours - reference(ids[:, 3:]).logits[0]).abs().max().item() < 1e-5


@torch.no_grad()
def test_greedy_generation_matches_transformers(converted, reference):
    model = load_pretrained(converted).eval()
    tok = Tokenizer.from_pretrained(converted)
    cfg = SamplingConfig.from_generation_config(converted, max_new_tokens=24)  # greedy, eos [2, 0]
    for text in PROMPTS[:2]:
        ids = [tok.bos_id] + tok.encode(text)
        ours = generate(model, [ids], cfg, include_stop=True)[0]
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        assert ours == theirs[:len(ours)] and (len(ours) == 24 or ours[-1] in (2, 0))


def test_generation_config_and_chat_template_are_carried(llama_dir, converted):
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]  # the source's list, not Baichuan-Chat defaults
    assert "temperature" not in gen
    assert SamplingConfig.from_generation_config(converted).stop_token_ids == [2, 0]
    assert not SamplingConfig.from_generation_config(converted).do_sample  # HF: no do_sample = greedy
    assert Tokenizer.from_pretrained(converted).chat_template == Tokenizer.from_pretrained(llama_dir).chat_template


def test_norm_head_flag_round_trips_and_auto_class_agrees(converted):
    cfg = ModelConfig.from_name("tiny-rope", norm_head=False)
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))).norm_head is False
    assert config_from_hf({k: v for k, v in config_to_hf(cfg).items() if k != "norm_head"}).norm_head is True
    with pytest.raises(ValueError, match="norm_head"):
        ModelConfig.from_name("tiny-rope", norm_head="no")
    hf = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ours = load_pretrained(converted).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() < 1e-6


def test_repeated_kv_heads_order():
    k = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2 * 3, 5)  # 2 kv heads of dim 3
    out = convert.repeat_kv_heads(k, num_heads=4, num_kv_heads=2)
    assert torch.equal(out[0:3], k[0:3]) and torch.equal(out[3:6], k[0:3]) and torch.equal(out[6:9], k[3:6])


def test_conversion_that_does_not_match_is_refused_and_nothing_written(llama_dir, tmp_path, monkeypatch):
    # a wrong head grouping (tiled instead of interleaved) must be caught by the self-check
    monkeypatch.setattr(convert, "repeat_kv_heads",
                        lambda w, num_heads, num_kv_heads: w.repeat(num_heads // num_kv_heads, 1))
    with pytest.raises(CheckpointError, match="differ"):
        convert.from_llama(str(llama_dir), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []


def test_unsupported_llama_variants_get_one_clear_error(llama_dir, converted, tmp_path):
    with pytest.raises(CheckpointError, match="already exists"):
        convert.from_llama(str(llama_dir), str(converted))
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        convert.from_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    data = json.loads((llama_dir / "config.json").read_text())
    for change, message in (({"attention_bias": True}, "biases"), ({"num_key_value_heads": 3}, "groups"),
                            ({"hidden_act": "gelu"}, "hidden_act"), ({"model_type": "gpt2"}, "Llama"),
                            ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling")):
        with pytest.raises(CheckpointError, match=message):
            convert.llama_model_config({**data, **change}, "x")


def test_generate_cli_on_converted_model(converted, capsys):
    cli(["generate", str(converted), "Hello", "--greedy", "true", "--max_new_tokens", "8"])
    assert capsys.readouterr().out.startswith("Hello")


def test_chat_uses_the_checkpoint_template(converted):
    tok = Tokenizer.from_pretrained(converted)
    hf_tok = transformers.AutoTokenizer.from_pretrained(converted)
    messages = [{"role": "user", "content": "Hi"}]
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(build_chat_input(tok, messages, 8, 256)) == expected


def test_chat_cli_on_converted_model(converted):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "baichuan2.cli", "chat", str(converted), "--greedy", "true",
                                           "--max_new_tokens", "6"], encoding="utf-8", timeout=120)
    child.expect("User: ")
    child.sendline("Hello, how are you?")
    child.expect("Baichuan 2: ")
    child.expect("User: ")
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_serve_both_endpoints_on_converted_model(converted):
    openai = pytest.importorskip("openai")
    from baichuan2.serve.engine import Engine
    from baichuan2.serve.server import create_app
    from tests.serve.conftest import running_server

    engine = Engine(str(converted))
    assert engine.defaults.stop_token_ids == [2, 0]
    with running_server(create_app(engine, "tiny-llama")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Hello, how are you?"}]
        chat = client.chat.completions.create(model="tiny-llama", messages=messages, temperature=0, max_tokens=8)
        tok = Tokenizer.from_pretrained(converted)
        prompt = build_chat_input(tok, messages, 8, engine.max_length)
        expected = generate(engine.model, [prompt], SamplingConfig(max_new_tokens=8, do_sample=False,
                                                                   stop_token_ids=[2, 0]))[0]
        assert chat.choices[0].message.content == tok.decode(expected)
        assert chat.usage.prompt_tokens == len(prompt)
        text = client.completions.create(model="tiny-llama", prompt="Hello", temperature=0, max_tokens=8)
        assert text.usage.completion_tokens <= 8 and isinstance(text.choices[0].text, str)


@torch.no_grad()
def test_gqa_weights_keep_one_kv_head_per_group_and_decode_as_transformers(llama_dir, converted, reference):
    """The converted W_pack repeats each key/value head over its group; the serving cache stores each group's
    head once, and batched greedy decoding still follows transformers token for token."""
    from baichuan2.model.generate import Batcher, Request
    from baichuan2.model.model import kv_head_groups

    kv_heads = json.loads((llama_dir / "config.json").read_text())["num_key_value_heads"]
    model = load_pretrained(converted).eval()
    heads = model.config.num_attention_heads
    assert heads // kv_heads > 1 and kv_head_groups(model) == heads // kv_heads
    batcher = Batcher(model, max_seqs=3, prefill_chunk=5)
    assert batcher.cache.keys[0].shape[1] == kv_heads  # [slots, kv heads, positions, head_dim]
    tok = Tokenizer.from_pretrained(converted)
    prompts = [[tok.bos_id] + tok.encode(t) for t in PROMPTS]
    reqs = [Request(p, SamplingConfig(max_new_tokens=n, do_sample=False, stop_token_ids=[]))
            for p, n in zip(prompts, (12, 5, 9, 12))]
    for r in reqs:
        batcher.add(r)
    while batcher.has_work:
        batcher.step()
    for prompt, req in zip(prompts, reqs):
        ids, theirs = list(prompt), []
        for _ in range(len(req.tokens)):  # transformers, whole sequence recomputed each step
            theirs.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(theirs[-1])
        assert req.tokens == theirs
