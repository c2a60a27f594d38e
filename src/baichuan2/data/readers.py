"""Readers that never crash on bad records: every input unit becomes either a document or a reject.

A record that cannot be read (invalid JSON, invalid UTF-8, missing or non-string text field, null
parquet cell) becomes a reject row with the reason and as much of the raw record as can be shown, so
nothing disappears silently.  Document ids are ``<file name>:<line or row>``, stable across runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from baichuan2.tokenizer.corpus import InputSpec, _kind
from baichuan2.utils.io import open_binary

MAX_SHOWN = 2000  # characters of a bad raw record kept in the rejects


@dataclass
class Record:
    doc_id: str
    source: str
    text: str
    reject: str | None = None  # reason when the record could not be read as a document


def _raw_preview(raw: bytes) -> str:
    return raw[:MAX_SHOWN * 4].decode("utf-8", errors="replace")[:MAX_SHOWN]


def read_records(spec: InputSpec, text_field: str = "text") -> Iterator[Record]:
    kind = _kind(spec.path)
    name = spec.path.name
    if kind == "parquet":
        yield from _read_parquet(spec, text_field)
    elif kind == "jsonl":
        with open_binary(spec.path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                doc_id = f"{name}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Record(doc_id, spec.source, _raw_preview(raw), f"invalid_utf8:byte {e.start}")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Record(doc_id, spec.source, line[:MAX_SHOWN], f"malformed_json:{e.msg} (col {e.colno})")
                    continue
                text = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    yield Record(doc_id, spec.source, line[:MAX_SHOWN], f"missing_text_field:{text_field}")
                    continue
                source = obj.get("source") if isinstance(obj.get("source"), str) and obj.get("source") else spec.source
                yield Record(str(obj.get("doc_id") or doc_id), source, text)
    else:
        with open_binary(spec.path) as fh:
            data = fh.read()
        for i, block in enumerate(b for b in data.replace(b"\r\n", b"\n").split(b"\n\n") if b.strip()):
            doc_id = f"{name}:{i}"
            try:
                yield Record(doc_id, spec.source, block.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Record(doc_id, spec.source, _raw_preview(block), f"invalid_utf8:byte {e.start}")


def _read_parquet(spec: InputSpec, text_field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(spec.path)
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one reject, the run goes on
        yield Record(f"{spec.path.name}:file", spec.source, "", f"unreadable_parquet:{e}")
        return
    names = set(pf.schema_arrow.names)
    if text_field not in names:
        yield Record(f"{spec.path.name}:file", spec.source, "", f"missing_text_field:{text_field}")
        return
    columns = [c for c in (text_field, "source", "doc_id") if c in names]
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        data = batch.to_pydict()
        for i, text in enumerate(data[text_field]):
            doc_id = str(data["doc_id"][i]) if "doc_id" in data and data["doc_id"][i] is not None \
                else f"{spec.path.name}:{row}"
            source = str(data["source"][i]) if "source" in data and data["source"][i] else spec.source
            if isinstance(text, str):
                yield Record(doc_id, source, text)
            else:
                yield Record(doc_id, source, "", f"missing_text_field:{text_field}")
            row += 1
