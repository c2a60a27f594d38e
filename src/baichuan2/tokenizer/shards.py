"""Packed token shards on disk: the hand-off from tokenisation to pretraining.

A shard is two files sharing a prefix:
  * ``<name>.bin``: every document's token ids back to back as little-endian
    uint32, each document followed by EOS (so documents stay separable);
  * ``<name>.idx.parquet``: one row per document: ``offset`` (int64, in tokens),
    ``length`` (int32, tokens including the EOS), ``weight`` (float32 sampling
    weight from the data pipeline, 1.0 by default), ``source`` (string tag such
    as web/books/code) and ``doc_id`` (string).

The ``.bin`` is written first (temp, fsync, rename) and the index last: a shard
exists only once its index does and the sizes agree, so a crash mid-write
never leaves a shard that counts.  The index's parquet metadata holds the
``.bin``'s sha256 (``bin_sha256``), checked the first time a shard's tokens are
read (skip with ``verify=False`` or ``BAICHUAN2_VERIFY_CHECKSUMS=0``), so a
corrupted shard is refused by name instead of training on garbage.  A directory
of shards may carry a ``manifest.json`` (tokenizer, totals); readers do not need
it, but use its vocabulary size to check token ids when present.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from baichuan2.utils.checksums import verify_default
from baichuan2.utils.io import InputError, atomic_open

TOKEN_DTYPE = np.dtype("<u4")
INDEX_SUFFIX = ".idx.parquet"
CHECKSUM_KEY = b"bin_sha256"  # parquet key-value metadata of the index: sha256 of the .bin


@dataclass
class ShardInfo:
    name: str
    num_docs: int
    num_tokens: int


def write_shard(prefix: str | os.PathLike, docs: Iterable[Sequence[int] | np.ndarray], eos_id: int,
                weights: Sequence[float] | None = None, sources: Sequence[str] | None = None,
                doc_ids: Sequence[str] | None = None, text_bytes: Sequence[int] | None = None) -> ShardInfo:
    """Write one shard atomically (``.bin`` then ``.idx.parquet``); EOS is appended to every document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prefix = Path(prefix)
    offsets: list[int] = []
    lengths: list[int] = []
    total = 0
    eos = np.array([eos_id], dtype=TOKEN_DTYPE).tobytes()
    digest = hashlib.sha256()
    with atomic_open(prefix.with_name(prefix.name + ".bin"), "wb") as fh:
        for doc in docs:
            arr = np.asarray(doc)
            if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(TOKEN_DTYPE).max):
                raise ValueError("token ids must fit in uint32")
            data = arr.astype(TOKEN_DTYPE, copy=False).tobytes()
            for chunk in (data, eos):
                fh.write(chunk)
                digest.update(chunk)
            offsets.append(total)
            lengths.append(arr.size + 1)
            total += arr.size + 1
    n = len(offsets)
    for name, column in (("weights", weights), ("sources", sources), ("doc_ids", doc_ids),
                         ("text_bytes", text_bytes)):
        if column is not None and len(column) != n:
            raise ValueError(f"{name} has {len(column)} entries for {n} documents")
    columns = {
        "offset": pa.array(offsets, pa.int64()),
        "length": pa.array(lengths, pa.int32()),
        "weight": pa.array(list(weights) if weights is not None else [1.0] * n, pa.float32()),
        "source": pa.array(list(sources) if sources is not None else [""] * n, pa.string()).dictionary_encode(),
        "doc_id": pa.array(list(doc_ids) if doc_ids is not None else [f"{prefix.name}:{i}" for i in range(n)],
                           pa.string()),
    }
    if text_bytes is not None:
        columns["text_bytes"] = pa.array(list(text_bytes), pa.int64())
    table = pa.table(columns).replace_schema_metadata({CHECKSUM_KEY: digest.hexdigest().encode()})
    with atomic_open(prefix.with_name(prefix.name + INDEX_SUFFIX), "wb") as fh:
        pq.write_table(table, fh)
    return ShardInfo(prefix.name, n, total)


