"""Input files -> records, in a fixed order; shared by the data pipeline and the tokenizer.

Formats: JSONL (``.gz``/``.zst`` too), parquet and plain text (one document per blank-line-separated
block).  Every input unit becomes a ``Record``: either a document or a reject with the reason, so the
data pipeline can route bad input to its rejects and keep going, while ``iter_documents`` (the
tokenizer's strict view) turns the first reject into an ``InputError`` naming the file and place.

Reading never holds more than one document (plus one read chunk) in memory: a line or text block
longer than ``max_bytes`` is skipped chunk by chunk and becomes a ``too_long`` reject, and a damaged
compressed file (truncated ``.gz``, corrupt ``.zst``) yields every record before the damage and then
one ``damaged_file`` reject with the byte offset where decompression failed.  Document ids are
``<file name>:<line or row>``, stable across runs.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from baichuan2.data.schema import CARRIED_COLUMNS
from baichuan2.utils.io import InputError, open_binary

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".ndjson")
MAX_SHOWN = 2000  # characters of a bad raw record kept in the rejects
CHUNK = 1 << 20  # bytes read at a time while skipping an over-long record


@dataclass(frozen=True)
class InputSpec:
    path: Path
    source: str


@dataclass
class Record:
    doc_id: str
    source: str
    text: str
    reject: str | None = None  # "reason:detail" when the unit could not be read as a document
    weight: float = 1.0  # sampling weight carried by pipeline outputs (1 elsewhere)
    lang: str | None = None  # language tag carried by pipeline outputs


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
            files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p) is not None)
        else:
            files = sorted(Path(p) for p in glob.glob(item)) if any(c in item for c in "*?[") else [path]
        if not files:
            raise InputError(f"no input files match {item!r}")
        for f in files:
            if not f.exists():
                raise InputError(f"{f}: input file not found")
            if file_kind(f) is None:
                raise InputError(f"{f}: unsupported input type (use .txt, .jsonl[.gz|.zst] or .parquet)")
            specs.append(InputSpec(f, source or default_source(f)))
    return specs


def file_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def default_source(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".zst", ".jsonl", ".json", ".ndjson", ".parquet", ".txt", ".md", ".text"):
        name = name.removesuffix(suffix)
    return name.split("-")[0] or "text"


def _raw_preview(raw: bytes) -> str:
    return raw[:MAX_SHOWN * 4].decode("utf-8", errors="replace")[:MAX_SHOWN]


def _decompression_errors() -> tuple[type[BaseException], ...]:
    import gzip

    errors: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def read_records(spec: InputSpec, text_field: str = "text", max_bytes: int = 0) -> Iterator[Record]:
    """Records of one file; ``max_bytes`` > 0 rejects longer documents without holding them."""
    kind = file_kind(spec.path)
    if kind == "parquet":
        yield from _read_parquet(spec, text_field, max_bytes)
        return
    reader = _read_jsonl if kind == "jsonl" else _read_text
    offset = [0]  # uncompressed bytes consumed, for the damage report
    try:
        with open_binary(spec.path) as fh:
            yield from reader(fh, spec, text_field, max_bytes, offset)
    except _decompression_errors() as e:
        # Everything before the damage has been yielded; the damage itself is one reject.
        yield Record(f"{spec.path.name}:damaged", spec.source, str(spec.path),
                     f"damaged_file:{type(e).__name__}: {e} at uncompressed byte {offset[0]} of {spec.path} "
                     f"({spec.path.stat().st_size} bytes on disk)")


def _too_long(doc_id: str, source: str, head: bytes, size: int) -> Record:
    return Record(doc_id, source, _raw_preview(head), f"too_long:more than {size:,} bytes")


def _read_jsonl(fh, spec: InputSpec, text_field: str, max_bytes: int, offset: list[int]) -> Iterator[Record]:
    name = spec.path.name
    lineno = 0
    while True:
        raw = fh.readline(max_bytes + 1) if max_bytes else fh.readline()
        if not raw:
            return
        lineno += 1
        offset[0] += len(raw)
        doc_id = f"{name}:{lineno}"
        if max_bytes and len(raw) > max_bytes and not raw.endswith(b"\n"):
            head = raw[:MAX_SHOWN * 4]
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line in bounded chunks
                raw = fh.readline(CHUNK)
                offset[0] += len(raw)
            yield _too_long(doc_id, spec.source, head, max_bytes)
            continue
        if not raw.strip():
            continue
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
        weight, lang = obj.get("weight", 1.0), obj.get("lang")
        yield Record(str(obj.get("doc_id") or doc_id), source, text,
                     weight=float(weight) if isinstance(weight, (int, float)) else 1.0,
                     lang=lang if isinstance(lang, str) and lang else None)


def _read_text(fh, spec: InputSpec, text_field: str, max_bytes: int, offset: list[int]) -> Iterator[Record]:
    """Blocks separated by a blank line (``\\r\\n`` read as ``\\n``), streamed chunk by chunk."""
    name = spec.path.name
    index = 0
    buf, carry_cr, overflow = b"", b"", False

    def emit(block: bytes, too_long: bool):
        nonlocal index
        if too_long or block.strip():
            doc_id = f"{name}:{index}"
            index += 1
            if too_long:
                return _too_long(doc_id, spec.source, block, max_bytes)
            try:
                return Record(doc_id, spec.source, block.decode("utf-8"))
            except UnicodeDecodeError as e:
                return Record(doc_id, spec.source, _raw_preview(block), f"invalid_utf8:byte {e.start}")
        return None

    head = b""
    while True:
        chunk = fh.read(CHUNK)
        offset[0] += len(chunk)
        data = carry_cr + chunk
        carry_cr = b""
        if chunk and data.endswith(b"\r"):  # a "\r\n" may straddle the chunk boundary
            data, carry_cr = data[:-1], b"\r"
        buf += data.replace(b"\r\n", b"\n")
        while True:
            cut = buf.find(b"\n\n")
            if cut < 0:
                break
            block, buf = buf[:cut], buf[cut + 2:]
            rec = emit(head if overflow else block, overflow)
            overflow, head = False, b""
            if rec:
                yield rec
        if max_bytes and len(buf) > max_bytes + 1:
            # Over-long block: remember its start, keep only the last byte (half of a possible "\n\n").
            if not overflow:
                head = buf[:MAX_SHOWN * 4]
            overflow, buf = True, buf[-1:]
        if not chunk:
            rec = emit(head if overflow else buf, overflow)
            if rec:
                yield rec
            return


def _read_parquet(spec: InputSpec, text_field: str, max_bytes: int) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(spec.path)
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes one reject, the run goes on
        yield Record(f"{spec.path.name}:file", spec.source, "", f"unreadable_parquet:{e}")
        return
    names = set(pf.schema_arrow.names)
    if text_field not in names:
        yield Record(f"{spec.path.name}:file", spec.source, "",
                     f"missing_text_field:{text_field} (columns: {sorted(names)})")
        return
    columns = [c for c in (text_field, *CARRIED_COLUMNS) if c in names]
    row = 0
    try:
        for batch in pf.iter_batches(columns=columns, batch_size=4096):
            data = batch.to_pydict()
            for i, text in enumerate(data[text_field]):
                doc_id = str(data["doc_id"][i]) if "doc_id" in data and data["doc_id"][i] is not None \
                    else f"{spec.path.name}:{row}"
                source = str(data["source"][i]) if "source" in data and data["source"][i] else spec.source
                weight = data["weight"][i] if "weight" in data and data["weight"][i] is not None else 1.0
                lang = data["lang"][i] if "lang" in data else None
                row += 1
                if not isinstance(text, str):
                    yield Record(doc_id, source, "", f"missing_text_field:{text_field}")
                elif max_bytes and len(text) > max_bytes:  # characters >= bytes / 4: surely too long
                    yield _too_long(doc_id, source, text[:MAX_SHOWN].encode(), max_bytes)
                else:
                    yield Record(doc_id, source, text, weight=float(weight), lang=lang or None)
    except Exception as e:  # noqa: BLE001 - a corrupt row group: keep what was read, reject the rest
        yield Record(f"{spec.path.name}:damaged", spec.source, str(spec.path),
                     f"damaged_file:{type(e).__name__}: {e} after row {row} of {spec.path}")


def iter_file(spec: InputSpec, text_field: str = "text") -> Iterator[dict]:
    """Strict reading: ``{"text", "source", "doc_id", "weight", "lang"}`` per document (``lang`` None
    unless the input carries a tag); a bad record is an
    ``InputError`` naming the file and place (null parquet cells are skipped)."""
    for rec in read_records(spec, text_field):
        if rec.reject:
            if spec.path.name.endswith(".parquet") and rec.reject.startswith("missing_text_field") \
                    and not rec.doc_id.endswith(":file"):
                continue
            raise InputError(f"{spec.path} ({rec.doc_id}): {rec.reject}")
        yield {"text": rec.text, "source": rec.source, "doc_id": rec.doc_id, "weight": rec.weight, "lang": rec.lang}


def iter_documents(inputs: Sequence[str] | str, text_field: str = "text") -> Iterator[dict]:
    for spec in expand_inputs(inputs):
        yield from iter_file(spec, text_field)
