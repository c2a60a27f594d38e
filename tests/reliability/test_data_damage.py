"""Damaged data must not kill a data run (issue 14.4): truncated archives, giant documents, kill -9."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pyarrow.dataset as ds

from baichuan2.data.embed import EmbedArgs
from baichuan2.data.pipeline import DataRecipe, run_pipeline
from baichuan2.data.readers import InputSpec, read_records
from tests.reliability.procs import alive, pool_workers

SRC = Path(__import__("baichuan2").__file__).resolve().parents[1]  # the sources under test


def _docs(n: int, tag: str) -> list[str]:
    return [json.dumps({"text": f"Document {i} of the {tag} set talks about rivers, hills and the weather in "
                                f"spring number {i * 7919 % 10007}, with enough words to pass the filters."})
            for i in range(n)]


def _recipe(inputs, out) -> DataRecipe:
    return DataRecipe(inputs=inputs, out_dir=str(out), workers=1, embed=EmbedArgs(enabled=False))


def _rows(path: Path) -> list[dict]:
    files = sorted(path.glob("*.parquet"))
    return ds.dataset(files, format="parquet").to_table().to_pylist() if files else []


def test_truncated_gzip_keeps_its_readable_records_and_the_run_finishes(tmp_path):
    lines = _docs(400, "gz")
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    bad = tmp_path / "broken.jsonl.gz"
    bad.write_bytes(blob[: len(blob) * 2 // 3])  # cut mid-stream: EOFError in gzip today
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(_docs(5, "plain")) + "\n")
    report = run_pipeline(_recipe([str(bad), str(good)], tmp_path / "run"), report=False)
    out = _rows(tmp_path / "run" / "output")
    from_bad = [r for r in out if r["doc_id"].startswith("broken.jsonl.gz:")]
    assert 0 < len(from_bad) < 400 and sum(r["doc_id"].startswith("good.jsonl:") for r in out) == 5
    damaged = [r for r in _rows(tmp_path / "run" / "rejects") if r["reason"].startswith("damaged_file")]
    assert len(damaged) == 1 and "broken.jsonl.gz" in damaged[0]["reason"]
    assert "uncompressed byte" in damaged[0]["reason"]
    offset = int(damaged[0]["reason"].split("uncompressed byte ")[1].split()[0])
    assert offset > 0 and report["steps"]["read"]["reasons"]["damaged_file"] == 1


def test_corrupt_zstd_is_a_reject_too(tmp_path):
    import zstandard

    blob = zstandard.ZstdCompressor().compress(("\n".join(_docs(50, "zst")) + "\n").encode())
    bad = tmp_path / "broken.jsonl.zst"
    bad.write_bytes(blob[:-40] + b"\x00" * 40)
    recs = list(read_records(InputSpec(bad, "web")))
    assert recs[-1].reject.startswith("damaged_file") and "broken.jsonl.zst" in recs[-1].reject


def test_giant_document_is_rejected_while_reading_in_bounded_memory(tmp_path):
    path = tmp_path / "giant.jsonl"
    with open(path, "w") as fh:
        fh.write(json.dumps({"text": "short but fine document about a lake"}) + "\n")
        fh.write('{"text": "' + "word " * 4_000_000 + '"}\n')  # 20 MB on one line
        fh.write(json.dumps({"text": "another fine document after the giant"}) + "\n")
    tracemalloc.start()
    recs = list(read_records(InputSpec(path, "web"), max_bytes=1_000_000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [r.reject.split(":")[0] if r.reject else None for r in recs] == [None, "too_long", None]
    assert recs[1].doc_id == "giant.jsonl:2" and recs[2].doc_id == "giant.jsonl:3"
    assert peak < 8_000_000, f"reading held {peak / 1e6:.1f} MB"


def test_giant_text_block_is_rejected_while_reading(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first block of text\n\n" + "x" * 3_000_000 + "\n\nlast block\r\n\r\nreally last\n")
    tracemalloc.start()
    recs = list(read_records(InputSpec(path, "notes"), max_bytes=500_000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [(r.doc_id, r.reject.split(":")[0] if r.reject else r.text) for r in recs] == [
        ("notes.txt:0", "first block of text"), ("notes.txt:1", "too_long"), ("notes.txt:2", "last block"),
        ("notes.txt:3", "really last\n")]
    assert peak < 6_000_000


def test_pipeline_rejects_the_giant_at_the_read_step(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_text("\n".join(_docs(3, "web")) + "\n" + json.dumps({"text": "long " * 300_000}) + "\n")
    r = _recipe([str(path)], tmp_path / "run")
    r.quality.max_chars = 200_000  # the reader's cap is 4 bytes per allowed character
    run_pipeline(r, report=False)
    rejects = _rows(tmp_path / "run" / "rejects")
    assert [(x["doc_id"], x["step"], x["reason"].split(":")[0]) for x in rejects] == [("web.jsonl:4", "read", "too_long")]


KILLED = """
import sys, time
from baichuan2.data.executor import LocalExecutor
LocalExecutor(2).map(time.sleep, [(120,), (120,)])
"""


def test_workers_die_with_a_killed_parent():
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", KILLED], env=env)
    try:
        deadline = time.time() + 120
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(0.2)
            workers = pool_workers(proc.pid)
        assert len(workers) == 2, "the pool never started"
        time.sleep(3)  # let them reach the task (past the initializer)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "workers outlived their parent"
    finally:
        for w in pool_workers(proc.pid):
            os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_stale_temporaries_are_cleaned_on_the_next_run(tmp_path):
    path = tmp_path / "web.jsonl"
    path.write_text("\n".join(_docs(3, "web")) + "\n")
    out = tmp_path / "run"
    run_pipeline(_recipe([str(path)], out), report=False)
    stale = [out / "work" / ".s1-00000.parquet.abc123.tmp", out / "output" / ".part-00000.parquet.x.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    run_pipeline(_recipe([str(path)], out), report=False)
    assert not list(out.rglob("*.tmp"))
