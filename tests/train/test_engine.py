"""The engine: pretraining's numbers are those of the loop it replaced; bad steps and divergence."""

from __future__ import annotations

import pytest

from baichuan2.cli import main as cli
from tests.train.conftest import run_args
from tests.train.test_trainer import losses

# (loss, grad_norm) per step of `run_args(steps=10) --optim.warmup_steps 3` on tiny-alibi, fp32, one process,
# measured with the stand-alone pretraining loop (commit b99cb17) before it became the engine's first objective.
REFERENCE = [(6.683851766685217, 4.234197616577148), (6.161914090061188, 4.290040016174316),
             (5.564490255249413, 3.8842849731445312), (4.5569372161398825, 3.9316577911376953),
             (3.716962600963073, 4.229228973388672), (2.601117690814317, 4.2834672927856445),
             (2.867983822509946, 3.858628511428833), (2.4142353014090316, 3.338388442993164),
             (1.657592596054452, 2.4571080207824707), (2.0676488394774792, 2.844714641571045)]


def test_pretraining_on_the_engine_reproduces_the_old_loss_curve(shard_dir, tmp_path):
    from baichuan2.utils.metrics import read_metrics

    out = tmp_path / "run"
    cli(run_args(shard_dir, out, steps=10, extra=["--optim.warmup_steps", "3"]))
    got = losses(out)
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(out / "metrics.jsonl") if "event" not in r and "loss" in r}
    assert sorted(got) == list(range(1, 11))
    for step, (loss, norm) in enumerate(REFERENCE, start=1):
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step
        assert norms[step] == pytest.approx(norm, rel=1e-5), step
