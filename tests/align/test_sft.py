"""SFT: formats, assistant-only loss, learning, LoRA merge, the saved chat checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from baichuan2.align.sft import LoraArgs, SFTArgs, read_conversations, sft, sft_optim, to_messages
from baichuan2.model.checkpoint import load_pretrained
from baichuan2.tokenizer import Tokenizer
from baichuan2.utils.io import InputError
from tests.serve.conftest import checkpoint  # noqa: F401


def test_formats_become_baichuan_messages(tmp_path):
    assert to_messages({"instruction": "翻译", "input": "hello", "output": "你好"}) == [
        {"role": "user", "content": "翻译\nhello"}, {"role": "assistant", "content": "你好"}]
    assert to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})[1] == {
        "role": "assistant", "content": "yo"}
    with pytest.raises(InputError, match="expected"):
        to_messages({"text": "x"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(InputError, match="bad.jsonl:2: invalid JSON"):
        list(read_conversations([str(bad)]))


CONVS = [[{"role": "user", "content": f"what is {i} plus one?"}, {"role": "assistant", "content": f"{i + 1}. 好的！"}]
         for i in range(40)]


@pytest.mark.parametrize("lora", [0, 4])
def test_sft_learns_the_assistant_turns_and_saves_a_chat_checkpoint(checkpoint, tmp_path, lora):  # noqa: F811
    model, tok = load_pretrained(checkpoint), Tokenizer.from_pretrained(checkpoint)
    user_row = model.model.embed_tokens.weight[tok.user_id].clone()
    args = SFTArgs(epochs=4, batch_size=8, val_fraction=0.1, lora=LoraArgs(r=lora, alpha=8, dropout=0.0))
    m = sft(model, tok, CONVS, tmp_path / "out", args, progress=False, optim=sft_optim(lr=3e-3 if lora == 0 else 1e-2))
    assert m["val_loss_after"] < m["val_loss_before"] - 0.5
    saved = load_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["top_k"] == 5
    assert not any("lora" in k for k in saved.state_dict())  # adapters merged into plain weights
    if lora:  # only the adapters trained: the embedding is untouched
        assert torch.equal(saved.model.embed_tokens.weight[tok.user_id], user_row)
    logs = [json.loads(x) for x in (tmp_path / "out-logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "val_loss" not in r]
    assert len(steps) == m["steps"] and all("loss" in r for r in steps)
    assert logs[-1]["val_loss"] == pytest.approx(m["val_loss_after"], abs=1e-5)  # the engine's held-out eval


def test_only_assistant_tokens_carry_loss(checkpoint, tmp_path):  # noqa: F811
    """Changing the user's words must not change which positions are trained (mask from encode_chat)."""
    from baichuan2.tokenizer.chat import encode_chat

    tok = Tokenizer.from_pretrained(checkpoint)
    ids, targets = encode_chat(tok, CONVS[0])
    trained = [t for t in targets if t != -100]
    assert tok.decode(trained[:-1]) == CONVS[0][1]["content"] and trained[-1] == tok.eos_id


def test_packing_keeps_conversations_apart(checkpoint, tmp_path):  # noqa: F811
    """Packed rows give exactly the per-conversation loss: no attention or loss crosses a boundary."""
    from baichuan2.align.sft import _batch, assistant_loss, pack_rows
    from baichuan2.tokenizer.chat import encode_chat
    from baichuan2.train.trainer import evaluate_loss

    model, tok = load_pretrained(checkpoint).eval(), Tokenizer.from_pretrained(checkpoint)
    rows = [encode_chat(tok, c) for c in CONVS[:12]]
    packed = pack_rows(rows, 64)
    assert len(packed) < len(rows) and all(len(ids) <= 64 for ids, _, _ in packed)
    assert sorted(len(a) for a, _ in rows) == sorted(
        n for _, _, seg in packed for n in [seg.count(k) for k in range(1, max(seg) + 1)])
    loose = assistant_loss(model, rows, pad=0)
    tight = evaluate_loss(model, _batch(packed, 0), 8, model.device)
    assert tight == pytest.approx(loose, abs=1e-5)
    m = sft(model, tok, CONVS, tmp_path / "packed", SFTArgs(epochs=1, batch_size=4, pack=True, max_length=96),
            progress=False, optim=sft_optim(lr=1e-3))
    assert m["train_rows"] < m["train_conversations"]


def test_lora_merge_equals_the_unmerged_adapter_model(checkpoint):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_pretrained(checkpoint).eval()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=LoraArgs().targets))
    with torch.no_grad():  # B starts at zero; give the adapters real weights so the merge matters
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.randint(3, 1000, (2, 24))
    unmerged = peft_model(ids).logits
    merged = peft_model.merge_and_unload()(ids).logits
    base = load_pretrained(checkpoint).eval()(ids).logits
    assert (unmerged - base).abs().max() > 1e-2  # the adapters change the output ...
    assert torch.allclose(merged, unmerged, atol=1e-5)  # ... and merging keeps exactly that output
