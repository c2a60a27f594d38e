"""The data pipeline: per-shard step lists, barriers for the global views, scoring; resumable and
executor-agnostic.

    filter   per input file:  read -> normalize -> language -> quality -> safety -> exact hashes -> MinHash
    clusters barrier:         exact-dedup index; LSH bands (one task per band group: bucket join, verify by
                              estimated Jaccard); connected components -> near-dup clusters with one kept
                              representative (best quality, then first); first occurrence of each paragraph
                              and sentence
    dedup    per input file:  drop duplicates -> cut duplicate spans
    semantic per input file:  embeddings; barrier: spherical k-means + SemDeDup
    weights  barrier:         sampling weights (source x quality x redundancy x density)
    write    per input file:  drop semantic duplicates -> output/part-*.parquet

Each per-file stage is a list of ``steps.Step`` objects run over batches of documents; each step keeps
its own counts and reject rows.  Stages hand their results forward as typed values (``ShardResult``,
``ClusterResult``, ``SemanticResult``); each task also writes its result as a marker file *after* its
outputs, so a killed run skips finished tasks and produces the same result.  Every removed document or
span goes to ``rejects/`` with the step, the reason and its cluster.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from baichuan2.data import schema
from baichuan2.data.embed import EmbedArgs, Encoder, kmeans, semdedup
from baichuan2.data.exact import ExactArgs, first_occurrence
from baichuan2.data.executor import make_executor
from baichuan2.data.language import LanguageArgs
from baichuan2.data.minhash import MinHashParams, band_keys, bucket_pairs, connected_components, verify_pairs
from baichuan2.data.quality import QualityArgs
from baichuan2.data.readers import InputSpec, expand_inputs, read_records
from baichuan2.data.safety import SafetyArgs
from baichuan2.data.score import ScoreArgs, sampling_weights
from baichuan2.data.steps import (CutDuplicateSpans, Doc, DropDuplicates, ExactHashes, MinHashSignatures, Normalize,
                                  QualityFilter, Read, SafetyCheck, SemanticDedup, Step, TagLanguage, merge_stats,
                                  run_steps, stack_signatures, steps_rejects, steps_stats)
from baichuan2.utils.io import InputError, atomic_open, atomic_write_json, read_json

BATCH_DOCS = 1024  # documents per step batch: bounds a task's working memory, not its results


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
        language: Language identification and which languages to keep.
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
    language: LanguageArgs = field(default_factory=LanguageArgs)
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
        sub = {"language": LanguageArgs, "quality": QualityArgs, "safety": SafetyArgs, "exact": ExactArgs,
               "minhash": MinHashParams, "embed": EmbedArgs, "score": ScoreArgs}
        for k, typ in sub.items():
            if isinstance(d.get(k), dict):
                d[k] = typ(**d[k])
        return cls(**d)


# ---------------------------------------------------------------------------------------------- layout

class Layout:
    """Where a run keeps its files: ``work/<stage>[-<task>].<ext>``, ``rejects/<stage>-<task>.parquet``,
    ``output/part-<task>.parquet``; ``work/<stage>[-<task>].done.json`` marks a finished task."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def work(self, stage: str, task: int | None = None, ext: str = "parquet") -> Path:
        return self.root / "work" / (f"{stage}.{ext}" if task is None else f"{stage}-{task:05d}.{ext}")

    def rejects(self, stage: str, task: int) -> Path:
        return self.root / "rejects" / f"{stage}-{task:05d}.parquet"

    def output(self, task: int) -> Path:
        return self.root / "output" / f"part-{task:05d}.parquet"

    def marker(self, stage: str, task: int | None = None) -> Path:
        return self.work(stage, task, "done.json")


# ---------------------------------------------------------------------------------------------- results

@dataclass
class ShardResult:
    """One per-file task: documents it passed on, its steps' counts, the language mix it saw."""

    docs: int
    steps: dict
    languages: dict = field(default_factory=dict)


@dataclass
class ClusterResult:
    docs: int
    exact_dups: int
    near_dups: int
    clusters: int
    dup_clusters: int
    verified_edges: int
    cluster_size_hist: dict


@dataclass
class SemanticResult:
    docs: int
    clusters: int
    semantic_dups: int
    enabled: bool


def _done(marker: Path, cls):
    """The result a finished task left in its marker, or None."""
    if marker.exists():
        d = read_json(marker)
        if cls is ClusterResult:
            d["cluster_size_hist"] = {int(k): v for k, v in d["cluster_size_hist"].items()}
        return cls(**d)
    return None


