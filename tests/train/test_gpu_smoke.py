"""benchmarks/gpu_smoke.py --dry-run: the GPU smoke benchmark's code path (FSDP2 on a 1-rank mesh, bf16,
compile; pretraining, SFT and DPO through the engine) runs end to end on the CPU, so it works when a GPU is lent."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_smoke_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "BAICHUAN2_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {m.group(1): m for m in re.finditer(
        r"^(pretrain|sft|dpo)\s+(\d+) steps\s+([\d,]+) tokens/s\s+MFU\s+([\d.]+)%.*final loss (\S+)$", proc.stdout, re.M)}
    assert set(lines) == {"pretrain", "sft", "dpo"}, proc.stdout
    for m in lines.values():
        assert int(m.group(2)) == 2
        assert float(m.group(3).replace(",", "")) > 0 and math.isfinite(float(m.group(4)))
        assert math.isfinite(float(m.group(5)))
