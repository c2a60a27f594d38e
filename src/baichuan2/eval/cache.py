"""Per-item result cache that makes every evaluation resumable.

Each scored item is appended to ``items.jsonl`` (one JSON line, flushed per batch) as soon as it is
done, so an interrupted run resumes where it stopped. ``settings.json`` records what produced the
scores: when a re-run's settings differ, the cached items are not comparable and are discarded.
"""

from __future__ import annotations

import json
from pathlib import Path

from baichuan2.utils.io import atomic_write_json, iter_jsonl


class ItemCache:
    def __init__(self, out_dir: str | Path, settings: dict, key_fields: tuple[str, ...]):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / "items.jsonl"
        self.key_fields = key_fields
        settings_file = self.dir / "settings.json"
        if settings_file.exists() and json.loads(settings_file.read_text(encoding="utf-8")) != settings:
            self.file.unlink(missing_ok=True)  # different settings: cached scores are not comparable
        atomic_write_json(settings_file, settings)
        self.done: dict[tuple, dict] = {}
        if self.file.exists():
            for _, r in iter_jsonl(self.file, strict=False):
                if isinstance(r, dict):  # a line cut by a crash: that item is simply scored again
                    self.done[self.key(r)] = r
        self._fh = None

    def key(self, record: dict) -> tuple:
        return tuple(record[f] for f in self.key_fields)

    def __contains__(self, key: tuple) -> bool:
        return key in self.done

    def __getitem__(self, key: tuple) -> dict:
        return self.done[key]

    def add(self, records: list[dict]) -> None:
        if self._fh is None:
            torn = self.file.exists() and self.file.stat().st_size > 0 and not self.file.read_bytes().endswith(b"\n")
            self._fh = open(self.file, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            if torn:  # a line cut by a crash: end it, so the next record starts on a line of its own
                self._fh.write("\n")
        for r in records:
            self.done[self.key(r)] = r
            self._fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> ItemCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
