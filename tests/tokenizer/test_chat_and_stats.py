"""Chat formatting (official semantics) and compression statistics."""

from __future__ import annotations

import json

import pytest

from baichuan2.tokenizer import Tokenizer, build_chat_input, decode_chat, encode_chat
from baichuan2.tokenizer.stats import compression_stats, language
from baichuan2.utils.io import InputError


@pytest.fixture(scope="module")
def tok(real_tokenizer_dir):
    return Tokenizer.from_pretrained(real_tokenizer_dir)


def test_build_chat_input_matches_official_layout(tok):
    msgs = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"}]
    ids = build_chat_input(tok, msgs)
    e = tok.encode
    assert ids == e("你是助手") + [195] + e("你好") + [196] + e("你好！") + [195] + e("再见") + [196]
    assert decode_chat(tok, ids)[:4] == msgs


def test_history_truncation_keeps_newest_round(tok):
    msgs = []
    for i in range(30):
        msgs += [{"role": "user", "content": f"问题{i} " * 20}, {"role": "assistant", "content": f"回答{i} " * 20}]
    msgs.append({"role": "user", "content": "最后的问题"})
    ids = build_chat_input(tok, msgs, max_new_tokens=100, model_max_length=400)
    assert len(ids) <= 300 and ids[-1] == 196
    assert ids[-1 - len(tok.encode("最后的问题")) - 1:] == [195] + tok.encode("最后的问题") + [196]
    huge = [{"role": "user", "content": "长" * 1000}]
    assert len(build_chat_input(tok, huge, max_new_tokens=100, model_max_length=400)) == 300


def test_encode_chat_loss_mask_is_exactly_assistant_spans(tok):
    msgs = [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "再加1"}, {"role": "assistant", "content": "3"}]
    ids, targets = encode_chat(tok, msgs)
    assert len(ids) == len(targets) and ids[-1] == tok.eos_id
    learned = [(ids[i], t) for i, t in enumerate(targets) if t != -100]
    two, three = tok.encode("2"), tok.encode("3")
    # after [196] the answer, after the answer's last token EOS -- nothing else
    assert [t for _, t in learned] == two + [tok.eos_id] + three + [tok.eos_id]
    assert learned[0][0] == 196 and learned[len(two) + 1][0] == 196


def test_bad_messages(tok):
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user"}],
                [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]):
        with pytest.raises(InputError):
            build_chat_input(tok, bad)


def test_compression_stats_by_hand(tok, tmp_path):
    docs = [{"text": "你好，世界。今天天气很好。", "source": "zh"}, {"text": "Hello world, nice weather.", "source": "en"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    stats = compression_stats([str(tok.model_file)], [str(path)])
    (name,) = stats
    zh = stats[name]["lang:zh"]
    assert zh["tokens"] == len(tok.encode(docs[0]["text"])) and zh["chars"] == len(docs[0]["text"])
    assert zh["tokens_per_char"] == pytest.approx(zh["tokens"] / zh["chars"])
    total = stats[name]["all"]
    assert total["bytes"] == sum(len(d["text"].encode()) for d in docs)
    assert language("数据处理 pipeline") == "zh" and language("plain English") == "en"
