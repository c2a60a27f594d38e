"""Run logs: one JSON object per line plus TensorBoard scalars.

JSONL is the source of truth (plots, scaling-law fits and tests read it);
TensorBoard is for people watching a run.  The log is only ever appended to;
on resume, the lines a killed run wrote after the checkpoint being resumed are
dropped (the resumed run writes them again, identically) and everything up to
it is kept.  A line cut short by a kill is dropped rather than glued to the next.
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
        self._tb_wanted = tensorboard and enabled
        self._purge_step: int | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """A kill mid-write leaves a last line without its newline; appending would fuse it with the next."""
        with open(self.path, "rb") as fh:
            data = fh.read()
        if data and not data.endswith(b"\n"):
            atomic_write_text(self.path, data[: data.rfind(b"\n") + 1].decode("utf-8"))

    def truncate_after(self, step: int) -> None:
        """Keep records up to ``step`` (called when resuming from ``step``); later ones, from the
        interrupted session, are written again by the resumed run. TensorBoard drops them too."""
        if not self.enabled:
            return
        self._purge_step = step + 1
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def _tensorboard(self):
        if self._tb is None and self._tb_wanted:
            self._tb_wanted = False  # one attempt
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.path.parent / "tb"), purge_step=self._purge_step)
            except Exception:  # tensorboard missing or broken: JSONL still has everything
                self._tb = None
        return self._tb

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
        tb = self._tensorboard()
        if tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # unreadable: dropped with the records after the resume point


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
