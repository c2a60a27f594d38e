"""The CPU peak behind every MFU figure: a measurement taken on a busy machine must not stick."""

import json

import torch

from baichuan2.train import mfu


def test_a_low_cached_peak_is_replaced_by_a_better_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("BAICHUAN2_CACHE", str(tmp_path))
    measured = iter([5e9, 50e9, 20e9])  # busy machine, idle machine, busy again
    monkeypatch.setattr(mfu, "measure_cpu_peak", lambda dtype: next(measured))
    assert mfu.cpu_peak(torch.float32) == 5e9  # first measurement, cached
    assert mfu.cpu_peak(torch.float32) == 5e9  # cached: no new measurement
    assert mfu.cpu_peak(torch.float32, refresh=True) == 50e9
    assert mfu.cpu_peak(torch.float32, refresh=True) == 50e9  # a worse re-measurement keeps the best
    assert list(json.loads((tmp_path / "cpu_peak.json").read_text()).values()) == [50e9]


def test_a_step_faster_than_the_cached_peak_triggers_one_re_measurement(shard_dir, tmp_path, monkeypatch):
    """The engine re-measures (once) when MFU would exceed 100 %, so the figures it logs stay below it."""
    from baichuan2.cli import main as cli
    from baichuan2.utils.metrics import read_metrics
    from tests.train.conftest import run_args

    monkeypatch.setenv("BAICHUAN2_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(dtype):
        calls.append(dtype)
        return 1e3 if len(calls) == 1 else 1e18  # absurdly low (a poisoned cache), then the re-measurement

    monkeypatch.setattr(mfu, "measure_cpu_peak", fake)
    out = tmp_path / "run"
    cli(run_args(shard_dir, out, steps=3))
    assert len(calls) == 2
    logged = [r["mfu"] for r in read_metrics(out / "metrics.jsonl") if "mfu" in r]
    assert logged and all(0 < m < 1 for m in logged)