def _finish(marker: Path, result):
    atomic_write_json(marker, asdict(result))  # last: its existence marks the task done
    return result


def _write_table(path: Path, table: pa.Table) -> None:
    with atomic_open(path, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _write_rejects(path: Path, steps: list[Step]) -> None:
    _write_table(path, pa.Table.from_pylist(steps_rejects(steps), schema=schema.REJECT_SCHEMA))


# ---------------------------------------------------------------------------------------------- filter

def filter_steps(recipe: DataRecipe) -> list[Step]:
    return [Normalize(), TagLanguage(recipe.language), QualityFilter(recipe.quality), SafetyCheck(recipe.safety),
            ExactHashes(recipe.exact), MinHashSignatures(recipe.minhash)]


def _batches(records, size: int):
    batch = []
    for rec in records:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def filter_task(recipe_d: dict, out: str, task: int, path: str, source: str) -> ShardResult:
    layout = Layout(out)
    if done := _done(layout.marker("filtered", task), ShardResult):
        return done
    recipe = DataRecipe.from_dict(recipe_d)
    read, steps = Read(), filter_steps(recipe)
    kept: list[Doc] = []
    # The reader's cap: a document of more than 4 bytes per allowed character cannot pass the quality filter.
    records = read_records(InputSpec(Path(path), source), recipe.text_field, max_bytes=4 * recipe.quality.max_chars)
    for batch in _batches(records, BATCH_DOCS):
        kept += run_steps(steps, read.records(batch))
    cols = {name: [getattr(d, name) for d in kept] for name in ("doc_id", "source", "text", "lang", "quality",
                                                                "upsample")}
    for name in ("doc_hash", "para_hashes", "sent_hashes"):
        cols[name] = [d.meta[name] for d in kept]
    _write_rejects(layout.rejects("filter", task), [read, *steps])
    _write_npy(layout.work("signatures", task, "npy"), stack_signatures(kept, recipe.minhash.num_perm))
    _write_table(layout.work("filtered", task), pa.table(cols, schema=schema.FILTERED_SCHEMA))
    language = next(s for s in steps if isinstance(s, TagLanguage))
    return _finish(layout.marker("filtered", task),
                   ShardResult(len(kept), steps_stats([read, *steps]), dict(language.mix)))


# ---------------------------------------------------------------------------------------------- clusters

def _load_signatures(layout: Layout, tasks: int) -> np.ndarray:
    sigs = [np.load(layout.work("signatures", t, "npy"), mmap_mode="r") for t in range(tasks)]
    return np.concatenate(sigs) if sigs else np.zeros((0, 0), np.uint32)


def band_task(recipe_d: dict, out: str, tasks: int, bands: list[int]) -> np.ndarray:
    """Verified candidate edges (global ids) from the given LSH bands."""
    params = DataRecipe.from_dict(recipe_d).minhash
    layout = Layout(out)
    sig = _load_signatures(layout, tasks)
    ids = np.flatnonzero(np.load(layout.work("unique", ext="npy")))  # exact duplicates already joined
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


def _representatives(labels: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Each document's cluster representative: best quality, then earliest."""
    n = len(labels)
    if not n:
        return np.zeros(0, np.int64)
    g = np.arange(n)
    order = np.lexsort((g, -quality, labels))
    first = np.concatenate([[True], labels[order][1:] != labels[order][:-1]])
    rep_of_label = dict(zip(labels[order][first].tolist(), order[first].tolist()))
    return np.array([rep_of_label[x] for x in labels.tolist()], dtype=np.int64)


def _span_drops(tables: list[pa.Table], kept: np.ndarray, unit: str) -> dict[str, pa.Array]:
    """Paragraphs/sentences of kept documents that occurred earlier in the corpus: index and owner per doc."""
    n = len(kept)
    lists = [x for t in tables for x in t[f"{unit}_hashes"].to_pylist()]
    lists = [x if k else [] for x, k in zip(lists, kept)]
    sg, sidx, sh, first_span = _span_first(lists, np.arange(n, dtype=np.int64))
    drop = (first_span != np.arange(len(sg))) & (sh != 0)
    owner = sg[first_span]
    per_doc_idx: list[list[int]] = [[] for _ in range(n)]
    per_doc_owner: list[list[int]] = [[] for _ in range(n)]
    for d, i, o in zip(sg[drop].tolist(), sidx[drop].tolist(), owner[drop].tolist()):
        per_doc_idx[d].append(i)
        per_doc_owner[d].append(o)
    return {f"drop_{unit}": pa.array(per_doc_idx, pa.list_(pa.int32())),
            f"drop_{unit}_owner": pa.array(per_doc_owner, pa.list_(pa.int64()))}


def cluster_duplicates(recipe: DataRecipe, layout: Layout, tasks: int, executor) -> ClusterResult:
    """Barrier: the global exact-dedup index, the LSH bucket join and the span first-occurrence index."""
    if done := _done(layout.marker("clusters"), ClusterResult):
        return done
    tables = [pq.read_table(layout.work("filtered", t), columns=["quality", "doc_hash", "para_hashes", "sent_hashes"])
              for t in range(tasks)]
    task_of = np.concatenate([np.full(len(t), i) for i, t in enumerate(tables)] or [np.zeros(0, np.int64)])
    row_of = np.concatenate([np.arange(len(t)) for t in tables] or [np.zeros(0, np.int64)])
    n = len(task_of)
    g = np.arange(n, dtype=np.int64)
    quality = np.concatenate([t["quality"].to_numpy() for t in tables] or [np.zeros(0)])
    doc_hash = np.concatenate([t["doc_hash"].to_numpy() for t in tables] or [np.zeros(0, np.uint64)])
    first = first_occurrence(doc_hash, g) if recipe.exact.documents else g
    exact_dup = first != g
    _write_npy(layout.work("unique", ext="npy"), ~exact_dup)
    edges = [np.stack([g[exact_dup], first[exact_dup]], axis=1)]
    if recipe.minhash.enabled:
        n_groups = max(1, min(recipe.workers, recipe.minhash.bands))
        groups = [list(range(b, recipe.minhash.bands, n_groups)) for b in range(n_groups)]
        recipe_d = asdict(recipe)
        edges += executor.map(band_task, [(recipe_d, str(layout.root), tasks, grp) for grp in groups], desc="lsh bands")
    edges = np.concatenate(edges) if n else np.zeros((0, 2), np.int64)
    rep = _representatives(connected_components(n, edges), quality)
    sizes = np.bincount(rep, minlength=n) if n else np.zeros(0, np.int64)
    removed = rep != g
    reason = np.where(removed, np.where(exact_dup, "exact_dup", "near_dup"), "")
    spans = {**_span_drops(tables, ~removed, "para"), **_span_drops(tables, ~removed, "sent")}
    _write_table(layout.work("clusters"), pa.table({
        "task": pa.array(task_of, pa.int32()), "row": pa.array(row_of, pa.int64()),
        "cluster_id": pa.array(rep, pa.int64()), "dup_count": pa.array(sizes[rep], pa.int64()),
        "reason": pa.array(reason.tolist(), pa.string()), **spans}, schema=schema.CLUSTERS_SCHEMA))
    cluster_sizes = sizes[sizes > 0]
    return _finish(layout.marker("clusters"), ClusterResult(
        docs=int(n), exact_dups=int(exact_dup.sum()), near_dups=int((removed & ~exact_dup).sum()),
        clusters=int(len(cluster_sizes)), dup_clusters=int((cluster_sizes > 1).sum()), verified_edges=int(len(edges)),
        cluster_size_hist={int(k): int(v) for k, v in zip(*np.unique(cluster_sizes, return_counts=True))}))


# ---------------------------------------------------------------------------------------------- dedup

def dedup_task(recipe_d: dict, out: str, task: int) -> ShardResult:
    layout = Layout(out)
    if done := _done(layout.marker("deduped", task), ShardResult):
        return done
    recipe = DataRecipe.from_dict(recipe_d)
    rows = pq.read_table(layout.work("filtered", task),
                         columns=["doc_id", "source", "text", "lang", "quality", "upsample"]).to_pylist()
    clusters = pq.read_table(layout.work("clusters"), filters=[("task", "=", task)]).to_pylist()
    clusters.sort(key=lambda r: r["row"])
    docs = [Doc(r["doc_id"], r["source"], r["text"], r["lang"], r["quality"], r["upsample"], {"cluster": c})
            for r, c in zip(rows, clusters)]
    steps = [DropDuplicates(), CutDuplicateSpans(recipe.exact)]
    kept = [d for start in range(0, len(docs), BATCH_DOCS) for d in run_steps(steps, docs[start:start + BATCH_DOCS])]
    _write_rejects(layout.rejects("dedup", task), steps)
    _write_table(layout.work("deduped", task), pa.Table.from_pylist(
        [{"doc_id": d.doc_id, "source": d.source, "text": d.text, "lang": d.lang, "quality": d.quality,
          "upsample": d.upsample, "cluster_id": d.meta["cluster"]["cluster_id"],
          "dup_count": d.meta["cluster"]["dup_count"]} for d in kept], schema=schema.DEDUPED_SCHEMA))
    return _finish(layout.marker("deduped", task), ShardResult(len(kept), steps_stats(steps)))


# ---------------------------------------------------------------------------------------------- semantic

def _embed_chunks(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(task, start, stop) pieces of every file's documents: the embedding bar then advances (and estimates the
    time left) every few hundred documents, not once per file; at most ~32 pieces a file, each reading its file."""
    chunks = []
    for task, n in enumerate(sizes):
        step = max(256, -(-n // 32))
        chunks += [(task, start, min(start + step, n)) for start in range(0, n, step)]
    return chunks


_ENCODERS: dict[tuple, Encoder] = {}  # one loaded model per worker process, reused by its chunks


def embed_task(recipe_d: dict, out: str, task: int, start: int, stop: int) -> int:
    layout = Layout(out)
    path = layout.work(f"embeddings-{task:05d}", start, "npy")
    if path.exists():
        return int(np.load(path, mmap_mode="r").shape[0])
    args = DataRecipe.from_dict(recipe_d).embed
    texts = pq.read_table(layout.work("deduped", task), columns=["text"])["text"].to_pylist()[start:stop]
    key = (args.encoder, args.batch_size, args.max_chars)
    encoder = _ENCODERS.setdefault(key, Encoder(*key))
    _write_npy(path, encoder.encode(texts).astype(np.float32))
    return len(texts)


def cluster_semantic(recipe: DataRecipe, layout: Layout, sizes: list[int], executor) -> SemanticResult:
    """Barrier: k-means over every document's embedding, then SemDeDup inside each cluster."""
    if done := _done(layout.marker("semantic"), SemanticResult):
        return done
    n = sum(sizes)
    if recipe.embed.enabled and n:
        chunks = _embed_chunks(sizes)
        executor.map(embed_task, [(asdict(recipe), str(layout.root), *c) for c in chunks], desc="embed",
                     units=[stop - start for _, start, stop in chunks], unit="doc")
        _ENCODERS.clear()  # inline runs loaded the encoder here
        emb = np.concatenate([np.load(layout.work(f"embeddings-{t:05d}", start, "npy")) for t, start, _ in chunks])
        centroids, assign = kmeans(emb, recipe.embed.clusters, recipe.embed.iterations, recipe.embed.seed)
        keep, dup_of, dist = semdedup(emb, centroids, assign, recipe.embed.semdedup_eps)
    else:
        assign, keep, dup_of, dist = (np.zeros(n, np.int64), np.ones(n, bool), np.full(n, -1, np.int64), np.zeros(n))
    cluster_size = np.bincount(assign, minlength=int(assign.max()) + 1 if n else 1)[assign] if n else np.zeros(0)
    _write_table(layout.work("semantic"), pa.table({
        "semantic_cluster": pa.array(assign, pa.int64()), "semantic_distance": pa.array(dist, pa.float64()),
        "semantic_keep": pa.array(keep, pa.bool_()), "semantic_dup_of": pa.array(dup_of, pa.int64()),
        "semantic_cluster_size": pa.array(cluster_size, pa.int64())}, schema=schema.SEMANTIC_SCHEMA))
    return _finish(layout.marker("semantic"), SemanticResult(
        docs=int(n), clusters=int(len(np.unique(assign))) if n else 0, semantic_dups=int((~keep).sum()),
        enabled=recipe.embed.enabled))


# ---------------------------------------------------------------------------------------------- weights + write

def score_documents(recipe: DataRecipe, layout: Layout, tasks: int) -> None:
    """Barrier: sampling weights need corpus-wide means (cluster sizes, normalisation)."""
    path = layout.work("weights", ext="npy")
    if path.exists():
        return
    sem = pq.read_table(layout.work("semantic"))
    docs = pa.concat_tables([pq.read_table(layout.work("deduped", t), columns=["source", "quality", "upsample",
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


def write_task(recipe_d: dict, out: str, task: int, offset: int, tasks: int) -> ShardResult:
    layout = Layout(out)
    if done := _done(layout.marker("written", task), ShardResult):
        return done
    rows = pq.read_table(layout.work("deduped", task)).to_pylist()
    sem = pq.read_table(layout.work("semantic")).slice(offset, len(rows)).to_pylist()
    weights = np.load(layout.work("weights", ext="npy"))[offset:offset + len(rows)]
    if any(not s["semantic_keep"] for s in sem):  # name what a removed document duplicates
        all_ids = pa.concat_tables([pq.read_table(layout.work("deduped", t), columns=["doc_id"])
                                    for t in range(tasks)])["doc_id"].to_pylist()
        for s in sem:
            s["dup_of_doc_id"] = all_ids[s["semantic_dup_of"]] if not s["semantic_keep"] else None
    docs = [Doc(r["doc_id"], r["source"], r["text"], r["lang"], r["quality"], r["upsample"],
                {"semantic": s, "weight": float(w), "cluster_id": r["cluster_id"], "dup_count": r["dup_count"]})
            for r, s, w in zip(rows, sem, weights)]
    steps = [SemanticDedup()]
    kept = run_steps(steps, docs)
    _write_rejects(layout.rejects("semantic", task), steps)
    _write_table(layout.output(task), pa.Table.from_pylist(
        [{"text": d.text, "source": d.source, "doc_id": d.doc_id, "cluster_id": d.meta["cluster_id"],
          "dup_count": d.meta["dup_count"], "quality": d.quality, "weight": d.meta["weight"], "lang": d.lang,
          "semantic_cluster": d.meta["semantic"]["semantic_cluster"],
          "semantic_distance": d.meta["semantic"]["semantic_distance"]} for d in kept], schema=schema.OUTPUT_SCHEMA))
    return _finish(layout.marker("written", task), ShardResult(len(kept), steps_stats(steps)))


# ---------------------------------------------------------------------------------------------- driver

def prepare_out_dir(recipe: DataRecipe, overwrite: bool = False) -> Layout:
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
    for directory in (out, out / "work", out / "output", out / "rejects"):
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
    if not marker.exists():
        atomic_write_json(marker, {"fingerprint": fingerprint, "recipe": asdict(recipe)})
    return Layout(out)


def _say(message: str) -> None:
    print(f"data: {message}", flush=True)


def run_pipeline(recipe: DataRecipe, overwrite: bool = False, report: bool = True) -> dict:
    """Run (or resume) all stages; returns the report dictionary."""
    specs = expand_inputs(recipe.inputs)
    layout = prepare_out_dir(recipe, overwrite)
    tasks_file = layout.work("tasks", ext="json")
    task_list = [{"path": str(s.path), "source": s.source} for s in specs]
    if tasks_file.exists() and read_json(tasks_file) != task_list:
        raise InputError(f"{layout.root}: the input file list changed since this run started; use --overwrite true")
    atomic_write_json(tasks_file, task_list)
    executor = make_executor(recipe.executor, recipe.workers, recipe.ray_address)
    rd, out, nt = asdict(recipe), str(layout.root), len(task_list)
    # one line per phase (the barriers have no bar of their own), so a long phase is never a silent one
    _say(f"filter {nt} files: read, normalise, language, quality, safety, hashes, MinHash")
    filtered: list[ShardResult] = executor.map(
        filter_task, [(rd, out, i, t["path"], t["source"]) for i, t in enumerate(task_list)], desc="filter")
    _say(f"{sum(r.docs for r in filtered):,} documents passed the filters; exact index and LSH near-duplicate join")
    clusters = cluster_duplicates(recipe, layout, nt, executor)
    _say(f"{clusters.exact_dups:,} exact and {clusters.near_dups:,} near duplicates; removing them and repeated spans")
    deduped: list[ShardResult] = executor.map(dedup_task, [(rd, out, i) for i in range(nt)], desc="dedup")
    sizes = [r.docs for r in deduped]
    if recipe.embed.enabled:
        _say(f"semantic dedup of {sum(sizes):,} documents: {recipe.embed.encoder} embeddings, k-means, SemDeDup")
    semantic = cluster_semantic(recipe, layout, sizes, executor)
    _say(f"{semantic.semantic_dups:,} semantic duplicates; sampling weights, then writing the output"
         if semantic.enabled else "sampling weights, then writing the output")
    score_documents(recipe, layout, nt)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist() if nt else []
    written: list[ShardResult] = executor.map(write_task, [(rd, out, i, offsets[i], nt) for i in range(nt)],
                                              desc="score/write")
    languages = Counter()
    for r in filtered:
        languages.update(r.languages)
    summary = {"steps": merge_stats([r.steps for r in filtered + deduped + written]), "minhash": asdict(clusters),
               "semantic": asdict(semantic), "tasks": nt, "languages_tagged": dict(languages.most_common())}
    if report:
        from baichuan2.data.report import write_report

        return write_report(out, summary)
    return summary
