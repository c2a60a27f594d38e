"""Issue 14.2: a blow-up never leaves a "last good checkpoint" that is not good; divergence counts as bad."""

from __future__ import annotations

import math

import pytest
import torch

from baichuan2.cli import main as cli
from baichuan2.train.engine import BadStepGuard, DivergenceArgs
from tests.train.conftest import run_args, shard_dir  # noqa: F401  (fixture)


def test_lr_1e30_names_no_destroyed_checkpoint_and_resume_cannot_pick_one(shard_dir, tmp_path):  # noqa: F811
    out = tmp_path / "boom"
    with pytest.raises(SystemExit) as err:
        cli(run_args(shard_dir, out, steps=20, extra=["--optim.lr", "1e30", "--checkpoint.save_every", "1",
                                                      "--train.max_bad_steps", "3"]))
    message = str(err.value)
    assert "Last good checkpoint: none" in message, message  # step 1 applied the destroying update
    from baichuan2.train.checkpoint import checkpoint_dirs

    assert checkpoint_dirs(out) == []  # what was written during the blow-up cannot be resumed from
    assert all(p.name.endswith(".diverged") for p in (out / "checkpoints").iterdir() if not p.name.endswith(".tmp"))


def test_good_checkpoint_is_one_whose_weights_gave_a_healthy_loss(shard_dir, tmp_path, monkeypatch):  # noqa: F811
    """Healthy for 4 steps, then the forward pass returns NaN: the named checkpoint resumes with a finite loss."""
    from baichuan2.model import model as model_module
    from baichuan2.model.checkpoint import load_pretrained  # noqa: F401
    from baichuan2.train.checkpoint import checkpoint_dirs

    real_forward = model_module.Baichuan.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if out.loss is not None and calls["n"] > 8:  # two micro-batches a step: steps 5+ are poisoned
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model_module.Baichuan, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match=r"Last good checkpoint: .*step-00000003"):
        cli(run_args(shard_dir, out, steps=20, extra=["--checkpoint.save_every", "1", "--train.max_bad_steps", "2",
                                                      "--checkpoint.keep_last", "5"]))
    # step 4 saved the weights that step 5 used; nothing it named or kept comes after step 3
    assert [d.name for d in checkpoint_dirs(out)][-1] == "step-00000003"


def test_finite_spikes_are_skipped_as_divergence(shard_dir, tmp_path, monkeypatch):  # noqa: F811
    from baichuan2.model import model as model_module
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.utils.metrics import read_metrics

    real_forward = model_module.Baichuan.forward
    calls = {"n": 0}

    def spiking(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if out.loss is not None and 13 <= calls["n"] <= 16:  # steps 7-8: a finite blow-up (x1000)
            out.loss = out.loss * 1000.0
            out.ce_loss = out.ce_loss * 1000.0
        return out

    monkeypatch.setattr(model_module.Baichuan, "forward", spiking)
    out = tmp_path / "spike"
    cli(run_args(shard_dir, out, steps=10, extra=["--train.divergence.min_history", "4"]))
    recs = read_metrics(out / "metrics.jsonl")
    skipped = [r["step"] for r in recs if r.get("event") == "skipped_divergence"]
    assert skipped == [7, 8]
    model = load_pretrained(out / "release" / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_guard_rules():
    g = BadStepGuard(DivergenceArgs(loss_sigmas=6, loss_ratio=1.5, grad_ratio=50, window=8, min_history=4),
                     max_bad=3)
    assert g.verdict(float("nan"), 1.0) and g.verdict(1.0, math.inf) and g.verdict(1.0, 1.0, non_finite=True)
    for loss in (3.0, 2.9, 2.8, 2.85):
        assert g.verdict(loss, 1.0) is None  # too little history: only non-finite counts
        g.record(loss, 1.0, bad=False)
    assert g.verdict(2.7, 1.2) is None
    assert "loss" in g.verdict(30.0, 1.0)
    assert "gradient norm" in g.verdict(2.8, 100.0)
    g.record(30.0, 1.0, bad=True)
    assert g.streak == 1 and len(g.losses) == 4  # a bad step does not enter the statistics
