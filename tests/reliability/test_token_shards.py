"""Issue 14, item 5: corrupt token shards are refused by name (checksum on first read, ids checked per batch)."""

from __future__ import annotations

import numpy as np
import pytest

from baichuan2.tokenizer.shards import TokenShards, write_shard
from baichuan2.train.data import PackedDataset
from baichuan2.utils.io import InputError, atomic_write_json


def _shards(directory, vocab=512, docs=40):
    rng = np.random.default_rng(0)
    for k in range(2):
        write_shard(directory / f"shard-{k:05d}", [rng.integers(3, vocab, int(rng.integers(20, 80)))
                                                   for _ in range(docs)], eos_id=2)
    atomic_write_json(directory / "manifest.json", {"tokenizer": {"vocab_size": vocab}})
    return directory


def _all_rows(dataset: PackedDataset, batch_rows: int = 8):
    for first in range(0, dataset.rows_in_epoch(0), batch_rows):
        dataset.batch(list(range(first, min(first + batch_rows, dataset.rows_in_epoch(0)))))


def test_corrupted_bytes_are_caught_on_first_read(tmp_path):
    """64 corrupted bytes in a shard: refused, naming the file, before any batch is built from it."""
    d = _shards(tmp_path)
    data = bytearray((d / "shard-00001.bin").read_bytes())
    rng = np.random.default_rng(1)
    for offset in rng.choice(len(data), 64, replace=False):
        data[offset] ^= 0xFF
    (d / "shard-00001.bin").write_bytes(bytes(data))
    dataset = PackedDataset(str(d), seq_len=32, seed=0)
    with pytest.raises(InputError, match=r"shard-00001\.bin: checksum mismatch"):
        _all_rows(dataset)


def test_single_flipped_bytes_are_all_caught(tmp_path):
    d = _shards(tmp_path)
    path = d / "shard-00000.bin"
    original = path.read_bytes()
    offsets = np.random.default_rng(2).choice(len(original), 16, replace=False)
    caught = 0
    for offset in offsets:
        data = bytearray(original)
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        try:
            TokenShards(str(d)).doc(0)
        except InputError as e:
            caught += "shard-00000.bin: checksum mismatch" in str(e)
    assert caught == len(offsets)


def test_out_of_vocabulary_ids_name_shard_and_offset(tmp_path):
    """Ids >= vocab (a shard without checksum, or checks switched off): the batch names shard and offset."""
    d = _shards(tmp_path)
    tokens = np.memmap(d / "shard-00001.bin", dtype="<u4", mode="r+")
    tokens[137] = 70_000
    tokens.flush()
    del tokens
    dataset = PackedDataset(str(d), seq_len=32, seed=0, shuffle_rows=False)
    dataset.shards.shards[1]._unverified = False  # as with BAICHUAN2_VERIFY_CHECKSUMS=0
    with pytest.raises(InputError, match=r"shard-00001\.bin: token id 70000 at token offset 137 \(byte 548, "
                                         r"document 'shard-00001:\d+'\) is outside the vocabulary of 512"):
        _all_rows(dataset)


def test_fast_path_skips_the_checksum(tmp_path, monkeypatch):
    d = _shards(tmp_path)
    data = bytearray((d / "shard-00000.bin").read_bytes())
    data[4] ^= 0x01  # still a valid id: only the checksum can see it
    (d / "shard-00000.bin").write_bytes(bytes(data))
    monkeypatch.setenv("BAICHUAN2_VERIFY_CHECKSUMS", "0")
    _all_rows(PackedDataset(str(d), seq_len=32, seed=0))
    monkeypatch.delenv("BAICHUAN2_VERIFY_CHECKSUMS")
    with pytest.raises(InputError, match="checksum mismatch"):
        _all_rows(PackedDataset(str(d), seq_len=32, seed=0))
