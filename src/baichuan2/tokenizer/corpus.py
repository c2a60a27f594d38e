"""Read documents from text, JSONL (.gz/.zst) and parquet files, in a fixed order.

Every document comes out as ``{"text", "source", "doc_id", "weight"}``: parquet
shards from the data pipeline carry ``source``/``doc_id``/``weight`` columns;
other inputs get a source tag (from ``path=tag`` input specs or the file's
stem), a ``file:line`` id and weight 1.  Plain text files are one document per
blank-line-separated block.  Bad records raise an ``InputError`` naming the
file and line (the data pipeline, which must keep going, routes them to
rejects instead).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from baichuan2.utils.io import InputError, iter_jsonl, open_text

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".ndjson")


@dataclass(frozen=True)
class InputSpec:
    path: Path
    source: str


def expand_inputs(inputs: Sequence[str] | str) -> list[InputSpec]:
    """``["web=data/*.jsonl", "books.parquet", "dir/"]`` -> sorted file list with source tags."""
    if isinstance(inputs, str):
        inputs = [inputs]
    specs: list[InputSpec] = []
    for item in inputs:
        source = None
        if "=" in item and not os.path.exists(item):
            source, item = item.split("=", 1)
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
        else:
            files = sorted(Path(p) for p in glob.glob(item)) if any(c in item for c in "*?[") else [path]
        if not files:
            raise InputError(f"no input files match {item!r}")
        for f in files:
            if not f.exists():
                raise InputError(f"{f}: input file not found")
            if _kind(f) is None:
                raise InputError(f"{f}: unsupported input type (use .txt, .jsonl[.gz|.zst] or .parquet)")
            specs.append(InputSpec(f, source or _default_source(f)))
    return specs


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _default_source(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".zst", ".jsonl", ".json", ".ndjson", ".parquet", ".txt", ".md", ".text"):
        name = name.removesuffix(suffix)
    return name.split("-")[0] or "text"


def iter_documents(inputs: Sequence[str] | str, text_field: str = "text") -> Iterator[dict]:
    for spec in expand_inputs(inputs):
        yield from iter_file(spec, text_field)


def iter_file(spec: InputSpec, text_field: str = "text") -> Iterator[dict]:
    kind = _kind(spec.path)
    if kind == "parquet":
        yield from _iter_parquet(spec, text_field)
    elif kind == "jsonl":
        for lineno, record in iter_jsonl(spec.path, strict=True):
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise InputError(f"{spec.path}:{lineno}: expected an object with a string field {text_field!r}")
            weight = record.get("weight", 1.0)
            yield {"text": record[text_field], "source": str(record.get("source") or spec.source),
                   "doc_id": str(record.get("doc_id") or f"{spec.path.name}:{lineno}"),
                   "weight": float(weight) if isinstance(weight, (int, float)) else 1.0}
    else:
        with open_text(spec.path) as fh:
            try:
                text = fh.read()
            except UnicodeDecodeError as e:
                raise InputError(f"{spec.path}: invalid UTF-8 at byte {e.start}") from None
        for i, block in enumerate(b for b in text.split("\n\n") if b.strip()):
            yield {"text": block, "source": spec.source, "doc_id": f"{spec.path.name}:{i}", "weight": 1.0}


def _iter_parquet(spec: InputSpec, text_field: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(spec.path)
    except Exception as e:
        raise InputError(f"{spec.path}: unreadable parquet file ({e})") from None
    names = set(pf.schema_arrow.names)
    if text_field not in names:
        raise InputError(f"{spec.path}: no column {text_field!r} (columns: {sorted(names)})")
    columns = [c for c in (text_field, "source", "doc_id", "weight") if c in names]
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        data = batch.to_pydict()
        for i, text in enumerate(data[text_field]):
            if text is None:
                row += 1
                continue
            weight = data["weight"][i] if "weight" in data else 1.0
            yield {"text": text, "source": str(data["source"][i]) if "source" in data else spec.source,
                   "doc_id": str(data["doc_id"][i]) if "doc_id" in data else f"{spec.path.name}:{row}",
                   "weight": 1.0 if weight is None else float(weight)}
            row += 1
