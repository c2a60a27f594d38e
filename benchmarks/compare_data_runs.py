"""Compare two `data run` output directories: are the outputs the same?

    python benchmarks/compare_data_runs.py runs/data-old runs/data-new

``output/part-*.parquet`` are compared byte for byte (and by rows when the bytes differ);
``rejects/`` as multisets of rows (file names and row order within a task are not part of the
contract), with the count of rows only one side has, per step and reason.  Exit status 0 when
outputs are byte-identical and rejects hold the same rows.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq


def _rows(files: list[Path]) -> list[dict]:
    return ds.dataset(files, format="parquet").to_table().to_pylist() if files else []


def _key(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items()))


def compare(old: Path, new: Path) -> bool:
    ok = True
    old_parts, new_parts = sorted((old / "output").glob("part-*.parquet")), sorted((new / "output").glob("part-*.parquet"))
    print(f"output: {len(old_parts)} vs {len(new_parts)} files")
    for a, b in zip(old_parts, new_parts):
        same = hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
        rows = pq.read_table(a).to_pylist() == pq.read_table(b).to_pylist()
        print(f"  {a.name}: {'byte-identical' if same else 'rows identical' if rows else 'DIFFERENT'} "
              f"({pq.read_metadata(a).num_rows} vs {pq.read_metadata(b).num_rows} rows)")
        ok &= same
    ok &= len(old_parts) == len(new_parts)
    ra, rb = _rows(sorted((old / "rejects").glob("*.parquet"))), _rows(sorted((new / "rejects").glob("*.parquet")))
    ca, cb = Counter(map(_key, ra)), Counter(map(_key, rb))
    only_old, only_new = ca - cb, cb - ca
    print(f"rejects: {len(ra)} vs {len(rb)} rows; {sum(only_old.values())} only in the first, "
          f"{sum(only_new.values())} only in the second")
    for name, diff in (("first", only_old), ("second", only_new)):
        by = Counter()
        for key, n in diff.items():
            d = dict(key)
            by[(d["step"], d["reason"].split(":")[0])] += n
        for (step, reason), n in sorted(by.items()):
            print(f"  only in the {name}: {n} x {step}/{reason}")
    return ok and not only_old and not only_new


if __name__ == "__main__":
    sys.exit(0 if compare(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
