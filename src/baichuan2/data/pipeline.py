"""The data pipeline: per-shard steps, global dedup/clustering, scoring; resumable and executor-agnostic.

Stages (``work/`` holds intermediate files, each written atomically; a stage's task is skipped when its
final file exists, so a killed run resumes where it stopped and produces the same result):

1. per input file: read -> normalise -> language id -> quality filter -> safety filter -> exact-dedup
   hashes (document, paragraphs, sentences) + MinHash signature;
2. global: exact document dedup; LSH bands (one task per band: sort the band's keys, pair bucket members
   with their anchor, verify by estimated Jaccard); connected components -> near-dup clusters, one kept
   representative each (best quality, then first); first-occurrence resolution of paragraph/sentence spans;
3. per input file: apply document removals and span cuts;
4. per input file: dense embeddings; then global spherical k-means + SemDeDup;
5. global: sampling weights; per input file: write ``output/part-*.parquet`` and the rejects.

Every removed document or span goes to ``rejects/`` with the step, the reason and its cluster.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from baichuan2.data.embed import EmbedArgs, Encoder, kmeans, semdedup
from baichuan2.data.exact import ExactArgs, document_hashes, first_occurrence
from baichuan2.data.executor import make_executor
from baichuan2.data.minhash import MinHasher, MinHashParams, band_keys, bucket_pairs, connected_components, \
    verify_pairs
from baichuan2.data.quality import QualityArgs, check_quality
from baichuan2.data.readers import InputSpec, expand_inputs, read_records
from baichuan2.data.safety import SafetyArgs, SafetyFilter
from baichuan2.data.score import ScoreArgs, sampling_weights
from baichuan2.data.text import detect_language, normalize, paragraph_spans, remove_spans, sentence_spans
from baichuan2.utils.io import InputError, atomic_open, atomic_write_json, read_json

REJECT_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("step", pa.string()),
                           ("reason", pa.string()), ("kind", pa.string()), ("cluster_id", pa.int64()),
                           ("detail", pa.string()), ("text", pa.string())])
OUTPUT_SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("doc_id", pa.string()),
                           ("cluster_id", pa.int64()), ("dup_count", pa.int64()), ("quality", pa.float64()),
                           ("weight", pa.float64()), ("lang", pa.string()), ("semantic_cluster", pa.int64()),
                           ("semantic_distance", pa.float64())])


@dataclass
class DataRecipe:
    """A data pipeline run.

    Args:
        inputs: Input files, globs or directories; prefix ``tag=`` to set the source (``web=crawl/*.jsonl``).
        out_dir: Output directory (output/, rejects/, work/, report.*).
        text_field: JSON/parquet field holding the text.
        workers: Local worker processes (or CPUs of a local Ray cluster).
        executor: "local" (processes) or "ray".
        ray_address: Ray cluster address ("auto", "ray://head:10001"); empty starts a local cluster.
        zh_threshold: CJK share of letters above which a document is Chinese.
        quality: Heuristic quality filter thresholds.
        safety: Harmful-content filter and safety up-sampling.
        exact: Exact document/paragraph/sentence dedup.
        minhash: MinHash-LSH near-duplicate clustering.
        embed: Dense-embedding clustering and SemDeDup.
        score: Sampling-weight scoring.
    """

    inputs: list[str] = field(default_factory=list)
    out_dir: str = "runs/data"
    text_field: str = "text"
    workers: int = 2
    executor: str = "local"
    ray_address: str | None = None
    zh_threshold: float = 0.3
    quality: QualityArgs = field(default_factory=QualityArgs)
    safety: SafetyArgs = field(default_factory=SafetyArgs)
    exact: ExactArgs = field(default_factory=ExactArgs)
    minhash: MinHashParams = field(default_factory=MinHashParams)
    embed: EmbedArgs = field(default_factory=EmbedArgs)
    score: ScoreArgs = field(default_factory=ScoreArgs)

    def computation_dict(self) -> dict:
        """What determines the results (not where or how fast they are computed)."""
        d = asdict(self)
        for k in ("out_dir", "workers", "executor", "ray_address"):
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataRecipe:
        d = dict(d)
        sub = {"quality": QualityArgs, "safety": SafetyArgs, "exact": ExactArgs, "minhash": MinHashParams,
               "embed": EmbedArgs, "score": ScoreArgs}
        for k, typ in sub.items():
            if isinstance(d.get(k), dict):
                d[k] = typ(**d[k])
        return cls(**d)


# ---------------------------------------------------------------------------------------------- helpers

class Counts:
    """Per-step counts: documents in / removed per source, and removals per reason."""

    def __init__(self):
        self.data: dict = defaultdict(lambda: {"in": Counter(), "removed": Counter(), "reasons": Counter(),
                                               "spans_removed": 0, "chars_removed": 0})

    def seen(self, step: str, source: str, n: int = 1):
        self.data[step]["in"][source] += n

    def removed(self, step: str, source: str, reason: str):
        self.data[step]["removed"][source] += 1
        self.data[step]["reasons"][reason.split(":")[0]] += 1

    def span(self, step: str, reason: str, chars: int):
        self.data[step]["spans_removed"] += 1
        self.data[step]["chars_removed"] += chars
        self.data[step]["reasons"][reason] += 1

    def to_json(self) -> dict:
        return {step: {k: dict(v) if isinstance(v, Counter) else v for k, v in d.items()} for step, d in self.data.items()}


def _write_table(path: Path, table: pa.Table) -> None:
    with atomic_open(path, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _rejects_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)


def _reject(doc_id, source, step, reason, text, kind="document", cluster_id=None, detail=None) -> dict:
    return {"doc_id": doc_id, "source": source, "step": step, "reason": reason, "kind": kind,
            "cluster_id": cluster_id, "detail": detail, "text": text}


# ---------------------------------------------------------------------------------------------- stage 1

def stage1_task(recipe_d: dict, out: str, task: int, path: str, source: str) -> dict:
    work = Path(out) / "work"
    final = work / f"s1-{task:05d}.parquet"
    if final.exists():
        return read_json(work / f"s1-{task:05d}.stats.json")
    recipe = DataRecipe.from_dict(recipe_d)
    counts, rejects = Counts(), []
    safety = SafetyFilter(recipe.safety)
    kept: dict[str, list] = {k: [] for k in ("doc_id", "source", "text", "lang", "quality")}
    for rec in read_records(InputSpec(Path(path), source), recipe.text_field,
                            max_bytes=4 * recipe.quality.max_chars):
        counts.seen("read", rec.source)
        if rec.reject:
            counts.removed("read", rec.source, rec.reject)
            rejects.append(_reject(rec.doc_id, rec.source, "read", rec.reject, rec.text))
            continue
        text = normalize(rec.text)
        lang = detect_language(text, recipe.zh_threshold)
        counts.seen("quality", rec.source)
        reason, quality = None, 1.0
        if not text:
            reason = "empty"
        elif recipe.quality.enabled:
            reason, quality, _ = check_quality(text, lang, rec.source, recipe.quality)
        if reason:
            counts.removed("quality", rec.source, reason)
            rejects.append(_reject(rec.doc_id, rec.source, "quality", reason, text))
            continue
        kept["doc_id"].append(rec.doc_id)
        kept["source"].append(rec.source)
        kept["text"].append(text)
        kept["lang"].append(lang)
        kept["quality"].append(quality)
    # Safety over the batch (a classifier hook scores lists of texts).
    verdicts = safety.check(kept["text"]) if kept["text"] else []
    keep_idx = []
    for i, (reason, up) in enumerate(verdicts):
        counts.seen("safety", kept["source"][i])
        if reason:
            counts.removed("safety", kept["source"][i], reason)
            rejects.append(_reject(kept["doc_id"][i], kept["source"][i], "safety", reason, kept["text"][i]))
        else:
            keep_idx.append(i)
    cols = {k: [v[i] for i in keep_idx] for k, v in kept.items()}
    cols["upsample"] = [verdicts[i][1] for i in keep_idx]
    hashes = [document_hashes(t, s, recipe.exact) for t, s in zip(cols["text"], cols["source"])]
    cols["doc_hash"] = [h[0] for h in hashes]
    cols["para_hashes"] = [h[1] for h in hashes]
    cols["sent_hashes"] = [h[2] for h in hashes]
    sig = MinHasher(recipe.minhash).signatures(cols["text"], cols["lang"]) if cols["text"] else \
        np.zeros((0, recipe.minhash.num_perm), np.uint32)
    table = pa.table({
        "doc_id": pa.array(cols["doc_id"], pa.string()), "source": pa.array(cols["source"], pa.string()),
        "text": pa.array(cols["text"], pa.string()), "lang": pa.array(cols["lang"], pa.string()),
        "quality": pa.array(cols["quality"], pa.float64()), "upsample": pa.array(cols["upsample"], pa.bool_()),
        "doc_hash": pa.array(cols["doc_hash"], pa.uint64()),
        "para_hashes": pa.array(cols["para_hashes"], pa.list_(pa.uint64())),
        "sent_hashes": pa.array(cols["sent_hashes"], pa.list_(pa.uint64())),
    })
    stats = counts.to_json()
    _write_table(Path(out) / "rejects" / f"s1-{task:05d}.parquet", _rejects_table(rejects))
    _write_npy(work / f"s1-{task:05d}.sig.npy", sig)
    atomic_write_json(work / f"s1-{task:05d}.stats.json", stats)
    _write_table(final, table)  # last: its existence marks the task done
    return stats


# ---------------------------------------------------------------------------------------------- stage 2

def _load_signatures(out: str, tasks: int) -> np.ndarray:
    sigs = [np.load(Path(out) / "work" / f"s1-{t:05d}.sig.npy", mmap_mode="r") for t in range(tasks)]
    return np.concatenate(sigs) if sigs else np.zeros((0, 0), np.uint32)


def band_task(recipe_d: dict, out: str, tasks: int, bands: list[int]) -> np.ndarray:
    """Verified candidate edges (global ids) from the given LSH bands."""
    params = DataRecipe.from_dict(recipe_d).minhash
    sig = _load_signatures(out, tasks)
    active = np.load(Path(out) / "work" / "s2-active.npy")
    ids = np.flatnonzero(active)
    keys = band_keys(np.asarray(sig[ids]), params)
    edges = [bucket_pairs(keys[:, b], ids) for b in bands]
    edges = np.unique(np.concatenate(edges), axis=0) if edges else np.zeros((0, 2), np.int64)
    return verify_pairs(sig, edges, params) if len(edges) else edges


def _span_first(lists: list[list[int]], doc_g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flatten per-document span hashes -> (doc g, span index, hash, flat index of the first occurrence)."""
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    if lengths.sum() == 0:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.uint64), z
    g = np.repeat(doc_g, lengths)
    idx = np.concatenate([np.arange(n) for n in lengths])
    h = np.concatenate([np.asarray(x, dtype=np.uint64) for x in lists])
    return g, idx, h, first_occurrence(h, g * (1 << 24) + idx)


def stage2(recipe: DataRecipe, out: str, tasks: int, executor) -> dict:
    work = Path(out) / "work"
    final = work / "s2-assign.parquet"
    if final.exists():
        return read_json(work / "s2.stats.json")
    tables = [pq.read_table(work / f"s1-{t:05d}.parquet", columns=["source", "quality", "doc_hash", "para_hashes",
                                                                   "sent_hashes"]) for t in range(tasks)]
    task_of = np.concatenate([np.full(len(t), i) for i, t in enumerate(tables)] or [np.zeros(0, np.int64)])
    row_of = np.concatenate([np.arange(len(t)) for t in tables] or [np.zeros(0, np.int64)])
    n = len(task_of)
    g = np.arange(n, dtype=np.int64)
    quality = np.concatenate([t["quality"].to_numpy() for t in tables] or [np.zeros(0)])
    doc_hash = np.concatenate([t["doc_hash"].to_numpy() for t in tables] or [np.zeros(0, np.uint64)])
    first = first_occurrence(doc_hash, g) if recipe.exact.documents else g
    exact_dup = first != g
    _write_npy(work / "s2-active.npy", ~exact_dup)
    edges = [np.stack([g[exact_dup], first[exact_dup]], axis=1)]
    if recipe.minhash.enabled:
        groups = [list(range(b, recipe.minhash.bands, max(1, min(recipe.workers, recipe.minhash.bands))))
                  for b in range(max(1, min(recipe.workers, recipe.minhash.bands)))]
        recipe_d = asdict(recipe)
        edges += executor.map(band_task, [(recipe_d, out, tasks, grp) for grp in groups], desc="lsh bands")
    edges = np.concatenate(edges) if n else np.zeros((0, 2), np.int64)
    labels = connected_components(n, edges)
    # Representative of each cluster: best quality, then earliest; everyone else is removed.
    order = np.lexsort((g, -quality, labels))
    new = np.concatenate([[True], labels[order][1:] != labels[order][:-1]]) if n else np.zeros(0, bool)
    rep_of_label = {}
    for pos in np.flatnonzero(new):
        rep_of_label[labels[order][pos]] = order[pos]
    rep = np.array([rep_of_label[x] for x in labels], dtype=np.int64) if n else np.zeros(0, np.int64)
    sizes = np.bincount(rep, minlength=n) if n else np.zeros(0, np.int64)
    dup_count = sizes[rep]
    removed = rep != g
    reason = np.where(removed, np.where(exact_dup, "exact_dup", "near_dup"), "")
    # Spans: first occurrence among the kept documents, in corpus order.
    kept = ~removed
    span_cols = {}
    for name in ("para", "sent"):
        lists = [x for t in tables for x in t[f"{name}_hashes"].to_pylist()]
        lists = [x if k else [] for x, k in zip(lists, kept)]
        sg, sidx, sh, first_span = _span_first(lists, g)
        drop = (first_span != np.arange(len(sg))) & (sh != 0)
        owner = sg[first_span]
        per_doc_idx: list[list[int]] = [[] for _ in range(n)]
        per_doc_owner: list[list[int]] = [[] for _ in range(n)]
        for d, i, o in zip(sg[drop].tolist(), sidx[drop].tolist(), owner[drop].tolist()):
            per_doc_idx[d].append(i)
            per_doc_owner[d].append(o)
        span_cols[f"drop_{name}"] = pa.array(per_doc_idx, pa.list_(pa.int32()))
        span_cols[f"drop_{name}_owner"] = pa.array(per_doc_owner, pa.list_(pa.int64()))
    table = pa.table({"task": pa.array(task_of, pa.int32()), "row": pa.array(row_of, pa.int64()),
                      "cluster_id": pa.array(rep, pa.int64()), "dup_count": pa.array(dup_count, pa.int64()),
                      "reason": pa.array(reason.tolist(), pa.string()), **span_cols})
    cluster_sizes = sizes[sizes > 0]
    stats = {"docs": int(n), "exact_dups": int(exact_dup.sum()), "near_dups": int((removed & ~exact_dup).sum()),
             "clusters": int(len(cluster_sizes)), "dup_clusters": int((cluster_sizes > 1).sum()),
             "verified_edges": int(len(edges)),
             "cluster_size_hist": {int(k): int(v) for k, v in zip(*np.unique(cluster_sizes, return_counts=True))}}
    atomic_write_json(work / "s2.stats.json", stats)
    _write_table(final, table)
    return stats


# ---------------------------------------------------------------------------------------------- stage 3

def stage3_task(recipe_d: dict, out: str, task: int) -> dict:
    work = Path(out) / "work"
    final = work / f"s3-{task:05d}.parquet"
    if final.exists():
        return read_json(work / f"s3-{task:05d}.stats.json")
    recipe = DataRecipe.from_dict(recipe_d)
    docs = pq.read_table(work / f"s1-{task:05d}.parquet",
                         columns=["doc_id", "source", "text", "lang", "quality", "upsample"]).to_pylist()
    assign = pq.read_table(work / "s2-assign.parquet", filters=[("task", "=", task)]).to_pylist()
    assign.sort(key=lambda r: r["row"])
    counts, rejects, kept = Counts(), [], []
    for doc, a in zip(docs, assign):
        counts.seen("dedup", doc["source"])
        if a["reason"]:
            counts.removed("dedup", doc["source"], a["reason"])
            rejects.append(_reject(doc["doc_id"], doc["source"], "dedup", a["reason"], doc["text"],
                                   cluster_id=a["cluster_id"], detail=f"cluster of {a['dup_count']}"))
            continue
        text, cuts = doc["text"], []
        for name, spans_fn, reason in (("para", paragraph_spans, "dup_paragraph"),
                                       ("sent", sentence_spans, "dup_sentence")):
            if a[f"drop_{name}"]:
                spans = spans_fn(text)
                for i, owner in zip(a[f"drop_{name}"], a[f"drop_{name}_owner"]):
                    s, e = spans[i]
                    cuts.append((s, e))
                    counts.span("spans", reason, e - s)
                    rejects.append(_reject(doc["doc_id"], doc["source"], "spans", reason, text[s:e], kind=name,
                                           cluster_id=owner, detail=f"chars {s}-{e}; first seen in global doc {owner}"))
        if cuts:
            text = remove_spans(text, cuts)
            if len(text) < recipe.exact.min_chars_after:
                counts.removed("dedup", doc["source"], "too_short_after_span_dedup")
                rejects.append(_reject(doc["doc_id"], doc["source"], "dedup", "too_short_after_span_dedup", text,
                                       cluster_id=a["cluster_id"]))
                continue
        kept.append({**doc, "text": text, "cluster_id": a["cluster_id"], "dup_count": a["dup_count"]})
    table = pa.Table.from_pylist(kept, schema=pa.schema([
        ("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string()), ("lang", pa.string()),
        ("quality", pa.float64()), ("upsample", pa.bool_()), ("cluster_id", pa.int64()), ("dup_count", pa.int64())]))
    stats = counts.to_json()
    _write_table(Path(out) / "rejects" / f"s3-{task:05d}.parquet", _rejects_table(rejects))
    atomic_write_json(work / f"s3-{task:05d}.stats.json", stats)
    _write_table(final, table)
    return stats


# ---------------------------------------------------------------------------------------------- stage 4

def embed_task(recipe_d: dict, out: str, task: int) -> int:
    path = Path(out) / "work" / f"s4-{task:05d}.emb.npy"
    if path.exists():
        return int(np.load(path, mmap_mode="r").shape[0])
    args = DataRecipe.from_dict(recipe_d).embed
    texts = pq.read_table(Path(out) / "work" / f"s3-{task:05d}.parquet", columns=["text"])["text"].to_pylist()
    emb = Encoder(args.encoder, args.batch_size, args.max_chars).encode(texts) if texts else np.zeros((0, 1), np.float32)
    _write_npy(path, emb.astype(np.float32))
    return len(texts)


def stage4(recipe: DataRecipe, out: str, tasks: int, executor) -> dict:
    work = Path(out) / "work"
    final = work / "s4-semantic.parquet"
    if final.exists():
        return read_json(work / "s4.stats.json")
    sizes = [pq.read_metadata(work / f"s3-{t:05d}.parquet").num_rows for t in range(tasks)]
    n = sum(sizes)
    if recipe.embed.enabled and n:
        executor.map(embed_task, [(asdict(recipe), out, t) for t in range(tasks)], desc="embed")
        emb = np.concatenate([np.load(work / f"s4-{t:05d}.emb.npy") for t in range(tasks) if sizes[t]])
        centroids, assign = kmeans(emb, recipe.embed.clusters, recipe.embed.iterations, recipe.embed.seed)
        keep, dup_of, dist = semdedup(emb, centroids, assign, recipe.embed.semdedup_eps)
    else:
        assign, keep, dup_of, dist = (np.zeros(n, np.int64), np.ones(n, bool), np.full(n, -1, np.int64), np.zeros(n))
    cluster_size = np.bincount(assign, minlength=int(assign.max()) + 1 if n else 1)[assign] if n else np.zeros(0)
    table = pa.table({"semantic_cluster": pa.array(assign, pa.int64()), "semantic_distance": pa.array(dist, pa.float64()),
                      "semantic_keep": pa.array(keep, pa.bool_()), "semantic_dup_of": pa.array(dup_of, pa.int64()),
                      "semantic_cluster_size": pa.array(cluster_size, pa.int64())})
    stats = {"docs": int(n), "clusters": int(len(np.unique(assign))) if n else 0,
             "semantic_dups": int((~keep).sum()), "enabled": recipe.embed.enabled}
    atomic_write_json(work / "s4.stats.json", stats)
    _write_table(final, table)
    return stats


# ---------------------------------------------------------------------------------------------- stage 5

def stage5_weights(recipe: DataRecipe, out: str, tasks: int) -> None:
    work = Path(out) / "work"
    path = work / "s5-weights.npy"
    if path.exists():
        return
    sem = pq.read_table(work / "s4-semantic.parquet")
    docs = pa.concat_tables([pq.read_table(work / f"s3-{t:05d}.parquet", columns=["source", "quality", "upsample",
                                                                                "dup_count"]) for t in range(tasks)])
    keep = sem["semantic_keep"].to_numpy(zero_copy_only=False)
    w = np.zeros(len(keep))
    if keep.any():
        src = [s for s, k in zip(docs["source"].to_pylist(), keep) if k]
        w[keep] = sampling_weights(src, docs["quality"].to_numpy()[keep], docs["dup_count"].to_numpy()[keep],
                                   sem["semantic_cluster_size"].to_numpy()[keep].astype(np.float64),
                                   docs["upsample"].to_numpy(zero_copy_only=False)[keep],
                                   recipe.safety.upsample_factor, recipe.score)
    _write_npy(path, w)


def stage5_task(recipe_d: dict, out: str, task: int, offset: int) -> dict:
    work, out_p = Path(out) / "work", Path(out)
    final = out_p / "output" / f"part-{task:05d}.parquet"
    if final.exists():
        return read_json(work / f"s5-{task:05d}.stats.json")
    docs = pq.read_table(work / f"s3-{task:05d}.parquet").to_pylist()
    sem = pq.read_table(work / "s4-semantic.parquet").slice(offset, len(docs)).to_pylist()
    weights = np.load(work / "s5-weights.npy")[offset:offset + len(docs)]
    all_doc_ids = None
    counts, rejects, rows = Counts(), [], []
    for doc, s, w in zip(docs, sem, weights):
        counts.seen("semantic", doc["source"])
        if not s["semantic_keep"]:
            if all_doc_ids is None:  # lazily: only needed to name what a removed document duplicates
                all_doc_ids = pa.concat_tables([pq.read_table(work / f"s3-{t:05d}.parquet", columns=["doc_id"])
                                                for t in range(_num_tasks(out))])["doc_id"].to_pylist()
            counts.removed("semantic", doc["source"], "semantic_dup")
            rejects.append(_reject(doc["doc_id"], doc["source"], "semantic", "semantic_dup", doc["text"],
                                   cluster_id=s["semantic_cluster"],
                                   detail=f"near-identical embedding to {all_doc_ids[s['semantic_dup_of']]}"))
            continue
        rows.append({"text": doc["text"], "source": doc["source"], "doc_id": doc["doc_id"],
                     "cluster_id": doc["cluster_id"], "dup_count": doc["dup_count"], "quality": doc["quality"],
                     "weight": float(w), "lang": doc["lang"], "semantic_cluster": s["semantic_cluster"],
                     "semantic_distance": s["semantic_distance"]})
    stats = counts.to_json()
    _write_table(out_p / "rejects" / f"s5-{task:05d}.parquet", _rejects_table(rejects))
    atomic_write_json(work / f"s5-{task:05d}.stats.json", stats)
    _write_table(final, pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
    return stats


def _num_tasks(out: str) -> int:
    return len(read_json(Path(out) / "work" / "tasks.json"))


# ---------------------------------------------------------------------------------------------- driver

def _merge_counts(parts: list[dict]) -> dict:
    merged: dict = {}
    for part in parts:
        for step, d in part.items():
            m = merged.setdefault(step, {"in": Counter(), "removed": Counter(), "reasons": Counter(),
                                         "spans_removed": 0, "chars_removed": 0})
            for k in ("in", "removed", "reasons"):
                m[k].update(d.get(k, {}))
            m["spans_removed"] += d.get("spans_removed", 0)
            m["chars_removed"] += d.get("chars_removed", 0)
    return {s: {k: dict(v) if isinstance(v, Counter) else v for k, v in d.items()} for s, d in merged.items()}


def prepare_out_dir(recipe: DataRecipe, overwrite: bool = False) -> Path:
    out = Path(recipe.out_dir)
    fingerprint = hashlib.sha256(json.dumps(recipe.computation_dict(), sort_keys=True).encode()).hexdigest()
    marker = out / "recipe.json"
    if marker.exists():
        old = read_json(marker)
        if old.get("fingerprint") != fingerprint:
            if not overwrite:
                raise InputError(f"{out} holds a run with a different recipe; pass --overwrite true to replace it "
                                 "or choose another out_dir")
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not (out / "work").exists():
        if not overwrite:
            raise InputError(f"{out} exists and is not a data pipeline run; choose another out_dir")
        shutil.rmtree(out)
    for sub in ("work", "output", "rejects"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        # A killed run can leave half-written temporaries of atomic writes; they are never read, so go.
        for tmp in (out / sub).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    if not marker.exists():
        atomic_write_json(marker, {"fingerprint": fingerprint, "recipe": asdict(recipe)})
    return out


def run_pipeline(recipe: DataRecipe, overwrite: bool = False, report: bool = True) -> dict:
    """Run (or resume) all stages; returns the report dictionary."""
    specs = expand_inputs(recipe.inputs)
    out = prepare_out_dir(recipe, overwrite)
    tasks_file = out / "work" / "tasks.json"
    task_list = [{"path": str(s.path), "source": s.source} for s in specs]
    if tasks_file.exists() and read_json(tasks_file) != task_list:
        raise InputError(f"{out}: the input file list changed since this run started; use --overwrite true")
    atomic_write_json(tasks_file, task_list)
    executor = make_executor(recipe.executor, recipe.workers, recipe.ray_address)
    rd, o, nt = asdict(recipe), str(out), len(task_list)
    s1 = executor.map(stage1_task, [(rd, o, i, t["path"], t["source"]) for i, t in enumerate(task_list)],
                      desc="stage 1: read/filter/hash")
    s2 = stage2(recipe, o, nt, executor)
    s3 = executor.map(stage3_task, [(rd, o, i) for i in range(nt)], desc="stage 3: dedup")
    s4 = stage4(recipe, o, nt, executor)
    stage5_weights(recipe, o, nt)
    sizes = [pq.read_metadata(out / "work" / f"s3-{t:05d}.parquet").num_rows for t in range(nt)]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist() if nt else []
    s5 = executor.map(stage5_task, [(rd, o, i, offsets[i]) for i in range(nt)], desc="stage 5: score/write")
    summary = {"steps": _merge_counts(s1 + s3 + s5), "minhash": s2, "semantic": s4, "tasks": nt}
    if report:
        from baichuan2.data.report import write_report

        return write_report(o, summary)
    return summary
