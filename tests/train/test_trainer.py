"""The training loop: learning, logging, released checkpoints, exact resume after SIGKILL, NaN handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from baichuan2.cli import main as cli
from baichuan2.model.checkpoint import load_pretrained
from baichuan2.utils.metrics import read_metrics
from tests.train.conftest import run_args


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r and "event" not in r}


def test_tiny_run_learns_logs_and_releases(shard_dir, tmp_path):
    out = tmp_path / "run"
    cli(run_args(shard_dir, out, steps=40, extra=["--checkpoint.release_every_tokens", "8192",
                                                 "--data.val_shards", str(shard_dir), "--train.eval_every", "20"]))
    recs = read_metrics(out / "metrics.jsonl")
    first, last = recs[0], [r for r in recs if "loss" in r][-1]
    for key in ("loss", "ce_loss", "z_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"):
        assert key in first, key
    assert last["loss"] < first["loss"] - 1.0  # counting sequences are easy to learn
    assert any("val_loss" in r for r in recs)
    assert (out / "tb").is_dir() and (out / "config.yaml").exists()
    releases = sorted((out / "release").iterdir())
    names = [p.name for p in releases]
    assert "final" in names and sum(n.startswith("tokens-") for n in names) == 2  # 40 steps x 512 tokens / 8192
    meta = json.loads((out / "release" / "final" / "release.json").read_text())
    assert meta["step"] == 40 and meta["tokens"] == 40 * 512
    model = load_pretrained(out / "release" / "final")
    assert model.config.position_embedding == "alibi"


def test_resume_after_sigkill_is_bit_exact(shard_dir, tmp_path):
    steps = 200  # the schedule's horizon; neither run gets there
    reference = tmp_path / "reference"
    cli(run_args(shard_dir, reference, steps=steps, extra=["--train.stop_after", "8", "--checkpoint.save_every", "3"]))
    expected = losses(reference)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "baichuan2.cli", *run_args(shard_dir, killed, steps=steps,
                                                           extra=["--checkpoint.save_every", "3"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (killed / "checkpoints" / "step-00000003").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    assert ckpts, "no checkpoint before the kill"
    resumed_from = int(ckpts[-1].split("-")[1])
    assert resumed_from < 8

    cli(run_args(shard_dir, killed, steps=steps, extra=["--train.stop_after", str(8 - resumed_from),
                                                        "--checkpoint.save_every", "3", "--resume", "true"]))
    got = losses(killed)
    assert sorted(got) == list(range(1, 9))  # lines written after the checkpoint by the killed run are gone
    for step in range(1, 9):
        assert got[step] == expected[step], (step, got[step], expected[step])


def test_non_finite_steps_are_skipped_then_stop(shard_dir, tmp_path, monkeypatch):
    from baichuan2.model import model as model_module

    calls = {"n": 0}
    real_forward = model_module.Baichuan.forward

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if out.loss is not None and 9 <= calls["n"] <= 16:  # steps 5-8 (two micro-batches per step)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model_module.Baichuan, "forward", poisoned)
    out = tmp_path / "nan"
    cli(run_args(shard_dir, out, steps=12))
    recs = read_metrics(out / "metrics.jsonl")
    skipped = [r for r in recs if r.get("event") == "skipped_non_finite"]
    assert len(skipped) >= 2
    model = load_pretrained(out / "release" / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    calls["n"] = -10**9  # from now on: always poisoned
    monkeypatch.setattr(model_module.Baichuan, "forward",
                        lambda self, *a, **k: _nan(real_forward(self, *a, **k)))
    with pytest.raises(SystemExit, match="consecutive non-finite steps"):
        cli(run_args(shard_dir, tmp_path / "nan2", steps=12, extra=["--train.max_bad_steps", "3"]))
    assert not (tmp_path / "nan2" / "release").exists()


def _nan(out):
    if out.loss is not None:
        out.loss = out.loss * float("nan")
    return out


def test_bad_config_is_clear(shard_dir, tmp_path):
    with pytest.raises(SystemExit, match="divisible"):
        cli(run_args(shard_dir, tmp_path / "r", extra=["--train.micro_batch_size", "3"]))
    with pytest.raises(SystemExit, match="max_steps or train.max_tokens"):
        cli(run_args(shard_dir, tmp_path / "r", steps=0))


def test_plot(shard_dir, tmp_path):
    out = tmp_path / "run"
    cli(run_args(shard_dir, out, steps=4))
    cli(["plot", str(out), "--out", str(tmp_path / "curves.png")])
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_every_shipped_recipe_parses():
    from pathlib import Path

    from baichuan2.cli import recipe_parser

    recipes = Path(__file__).resolve().parents[2] / "src" / "baichuan2" / "recipes"
    parser = recipe_parser("pretrain")
    found = sorted(recipes.glob("pretrain-*.yaml"))
    assert len(found) >= 3
    for path in found:
        cfg = parser.parse_args(["--config", str(path)])
        assert cfg.model.preset and cfg.optim.grad_clip == 0.5 and cfg.optim.beta2 == 0.95
