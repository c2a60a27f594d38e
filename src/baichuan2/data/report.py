"""The run report: counts per step and source, removal reasons, cluster-size histogram, examples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from baichuan2.utils.io import atomic_open, atomic_write_json, atomic_write_text

STEP_ORDER = ["read", "language", "quality", "safety", "dedup", "spans", "semantic"]


def _plot_histogram(hist: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = {int(k): int(v) for k, v in hist.items()}
    # sizes 1-4 alone, then doubling bins (5-8, 9-16, ...): a label per bar that stays readable
    def label(size: int) -> str:
        hi = 1 << (size - 1).bit_length()
        return str(size) if size <= 4 else f"{hi // 2 + 1}–{hi}"

    bins = {label(s): 0 for s in [*range(1, 5), *(1 << k for k in range(3, max(counts).bit_length() + 1))]
            if s <= max(1 << (max(counts) - 1).bit_length(), 1)}  # empty bins shown too: the axis stays honest
    for size, n in counts.items():
        bins[label(size)] += n
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(list(bins), list(bins.values()), color="#3a6ea5")
    ax.tick_params(axis="x", labelrotation=30 if len(bins) > 8 else 0, labelsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("cluster size (documents)")
    ax.set_ylabel("clusters")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def _examples(out: Path, per_reason: int = 2, chars: int = 240) -> dict[str, list[dict]]:
    files = sorted((out / "rejects").glob("*.parquet"))
    if not files:
        return {}
    table = ds.dataset(files, format="parquet").to_table(columns=["doc_id", "step", "reason", "cluster_id", "text"])
    examples: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        key = f"{row['step']}/{row['reason'].split(':')[0]}"
        if len(examples.setdefault(key, [])) < per_reason:
            text = row["text"] or ""
            examples[key].append({"doc_id": row["doc_id"], "cluster_id": row["cluster_id"],
                                  "text": text[:chars] + ("…" if len(text) > chars else "")})
    return examples


def write_report(out_dir: str, summary: dict) -> dict:
    out = Path(out_dir)
    outputs = sorted((out / "output").glob("part-*.parquet"))
    kept_docs = sum(pq.read_metadata(f).num_rows for f in outputs)
    by_source: Counter = Counter()
    by_language: dict[str, Counter] = {}
    if outputs:
        table = ds.dataset(outputs, format="parquet").to_table(columns=["source", "lang"])
        for src, lang in zip(table["source"].to_pylist(), table["lang"].to_pylist()):
            by_source[src] += 1
            by_language.setdefault(lang, Counter())[src] += 1
    languages = sorted(by_language, key=lambda k: -sum(by_language[k].values()))
    report = {**summary, "output_docs": kept_docs, "output_by_source": dict(by_source),
              "output_by_language": {k: sum(by_language[k].values()) for k in languages},
              "output_language_by_source": {k: dict(by_language[k]) for k in languages},
              "examples": _examples(out)}
    hist = summary["minhash"].get("cluster_size_hist", {})
    if hist:
        _plot_histogram({int(k): v for k, v in hist.items()}, out / "cluster_sizes.png",
                        "MinHash near-duplicate cluster sizes")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _language_table(r: dict, max_rows: int = 20) -> list[str]:
    """Documents per language tag (rows) and source (columns) in the output."""
    mix = r.get("output_language_by_source") or {}
    if not mix:
        return []
    sources = sorted({s for per in mix.values() for s in per})
    total = max(1, r["output_docs"])
    lines = ["## Languages in the output", "", "| language | " + " | ".join(sources) + " | total | share |",
             "|---" * (len(sources) + 3) + "|"]
    rows = list(mix.items())
    if len(rows) > max_rows:  # the long tail of rare tags in one row (report.json has them all)
        tail: Counter = Counter()
        for _, per in rows[max_rows - 1:]:
            tail.update(per)
        rows = rows[:max_rows - 1] + [(f"{len(rows) - max_rows + 1} others", dict(tail))]
    for lang, per in rows:
        n = sum(per.values())
        lines.append(f"| {lang} | " + " | ".join(str(per.get(s, 0)) for s in sources) + f" | {n} | {n / total:.1%} |")
    return lines + [""]


def render_markdown(r: dict) -> str:
    lines = ["# Data pipeline report", ""]
    steps = r["steps"]
    sources = sorted({s for d in steps.values() for s in d.get("in", {})})
    lines += ["## Documents per step and source (in → removed)", "",
              "| step | " + " | ".join(sources) + " | total removed | top reasons |",
              "|---" * (len(sources) + 3) + "|"]
    for step in [s for s in STEP_ORDER if s in steps]:
        d = steps[step]
        cells = [f"{d['in'].get(s, 0)} → {d['removed'].get(s, 0)}" if d["in"] else "" for s in sources]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(d["reasons"].items(), key=lambda kv: -kv[1])[:4])
        removed = sum(d["removed"].values()) if step != "spans" else f"{d['spans_removed']} spans / {d['chars_removed']} chars"
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {removed} | {reasons} |")
    m, s = r["minhash"], r["semantic"]
    lines += ["", "## Dedup and clustering", "",
              f"- documents entering dedup: {m['docs']}",
              f"- exact duplicates removed: {m['exact_dups']}",
              f"- near duplicates removed (MinHash-LSH, verified): {m['near_dups']}",
              f"- near-dup clusters with more than one document: {m['dup_clusters']} (edges verified: {m['verified_edges']})",
              f"- semantic clusters (k-means): {s['clusters']}; SemDeDup removals: {s['semantic_dups']}",
              "", "![cluster sizes](cluster_sizes.png)" if m.get("cluster_size_hist") else "",
              "", "## Output", "", f"{r['output_docs']} documents in output/: "
              + ", ".join(f"{k} {v}" for k, v in sorted(r["output_by_source"].items())), ""]
    lines += _language_table(r)
    lines += ["## Examples of removals (full text in rejects/)", ""]
    for key, items in sorted(r["examples"].items()):
        lines.append(f"### {key}")
        for ex in items:
            text = ex["text"].replace("\n", " ⏎ ")
            lines.append(f"- `{ex['doc_id']}` (cluster {ex['cluster_id']}): {text}")
        lines.append("")
    return "\n".join(lines) + "\n"
