"""Progress that tells the truth: the embedding bar advances every few hundred documents, and token
encoding knows how many documents it has ahead of it (so its bar can say how long is left)."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq

from baichuan2.data.executor import LocalExecutor
from baichuan2.data.pipeline import _embed_chunks
from baichuan2.data.readers import expand_inputs
from baichuan2.tokenizer.encode import _count_documents


def test_embedding_work_is_cut_into_small_pieces():
    sizes = [1000, 0, 100, 20_000]
    chunks = _embed_chunks(sizes)
    for task, n in enumerate(sizes):  # every document of every file, in order, exactly once
        mine = [(a, b) for t, a, b in chunks if t == task]
        assert [i for a, b in mine for i in range(a, b)] == list(range(n))
    assert max(b - a for _, a, b in chunks if _ < 3) <= 256  # small files: a bar step every 256 documents
    assert len([c for c in chunks if c[0] == 3]) <= 32  # a big file: at most 32 reads of it


def test_executor_bar_counts_documents(monkeypatch):
    import baichuan2.data.executor as executor

    bars = []

    class Bar:
        def __init__(self, total, unit, **_):
            self.total, self.unit, self.steps = total, unit, []
            bars.append(self)

        def update(self, n=1):
            self.steps.append(n)

        def close(self):
            pass

    monkeypatch.setattr(executor, "tqdm", Bar)
    assert LocalExecutor(1).map(abs, [(1,), (-2,), (3,)], desc="embed", units=[256, 256, 88], unit="doc") == [1, 2, 3]
    assert (bars[0].total, bars[0].unit, bars[0].steps) == (600, "doc", [256, 256, 88])


def test_documents_are_counted_before_encoding(tmp_path):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(7)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))  # no newline after the last one
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": ["x"] * 5}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    assert _count_documents(expand_inputs([str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")])) == 19
    assert _count_documents(expand_inputs([str(tmp_path / "d.txt")])) is None  # only reading finds its blocks