class TokenShard:
    """One shard, memory-mapped: ``doc(i)`` is a zero-copy view of document i (EOS included).

    ``verify`` (None: on unless ``BAICHUAN2_VERIFY_CHECKSUMS=0``) checks the ``.bin`` against the
    index's sha256 on the first ``doc()`` call, so shards a run never reads cost nothing."""

    def __init__(self, prefix: str | os.PathLike, verify: bool | None = None):
        import pyarrow.parquet as pq

        prefix = Path(prefix)
        self.name = prefix.name
        index_path = prefix.with_name(prefix.name + INDEX_SUFFIX)
        bin_path = prefix.with_name(prefix.name + ".bin")
        if not index_path.exists() or not bin_path.exists():
            raise InputError(f"{prefix}: incomplete shard (need {bin_path.name} and {index_path.name})")
        try:
            table = pq.read_table(index_path)
        except Exception as e:
            raise InputError(f"{index_path}: unreadable shard index ({e})") from None
        self.offsets = table.column("offset").to_numpy()
        self.lengths = table.column("length").to_numpy().astype(np.int64)
        self.weights = table.column("weight").to_numpy().astype(np.float64)
        self.sources = [str(s) for s in table.column("source").to_pylist()]
        self.doc_ids = table.column("doc_id").to_pylist()
        # UTF-8 bytes of each source document (written by the encoder; absent in older shards)
        self.text_bytes = (table.column("text_bytes").to_numpy() if "text_bytes" in table.column_names else None)
        expected = int(self.lengths.sum()) * TOKEN_DTYPE.itemsize
        actual = bin_path.stat().st_size
        if actual != expected:
            raise InputError(f"{bin_path}: {actual} bytes but the index describes {expected} (corrupt shard)")
        self.tokens = np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r") if expected else np.zeros(0, TOKEN_DTYPE)
        self.bin_path = bin_path
        self.sha256 = (table.schema.metadata or {}).get(CHECKSUM_KEY, b"").decode() or None  # None: older shard
        self._unverified = verify_default(verify) and self.sha256 is not None

    def verify(self) -> None:
        """Check the ``.bin`` against the index's sha256 (no-op for older shards without one)."""
        if self.sha256 is not None and hashlib.sha256(self.tokens).hexdigest() != self.sha256:
            raise InputError(f"{self.bin_path}: checksum mismatch (sha256 differs from the one in "
                             f"{self.name}{INDEX_SUFFIX}): the shard is corrupt; re-encode it "
                             "(`baichuan2 tokenizer encode` re-writes damaged shards)")
        self._unverified = False

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def doc(self, i: int) -> np.ndarray:
        if self._unverified:
            self.verify()
        start = int(self.offsets[i])
        return self.tokens[start:start + int(self.lengths[i])]


def shard_prefixes(directory: str | os.PathLike) -> list[Path]:
    """Complete shards in a directory, in name order (partial shards without an index are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"{d}: token shard directory not found")
    return sorted(p.with_name(p.name[: -len(INDEX_SUFFIX)]) for p in d.glob("*" + INDEX_SUFFIX))


class TokenShards:
    """All shards of one or more directories as one list of documents (global doc index).

    ``vocab_size``: the smallest tokenizer vocabulary named by the directories' manifests
    (None without manifests); every token id must be below it."""

    def __init__(self, directories: str | os.PathLike | Sequence[str | os.PathLike], verify: bool | None = None):
        if isinstance(directories, (str, os.PathLike)):
            directories = [directories]
        self.shards = [TokenShard(p, verify) for d in directories for p in shard_prefixes(d)]
        if not self.shards:
            raise InputError(f"no token shards (*{INDEX_SUFFIX}) found in {list(map(str, directories))}")
        self.doc_starts = np.cumsum([0] + [len(s) for s in self.shards])
        sizes = [(read_manifest(d) or {}).get("tokenizer", {}).get("vocab_size") for d in directories]
        self.vocab_size = min((int(v) for v in sizes if v), default=None)

    def __len__(self) -> int:
        return int(self.doc_starts[-1])

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def locate(self, i: int) -> tuple[TokenShard, int]:
        k = int(np.searchsorted(self.doc_starts, i, side="right")) - 1
        return self.shards[k], i - int(self.doc_starts[k])

    def doc(self, i: int) -> np.ndarray:
        shard, j = self.locate(i)
        return shard.doc(j)

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([s.lengths for s in self.shards])

    @property
    def weights(self) -> np.ndarray:
        return np.concatenate([s.weights for s in self.shards])

    @property
    def sources(self) -> list[str]:
        return [src for s in self.shards for src in s.sources]


def read_manifest(directory: str | os.PathLike) -> Mapping[str, Any] | None:
    from baichuan2.utils.io import read_json

    path = Path(directory) / "manifest.json"
    return read_json(path) if path.exists() else None
