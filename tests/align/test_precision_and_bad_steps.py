"""The reward model and DPO on the engine honour bf16 autocast (fp32 master weights) and its one bad-step
policy: a non-finite step is skipped, N in a row stop the run with a clear message naming the last good
checkpoint (what SFT's test in test_objectives.py checks for SFT)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from baichuan2.align.preference import to_pair
from baichuan2.model.checkpoint import load_pretrained
from baichuan2.tokenizer import Tokenizer
from baichuan2.train.engine import CheckpointArgs, FitArgs, TrainingError
from baichuan2.utils.metrics import read_metrics
from tests.align.conftest import synthetic_pairs
from tests.serve.conftest import checkpoint  # noqa: F401  (session fixture)

TRAIN_PAIRS, BATCH = 16, 4  # four optimiser steps


class _LossForwards:
    """A forward hook on the first decoder layer's fused QKV projection: records the dtype each training
    forward computed in, and makes the outputs of the training forwards numbered in ``poison`` (0-based, one
    forward per optimiser step here) NaN — a blow-up inside the model, as the engine would meet one."""

    def __init__(self, poison=()):
        self.dtypes, self.poison = [], set(poison)

    def __call__(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return None  # reference log-probs, held-out evaluation, scoring
        k = len(self.dtypes)
        self.dtypes.append(output.dtype)
        return output * float("nan") if k in self.poison else None

    def attach(self, model):
        """Hook ``model`` (a Baichuan LM; the hook lives on this instance only) and return it."""
        model.model.layers[0].self_attn.W_pack.register_forward_hook(self)
        return model


def _train(kind: str, ckpt, out, fit_args: FitArgs, spy: _LossForwards, save_every: int = 0):
    """Train a fresh RM or DPO model (``spy`` attached) on synthetic pairs; returns (the model, the run's result)."""
    tok = Tokenizer.from_pretrained(ckpt)
    pairs = [to_pair(r) for r in synthetic_pairs(TRAIN_PAIRS + 4)]
    every = CheckpointArgs(save_every=save_every, keep_last=4)
    torch.manual_seed(0)
    if kind == "rm":
        from baichuan2.align.reward import RewardModel, RMArgs, encode_pairs, rm_optim, train_reward_model
        from baichuan2.align.taxonomy import Taxonomy

        encoded = encode_pairs(tok, pairs, 128, Taxonomy.load())
        model = RewardModel(spy.attach(load_pretrained(ckpt)))
        result = train_reward_model(model, tok, encoded[:TRAIN_PAIRS], encoded[TRAIN_PAIRS:], out,
                                    RMArgs(max_length=128, epochs=1, batch_size=BATCH), progress=False,
                                    optim=rm_optim(lr=2e-3), fit_args=fit_args, checkpoint=every)
    else:
        from baichuan2.align.dpo import DPOArgs, dpo, dpo_optim

        model = spy.attach(load_pretrained(ckpt))
        result = dpo(model, tok, pairs[:TRAIN_PAIRS], out, DPOArgs(batch_size=BATCH, epochs=1, max_length=128),
                     progress=False, optim=dpo_optim(lr=1e-3), fit_args=fit_args, checkpoint=every,
                     val_pairs=pairs[TRAIN_PAIRS:])
    return model, result


def _losses(logs):
    return [r["loss"] for r in read_metrics(logs / "metrics.jsonl") if "event" not in r and "loss" in r]


def _events(logs):
    return [r["event"] for r in read_metrics(logs / "metrics.jsonl") if "event" in r]


@pytest.mark.parametrize("kind", ["rm", "dpo"])
def test_training_runs_under_bf16_autocast_with_fp32_master_weights(kind, checkpoint, tmp_path):  # noqa: F811
    spy = _LossForwards()
    model, result = _train(kind, checkpoint, tmp_path / kind, FitArgs(precision="bf16"), spy)
    steps = TRAIN_PAIRS // BATCH
    assert result["steps"] == steps
    assert spy.dtypes == [torch.bfloat16] * steps  # every loss forward computed in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights the optimiser updates
    losses = _losses(tmp_path / f"{kind}-logs")
    assert len(losses) == steps and all(math.isfinite(float(x)) for x in losses)

    spy = _LossForwards()  # and fp32 means fp32: the setting is what turns autocast on
    _train(kind, checkpoint, tmp_path / f"{kind}32", FitArgs(precision="fp32"), spy)
    assert spy.dtypes == [torch.float32] * steps


@pytest.mark.parametrize("kind", ["rm", "dpo"])
def test_a_non_finite_step_is_skipped_and_n_in_a_row_stop_at_the_last_good_checkpoint(kind, checkpoint, tmp_path):  # noqa: F811
    # one NaN step: skipped (nothing applied), the run carries on and saves its model
    model, result = _train(kind, checkpoint, tmp_path / "once", FitArgs(precision="fp32", max_bad_steps=2),
                           _LossForwards(poison={1}))
    assert result["steps"] == TRAIN_PAIRS // BATCH and not result.get("stopped_early")
    assert _events(tmp_path / "once-logs") == ["skipped_non_finite"]
    assert [math.isfinite(float(x)) for x in _losses(tmp_path / "once-logs")] == [True, False, True, True]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert (tmp_path / "once" / "config.json").exists()

    # NaN from the third step on, a checkpoint after every step, two bad steps allowed in a row
    with pytest.raises(TrainingError) as stop:
        _train(kind, checkpoint, tmp_path / "nan", FitArgs(precision="fp32", max_bad_steps=2),
               _LossForwards(poison={2, 3}), save_every=1)
    ckpts = tmp_path / "nan-logs" / "checkpoints"
    # step-2 holds the weights that produced the first NaN loss: it is set aside, step-1 is the good one
    good = ckpts / "step-00000001"
    assert str(stop.value) == (f"2 consecutive non-finite steps at step 4; stopping. Last good checkpoint: {good}. "
                               "Lower the LR, check the data, or resume with a different seed.")
    assert "\n" not in str(stop.value)
    assert (good / "trainer.json").exists() and (ckpts / "step-00000002.diverged").exists()
    assert not [d for d in ckpts.iterdir() if re.fullmatch(r"step-\d+", d.name) and d != good]
    assert _events(tmp_path / "nan-logs") == ["skipped_non_finite"] * 2
    assert not (tmp_path / "nan" / "config.json").exists()  # no model released from a failed run
