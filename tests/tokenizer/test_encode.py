"""Token shards: parallel encoding, resumption after a kill, manifest, weights from the data pipeline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baichuan2.tokenizer import Tokenizer
from baichuan2.tokenizer.encode import encode_corpus
from baichuan2.tokenizer.shards import TokenShards, shard_prefixes
from baichuan2.utils.io import InputError


def shard_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*"))}


def test_encode_contents_manifest_and_weights(tiny_tokenizer_dir, tmp_path):
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    texts = ["第一篇文档。", "second document\nwith two lines", "", "x = 1\n    y = 2"]
    table = pa.table({"text": texts, "source": ["zh", "web", "web", "code"], "doc_id": ["a", "b", "c", "d"],
                      "weight": [2.0, 0.5, 1.0, 1.5], "cluster_id": [0, 1, 2, 3]})
    pq.write_table(table, tmp_path / "clean.parquet")
    manifest = encode_corpus([str(tmp_path / "clean.parquet")], str(tmp_path / "out"), str(tiny_tokenizer_dir),
                             docs_per_shard=2, workers=2)
    shards = TokenShards(tmp_path / "out")
    assert len(shards) == 3  # the empty document is skipped
    kept = [t for t in texts if t]
    for i, text in enumerate(kept):
        doc = shards.doc(i)
        assert doc[-1] == tok.eos_id and list(doc[:-1]) == tok.encode(text)
    assert shards.weights.tolist() == [2.0, 0.5, 1.5]
    assert shards.sources == ["zh", "web", "code"]
    assert manifest["total_docs"] == 3 and manifest["total_tokens"] == int(shards.lengths.sum())
    assert manifest["sources"]["web"]["bytes"] == len(texts[1].encode())
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size


def _corpus(path, n=3000):
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"document {i}: " + "lorem ipsum dolor sit amet 中文 " * (i % 40 + 1)},
                                ensure_ascii=False) + "\n")


def test_kill_mid_run_then_resume_equals_uninterrupted(tiny_tokenizer_dir, tmp_path):
    corpus = tmp_path / "c.jsonl"
    _corpus(corpus)
    clean = tmp_path / "clean"
    encode_corpus([str(corpus)], str(clean), str(tiny_tokenizer_dir), docs_per_shard=40, workers=2)
    expected = shard_bytes(clean)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "baichuan2.cli", "tokenizer", "encode", str(corpus), str(out),
           str(tiny_tokenizer_dir), "--docs_per_shard", "40", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.idx.parquet"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: main process and its workers
    proc.wait()
    finished = len(shard_prefixes(out))
    assert 0 < finished < len(expected) // 2, "the kill should land mid-run"
    for prefix in shard_prefixes(out):  # every shard that counts is complete and correct
        for suffix in (".bin", ".idx.parquet"):
            name = prefix.name + suffix
            assert (out / name).read_bytes() == expected[name]
    manifest = encode_corpus([str(corpus)], str(out), str(tiny_tokenizer_dir), docs_per_shard=40, workers=2)
    assert manifest["resumed_shards"] >= finished
    assert shard_bytes(out) == expected
    assert not list(out.glob(".*.tmp"))


def test_resuming_with_other_settings_is_refused(tiny_tokenizer_dir, tmp_path):
    corpus = tmp_path / "c.jsonl"
    _corpus(corpus, 50)
    encode_corpus([str(corpus)], str(tmp_path / "o"), str(tiny_tokenizer_dir), docs_per_shard=10, workers=1)
    with pytest.raises(InputError, match="different run"):
        encode_corpus([str(corpus)], str(tmp_path / "o"), str(tiny_tokenizer_dir), docs_per_shard=20, workers=1)


def test_malformed_input_names_file_and_line(tiny_tokenizer_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong field"}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        encode_corpus([str(bad)], str(tmp_path / "o"), str(tiny_tokenizer_dir), workers=1)


def test_compressed_and_text_inputs(tiny_tokenizer_dir, tmp_path):
    import gzip

    import zstandard

    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"content": "gzip doc"}) + "\n")
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        (json.dumps({"content": "zstd doc"}) + "\n").encode()))
    m = encode_corpus([f"web={tmp_path}/*.jsonl.*"], str(tmp_path / "o"), str(tiny_tokenizer_dir),
                      text_field="content", workers=1)
    assert m["total_docs"] == 2 and set(m["sources"]) == {"web"}
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    shards = TokenShards(tmp_path / "o")
    assert tok.decode(shards.doc(0)[:-1].tolist()) == "gzip doc"
    assert np.all(shards.lengths > 1)
