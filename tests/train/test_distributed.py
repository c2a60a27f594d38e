"""FSDP2 and tensor parallelism on CPU (gloo), launched with torchrun like a real job."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from baichuan2.cli import main as cli
from baichuan2.model.checkpoint import load_pretrained
from tests.train.conftest import run_args
from tests.train.test_trainer import losses


def torchrun(nproc: int, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "baichuan2.cli", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    cli(run_args(shard_dir, out, steps=6))
    return out


@pytest.mark.parametrize("nproc,tp", [(2, 1), (2, 2), (4, 2)], ids=["fsdp2", "tp2", "fsdp2xtp2"])
def test_distributed_matches_single_and_resumes_on_one_process(shard_dir, reference, tmp_path, nproc, tp):
    expected = losses(reference)
    out = tmp_path / "run"
    torchrun(nproc, run_args(shard_dir, out, steps=6, extra=["--train.stop_after", "3", "--parallel.tp", str(tp)]))
    got = losses(out)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    cli(run_args(shard_dir, out, steps=6, extra=["--resume", "true"]))  # saved on N processes, resumed on 1
    got = losses(out)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    ours, ref = load_pretrained(out / "release" / "final"), load_pretrained(reference / "release" / "final")
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_release_from_a_tensor_parallel_run_has_the_official_layout(shard_dir, reference, tmp_path):
    out = tmp_path / "tp"
    torchrun(2, run_args(shard_dir, out, steps=6, extra=["--parallel.tp", "2"]))
    ours, ref = load_pretrained(out / "release" / "final"), load_pretrained(reference / "release" / "final")
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name
