"""Issue 14, item 4 (the tokenizer part): after kill -9 of `tokenizer encode` its workers die too, and the
next run cleans the temporary files and finishes with every shard intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from baichuan2.tokenizer.shards import TokenShards
from tests.conftest import shared_path
from tests.reliability.procs import alive, pool_workers

REPO = Path(__file__).resolve().parents[2]


def _write_corpus(path: Path, docs: int, repeat: int) -> Path:
    paragraph = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 " * repeat
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(docs):
            fh.write(json.dumps({"text": f"{i} {paragraph}"}, ensure_ascii=False) + "\n")
    return path


def _encode_argv(corpus: Path, out: Path, docs_per_shard: int) -> list[str]:
    return [sys.executable, "-m", "baichuan2.cli", "tokenizer", "encode", str(corpus), str(out),
            str(shared_path("baichuan2-tokenizer")), "--docs_per_shard", str(docs_per_shard), "--workers", "2"]


ENV = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_encode(tmp_path):
    # 2 shards of ~8 MB: each worker is seconds into its shard when the parent is killed
    corpus = _write_corpus(tmp_path / "corpus.jsonl", docs=40, repeat=5000)
    proc = subprocess.Popen(_encode_argv(corpus, tmp_path / "shards", 20), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            workers = pool_workers(proc.pid)
        assert len(workers) == 2, "the encode workers never started"
        time.sleep(1.5)  # they load the tokenizer and start encoding their shards
        assert proc.poll() is None, "encode finished before it could be killed; make the corpus larger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 2.5  # the watchdog polls every second; PR_SET_PDEATHSIG is immediate
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [p for p in workers if alive(p)]
        assert not survivors, f"{len(survivors)} of {len(workers)} workers outlived the killed encode"
    finally:
        for pid in workers:  # never leave our own strays behind, whatever happened above
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_rerun_cleans_temporary_files_of_a_killed_run(tmp_path):
    from baichuan2.tokenizer.encode import encode_corpus

    corpus = _write_corpus(tmp_path / "corpus.jsonl", docs=30, repeat=5)
    out = tmp_path / "shards"
    tokenizer = str(shared_path("baichuan2-tokenizer"))
    encode_corpus(str(corpus), str(out), tokenizer, docs_per_shard=10, workers=1)
    # what a run killed mid-write leaves behind (utils.io.atomic_open's temporary names), and a damaged shard
    for name in (".shard-00002.bin.k1ll3d.tmp", ".shard-00002.idx.parquet.k1ll3d.tmp", ".manifest.json.k1ll3d.tmp"):
        (out / name).write_bytes(b"partial")
    data = bytearray((out / "shard-00001.bin").read_bytes())
    data[8] ^= 0x01
    (out / "shard-00001.bin").write_bytes(bytes(data))
    manifest = encode_corpus(str(corpus), str(out), tokenizer, docs_per_shard=10, workers=1)
    assert manifest["resumed_shards"] == 2  # shard 1 failed its checksum and was encoded again
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    shards = TokenShards(str(out))
    assert len(shards) == 30
    for shard in shards.shards:
        shard.verify()
