"""Encode a corpus into packed token shards, in parallel, resumably, atomically.

Documents are read in a fixed order and cut into shards of ``docs_per_shard``
documents, so shard k always holds the same documents: a re-run skips every
shard whose files are complete and re-encodes only the rest (a shard killed
mid-write left only a temporary file, which is removed; a shard whose checksum
no longer matches is encoded again).  Worker processes encode and write shards
(``shards.write_shard``: ``.bin`` first, index last) and die with the main
process (``utils.procs.die_with_parent``), which reads input and keeps a bounded
number of shards in flight.  ``manifest.json`` (tokenizer hash, totals per
source) is written at the end.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from baichuan2.tokenizer.corpus import expand_inputs, iter_documents
from baichuan2.tokenizer.shards import INDEX_SUFFIX, TokenShard
from baichuan2.utils.checksums import file_sha256
from baichuan2.utils.io import InputError, atomic_write_json, read_json

_worker_tok = None


def _init_worker(model_file: str, parent_pid: int) -> None:
    global _worker_tok
    from baichuan2.tokenizer.tokenizer import Tokenizer
    from baichuan2.utils.procs import die_with_parent

    die_with_parent(parent_pid)  # after kill -9 of `tokenizer encode`, no worker keeps encoding and writing

    _worker_tok = Tokenizer(model_file)


def _encode_shard(prefix: str, texts: list[str], weights: list[float], sources: list[str],
                  doc_ids: list[str]) -> str:
    from baichuan2.tokenizer.shards import write_shard

    ids = _worker_tok.encode_batch(texts, num_threads=1)
    write_shard(prefix, ids, _worker_tok.eos_id, weights=weights, sources=sources, doc_ids=doc_ids,
                text_bytes=[len(t.encode("utf-8")) for t in texts])
    return prefix


def _shards(inputs: Sequence[str] | str, text_field: str, docs_per_shard: int) -> Iterator[tuple[int, dict]]:
    batch: dict[str, list] = {"texts": [], "weights": [], "sources": [], "doc_ids": []}
    k = 0
    for doc in iter_documents(inputs, text_field):
        if not doc["text"]:
            continue  # an empty document has no tokens to learn from
        batch["texts"].append(doc["text"])
        batch["weights"].append(doc["weight"])
        batch["sources"].append(doc["source"])
        batch["doc_ids"].append(doc["doc_id"])
        if len(batch["texts"]) == docs_per_shard:
            yield k, batch
            k += 1
            batch = {"texts": [], "weights": [], "sources": [], "doc_ids": []}
    if batch["texts"]:
        yield k, batch


def _count_documents(specs) -> int | None:
    """Documents in the inputs, for the bar's time left, at a small fraction of the cost of encoding them:
    parquet row counts from the file footers, JSONL lines (decompressed, not parsed); None when a plain-text
    file is among them (its documents are blank-line-separated blocks, found only by reading it). An upper
    bound: empty documents are skipped."""
    import pyarrow.parquet as pq

    from baichuan2.data.readers import file_kind
    from baichuan2.utils.io import open_binary

    total = 0
    for spec in specs:
        kind = file_kind(spec.path)
        try:
            if kind == "parquet":
                total += pq.ParquetFile(spec.path).metadata.num_rows
            elif kind == "jsonl":
                last = b""
                with open_binary(spec.path) as fh:
                    while chunk := fh.read(1 << 20):
                        total += chunk.count(b"\n")
                        last = chunk
                total += bool(last) and not last.endswith(b"\n")
            else:
                return None
        except Exception:  # a damaged file: no estimate; reading it for real reports what is wrong, and where
            return None
    return total


def _complete(prefix: Path, expected_docs: int) -> bool:
    if not prefix.with_name(prefix.name + INDEX_SUFFIX).exists():
        return False
    try:
        shard = TokenShard(prefix)
        if len(shard) != expected_docs:
            return False
        shard.verify()  # a damaged shard is encoded again
        return True
    except InputError:
        return False


def encode_corpus(inputs: Sequence[str] | str, out_dir: str, tokenizer: str, text_field: str = "text",
                  docs_per_shard: int = 20000, workers: int = 0, overwrite: bool = False) -> dict:
    """Encode ``inputs`` into ``out_dir/shard-NNNNN.{bin,idx.parquet}``; returns the manifest."""
    from tqdm import tqdm

    from baichuan2.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = expand_inputs(inputs)
    plan = {"tokenizer_sha256": file_sha256(tok.model_file), "docs_per_shard": docs_per_shard,
            "text_field": text_field, "inputs": [[str(s.path.resolve()), s.source] for s in specs]}
    plan_path = out / "encode_plan.json"
    if plan_path.exists() and not overwrite:
        old = read_json(plan_path)
        if old != plan:
            raise InputError(f"{out} holds shards from a different run ({plan_path}); "
                             "use a new directory or overwrite=True")
    if overwrite:
        for p in list(out.glob("shard-*")) + [out / "manifest.json"]:
            p.unlink(missing_ok=True)
    for pattern in (".shard-*.tmp", ".manifest.json.*.tmp", ".encode_plan.json.*.tmp"):
        for stale in out.glob(pattern):  # temporary files (utils.io.atomic_open) of a run killed mid-write
            stale.unlink(missing_ok=True)
    atomic_write_json(plan_path, plan)

    workers = workers or os.cpu_count() or 1
    start = time.time()
    done: set[int] = set()
    resumed = 0
    pending: dict[Future, tuple[int, int]] = {}  # shard in flight -> (shard number, documents)
    # the bar counts documents encoded (not read: reading runs ahead by up to 2 shards per worker)
    progress = tqdm(desc="encoding", unit="doc", total=_count_documents(specs), mininterval=0.5)
    ctx = mp.get_context("spawn")  # workers never inherit the parent's threads or locks
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(str(tok.model_file), os.getpid())) as pool:
        def drain(block_until: int) -> None:
            while len(pending) > block_until:
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in finished:
                    fut.result()  # re-raise worker errors here
                    k, docs = pending.pop(fut)
                    done.add(k)
                    progress.update(docs)

        for k, batch in _shards(inputs, text_field, docs_per_shard):
            prefix = out / f"shard-{k:05d}"
            if _complete(prefix, len(batch["texts"])):
                done.add(k)
                resumed += 1
                progress.update(len(batch["texts"]))
                continue
            pending[pool.submit(_encode_shard, str(prefix), batch["texts"], batch["weights"], batch["sources"],
                                batch["doc_ids"])] = (k, len(batch["texts"]))
            drain(2 * workers)  # bounded memory: at most 2 shards per worker in flight
        drain(0)
    progress.total = progress.n  # the count included empty documents, which are skipped
    progress.close()
    if not done:
        raise InputError("no non-empty documents in the inputs")
    manifest = _manifest(out, sorted(done), tok, plan["tokenizer_sha256"])
    manifest.update(resumed_shards=resumed, seconds=round(time.time() - start, 2))
    atomic_write_json(out / "manifest.json", manifest)
    nbytes = sum(s["bytes"] for s in manifest["sources"].values())
    print(f"encoded {manifest['total_docs']:,} docs -> {manifest['total_tokens']:,} tokens in "
          f"{len(done)} shards ({resumed} resumed) in {manifest['seconds']:.1f} s "
          f"({nbytes / 1e6 / max(manifest['seconds'], 1e-9):.1f} MB/s, "
          f"{nbytes / max(manifest['total_tokens'], 1):.2f} bytes/token)")
    return manifest


def _manifest(out: Path, shard_ids: list[int], tok, sha256: str) -> dict:
    per_source: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "tokens": 0, "bytes": 0})
    shards = []
    for k in shard_ids:
        shard = TokenShard(out / f"shard-{k:05d}")
        shards.append({"name": shard.name, "docs": len(shard), "tokens": shard.num_tokens})
        nbytes = shard.text_bytes if shard.text_bytes is not None else [0] * len(shard)
        for src, length, b in zip(shard.sources, shard.lengths, nbytes):
            stats = per_source[src]
            stats["docs"] += 1
            stats["tokens"] += int(length)
            stats["bytes"] += int(b)
    return {
        "tokenizer": {"path": str(tok.model_file), "sha256": sha256, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id},
        "dtype": "uint32",
        "shards": shards,
        "total_docs": sum(s["docs"] for s in shards),
        "total_tokens": sum(s["tokens"] for s in shards),
        "sources": dict(per_source),
    }
