"""Every table the data pipeline writes, in one place.

``OUTPUT_SCHEMA`` is the contract with the tokenizer (``baichuan2 tokenizer encode`` reads ``text``,
``source``, ``doc_id``, ``weight`` and ``lang`` - ``CARRIED_COLUMNS`` - from ``output/part-*.parquet``);
``REJECT_SCHEMA`` is what a user reads in ``rejects/``; the rest are the intermediate tables in
``work/`` that one stage hands to the next.
"""

from __future__ import annotations

import pyarrow as pa

OUTPUT_SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("doc_id", pa.string()),
                           ("cluster_id", pa.int64()), ("dup_count", pa.int64()), ("quality", pa.float64()),
                           ("weight", pa.float64()), ("lang", pa.string()), ("semantic_cluster", pa.int64()),
                           ("semantic_distance", pa.float64())])
# Columns of OUTPUT_SCHEMA that readers carry along with the text (the rest is for analysis).
CARRIED_COLUMNS = ("source", "doc_id", "weight", "lang")

REJECT_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("step", pa.string()),
                           ("reason", pa.string()), ("kind", pa.string()), ("cluster_id", pa.int64()),
                           ("detail", pa.string()), ("text", pa.string())])

# work/filtered-*: documents that passed the per-document filters, with their exact-dedup hashes.
FILTERED_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string()),
                             ("lang", pa.string()), ("quality", pa.float64()), ("upsample", pa.bool_()),
                             ("doc_hash", pa.uint64()), ("para_hashes", pa.list_(pa.uint64())),
                             ("sent_hashes", pa.list_(pa.uint64()))])

# work/clusters: one row per filtered document (corpus order): its near-dup cluster and the spans to cut.
CLUSTERS_SCHEMA = pa.schema([("task", pa.int32()), ("row", pa.int64()), ("cluster_id", pa.int64()),
                             ("dup_count", pa.int64()), ("reason", pa.string()),
                             ("drop_para", pa.list_(pa.int32())), ("drop_para_owner", pa.list_(pa.int64())),
                             ("drop_sent", pa.list_(pa.int32())), ("drop_sent_owner", pa.list_(pa.int64()))])

# work/deduped-*: documents after dedup and span cuts.
DEDUPED_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string()),
                            ("lang", pa.string()), ("quality", pa.float64()), ("upsample", pa.bool_()),
                            ("cluster_id", pa.int64()), ("dup_count", pa.int64())])

# work/semantic: one row per deduplicated document (corpus order).
SEMANTIC_SCHEMA = pa.schema([("semantic_cluster", pa.int64()), ("semantic_distance", pa.float64()),
                             ("semantic_keep", pa.bool_()), ("semantic_dup_of", pa.int64()),
                             ("semantic_cluster_size", pa.int64())])
