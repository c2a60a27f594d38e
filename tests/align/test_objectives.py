"""SFT and the reward model on the training engine: the same loss curves as the loops they replaced
(fp32, one process), bf16 autocast, the bad-step policy, and exact resume of a killed run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from baichuan2.align.sft import SFTArgs, _batch, sft, sft_optim, split_holdout
from baichuan2.model.checkpoint import load_pretrained
from baichuan2.tokenizer import Tokenizer
from baichuan2.tokenizer.chat import encode_chat
from baichuan2.train.engine import FitArgs
from baichuan2.train.optim import OptimArgs, lr_at, set_lr
from baichuan2.utils.metrics import read_metrics
from tests.align.conftest import synthetic_pairs
from tests.serve.conftest import checkpoint  # noqa: F401

CONVS = [[{"role": "user", "content": f"what is {i} plus one?"}, {"role": "assistant", "content": f"{i + 1}. 好的！"}]
         for i in range(30)]


def old_sft_losses(model, tok, convs, batch_size, epochs, lr, seed=0, val_fraction=0.1, max_length=512):
    """The stand-alone SFT loop as it was before the engine (commit b99cb17), frozen here as the reference."""
    rows = [encode_chat(tok, m, min(max_length, model.config.max_position_embeddings)) for m in convs]
    rows = [r for r in rows if any(t != -100 for t in r[1])]
    train, _ = split_holdout(rows, val_fraction, seed)
    steps = max(1, math.ceil(len(train) / batch_size) * epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = OptimArgs(lr=lr, min_lr_ratio=0.1, warmup_steps=max(1, int(0.03 * steps)))
    rng, step, losses = random.Random(seed + 1), 0, []
    model.train()
    for _ in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for k in range(0, len(order), batch_size):
            b = _batch([train[i] for i in order[k: k + batch_size]], model.config.pad_token_id or 0)
            set_lr(opt, lr_at(step, schedule, steps))
            res = model(b["input_ids"], b["targets"], attention_mask=b["attention_mask"], return_logits=False)
            res.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(res.ce_loss))
    return losses


def new_losses(logs):
    return [r["loss"] for r in read_metrics(logs / "metrics.jsonl") if "event" not in r and "loss" in r]


@pytest.mark.parametrize("micro", [0, 3])
def test_sft_on_the_engine_matches_the_old_loop(checkpoint, tmp_path, micro):  # noqa: F811
    tok = Tokenizer.from_pretrained(checkpoint)
    expected = old_sft_losses(load_pretrained(checkpoint), tok, CONVS, batch_size=8, epochs=2, lr=3e-3)
    sft(load_pretrained(checkpoint), tok, CONVS, tmp_path / "out", SFTArgs(epochs=2, batch_size=8, val_fraction=0.1),
        progress=False, optim=sft_optim(lr=3e-3), fit_args=FitArgs(precision="fp32", micro_batch_size=micro))
    got = new_losses(tmp_path / "out-logs")
    assert len(got) == len(expected) == 8
    # micro-batches of 3 conversations, weighted by assistant tokens, give the same mean loss
    assert got == pytest.approx(expected, abs=2e-5)


def old_rm_losses(rm, train, batch_size, epochs, lr, seed=0):
    from baichuan2.align.reward import pairwise_loss
    from baichuan2.eval.scoring import right_pad

    params = [p for p in rm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = max(1, math.ceil(len(train) / batch_size) * epochs)
    schedule = OptimArgs(lr=lr, min_lr_ratio=0.1, warmup_steps=max(1, int(0.03 * steps)))
    rng, step, losses = random.Random(seed + 1), 0, []
    rm.train()
    for _ in range(epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for k in range(0, len(order), batch_size):
            batch = [train[i] for i in order[k: k + batch_size]]
            ids, mask = right_pad([p.chosen for p in batch] + [p.rejected for p in batch], 0)
            scores = rm(ids, mask)
            loss = pairwise_loss(scores[: len(batch)], scores[len(batch):])
            set_lr(opt, lr_at(step, schedule, steps))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss))
    return losses


def _rm_data(checkpoint):  # noqa: F811
    from baichuan2.align.preference import to_pair
    from baichuan2.align.reward import encode_pairs
    from baichuan2.align.taxonomy import Taxonomy

    tok = Tokenizer.from_pretrained(checkpoint)
    pairs = encode_pairs(tok, [to_pair(r) for r in synthetic_pairs(24)], 128, Taxonomy.load())
    return tok, *split_holdout(pairs, 0.25, 0)


def test_reward_model_on_the_engine_matches_the_old_loop(checkpoint, tmp_path):  # noqa: F811
    from baichuan2.align.reward import RewardModel, RMArgs, rm_optim, train_reward_model

    tok, train, val = _rm_data(checkpoint)
    torch.manual_seed(0)
    expected = old_rm_losses(RewardModel(load_pretrained(checkpoint)), train, batch_size=6, epochs=2, lr=2e-3)
    torch.manual_seed(0)
    train_reward_model(RewardModel(load_pretrained(checkpoint)), tok, train, val, tmp_path / "rm",
                       RMArgs(max_length=128, epochs=2, batch_size=6), progress=False, optim=rm_optim(lr=2e-3),
                       fit_args=FitArgs(precision="fp32", micro_batch_size=4))
    got = new_losses(tmp_path / "rm-logs")
    assert len(got) == len(expected) == 6
    assert got == pytest.approx(expected, abs=2e-5)


def test_sft_honours_bf16_and_the_bad_step_policy(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    from baichuan2.model import model as model_module
    from baichuan2.train.engine import TrainingError

    tok = Tokenizer.from_pretrained(checkpoint)
    seen = []
    real_forward = model_module.Baichuan.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(model_module.Baichuan, "forward", spy)
    sft(load_pretrained(checkpoint), tok, CONVS[:12], tmp_path / "bf16", SFTArgs(batch_size=4, val_fraction=0.2),
        progress=False, optim=sft_optim(lr=1e-3), fit_args=FitArgs(precision="bf16"))
    assert torch.bfloat16 in seen

    def nan(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if out.loss is not None and self.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model_module.Baichuan, "forward", nan)
    with pytest.raises(TrainingError, match="2 consecutive non-finite"):
        sft(load_pretrained(checkpoint), tok, CONVS[:12], tmp_path / "nan", SFTArgs(batch_size=2, val_fraction=0.2),
            progress=False, fit_args=FitArgs(precision="fp32", max_bad_steps=2))
    assert not (tmp_path / "nan" / "config.json").exists()
    assert [r["event"] for r in read_metrics(tmp_path / "nan-logs" / "metrics.jsonl") if "event" in r] == \
        ["skipped_non_finite"] * 2
    json.dumps({})


def test_an_interrupted_sft_run_resumes_to_the_same_final_weights(checkpoint, tmp_path):  # noqa: F811
    """Stopped after 3 of 8 steps (its checkpoint is all a killed run leaves), then resumed: the final weights and
    the loss curve equal an uninterrupted run's exactly."""
    tok = Tokenizer.from_pretrained(checkpoint)
    args = SFTArgs(epochs=2, batch_size=8, val_fraction=0.1)

    def run(out, stop_after=0, resume=False):
        return sft(load_pretrained(checkpoint), tok, CONVS, out, args, progress=False, optim=sft_optim(lr=3e-3),
                   fit_args=FitArgs(precision="fp32", stop_after=stop_after), resume=resume)

    run(tmp_path / "whole")
    first = run(tmp_path / "cut", stop_after=3)
    assert first.get("stopped_early") and not (tmp_path / "cut" / "config.json").exists()
    run(tmp_path / "cut", resume=True)  # continues from the step-3 checkpoint
    assert new_losses(tmp_path / "cut-logs") == new_losses(tmp_path / "whole-logs")
    a, b = load_pretrained(tmp_path / "whole"), load_pretrained(tmp_path / "cut")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
