"""The tokenizer's view of its input: documents from text, JSONL (.gz/.zst) and parquet files.

Every document comes out as ``{"text", "source", "doc_id", "weight"}``: parquet shards from the data
pipeline (``baichuan2.data.schema.OUTPUT_SCHEMA``) carry ``source``/``doc_id``/``weight`` columns;
other inputs get a source tag (from ``tag=path`` input specs or the file's stem), a ``file:line`` id
and weight 1.  The readers themselves live in ``baichuan2.data.readers`` (shared with the data
pipeline, which routes bad records to rejects); here a bad record is an ``InputError`` naming the
file and line.
"""

from __future__ import annotations

from baichuan2.data.readers import InputSpec, expand_inputs, iter_documents, iter_file

__all__ = ["InputSpec", "expand_inputs", "iter_documents", "iter_file"]
