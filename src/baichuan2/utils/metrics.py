"""Run logs: one JSON object per line plus TensorBoard scalars.

JSONL is the source of truth (plots, scaling-law fits and tests read it);
TensorBoard is for people watching a run.  On resume, lines written after the
checkpoint being resumed are dropped so the log matches the training state.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from baichuan2.utils.io import atomic_write_text


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, filename: str = "metrics.jsonl", tensorboard: bool = True,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / filename
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except Exception:  # tensorboard missing or broken: JSONL still has everything
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step > step`` (called when resuming from ``step``)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in metrics.items():
            if hasattr(value, "item"):
                value = value.item()
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # JSON has no NaN/inf; keep the fact visible
            record[key] = value
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a metrics.jsonl file (a torn last line from a crash is ignored)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
