"""Intermediate checkpoints (Baichuan 2 §5.6, Figure 7): every release of a run, scored on the same set.

The releases are pretraining's token-scheduled checkpoints (``<run>/release/tokens-N`` and
``release/final``, each with ``release.json`` giving ``tokens``) or any list of HF directories. Each one is
scored on held-out perplexity (text/JSONL/parquet files, e.g. the pipeline's ``split/val``) and the
multiple-choice benchmarks found under a benchmark directory, reusing the per-benchmark caches (a re-run
resumes). Output: ``checkpoints.json``, a markdown table ``checkpoints.md`` and ``checkpoints.png`` (score
vs training tokens, one line per benchmark, chance level dashed; held-out bits per byte alongside).

Call ``evaluate_checkpoints`` from Python (the pipeline's eval stage does) or ``baichuan2 eval checkpoints``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from baichuan2.eval.harness import MCArgs
from baichuan2.utils.io import InputError, atomic_write_json, atomic_write_text, read_json

MC_BENCHMARKS = {"ceval": "ceval", "cmmlu": "cmmlu", "mmlu": "mmlu", "gaokao": "gaokao-bench", "agieval": "agieval"}


def find_releases(checkpoints: str | Path | Sequence[str | Path]) -> list[dict]:
    """``[{"name", "path", "tokens"}]`` sorted by training tokens: a run directory's ``release/*`` or a list
    of checkpoint directories (tokens from their ``release.json``; the list order when they have none)."""
    if isinstance(checkpoints, (str, Path)):
        root = Path(checkpoints)
        if (root / "release").is_dir():
            dirs = [d for d in sorted((root / "release").iterdir()) if (d / "config.json").is_file()]
        elif "," in str(checkpoints):
            dirs = [Path(p) for p in str(checkpoints).split(",") if p]
        else:
            dirs = [root]
    else:
        dirs = [Path(p) for p in checkpoints]
    if not dirs:
        raise InputError(f"{checkpoints}: no released checkpoints (expected <run>/release/*/config.json)")
    out = []
    for i, d in enumerate(dirs):
        if not (d / "config.json").is_file():
            raise InputError(f"{d}: not a checkpoint directory (no config.json)")
        meta = read_json(d / "release.json") if (d / "release.json").is_file() else {}
        out.append({"name": d.name, "path": str(d), "tokens": meta.get("tokens"), "order": i})
    have_tokens = all(r["tokens"] is not None for r in out)
    out.sort(key=lambda r: (r["tokens"], r["order"]) if have_tokens else r["order"])
    if not have_tokens:
        for r in out:
            r["tokens"] = None
    return out


def present_benchmarks(bench_dir: str | Path | None, names: Sequence[str] | None = None) -> dict:
    """The multiple-choice benchmarks whose files load from ``bench_dir`` ({name: Benchmark})."""
    from baichuan2.eval.tasks import load_benchmark

    if not bench_dir:
        return {}
    found = {}
    for name in names or MC_BENCHMARKS:
        if name not in MC_BENCHMARKS:
            raise InputError(f"unknown benchmark {name!r}; choose from {', '.join(MC_BENCHMARKS)}")
        folder = Path(bench_dir) / MC_BENCHMARKS[name]
        if not folder.exists():
            folder = Path(bench_dir) / name
        try:
            found[name] = load_benchmark(name, str(folder))
        except InputError:
            if names:  # asked for by name: say why it cannot run
                raise
    return found


def chance_level(bench) -> float:
    """Expected accuracy (%) of uniform guessing over the benchmark's items."""
    items = [it for s in bench.subjects.values() for it in s.test]
    return 100 * sum(1 / len(it.choices) for it in items) / max(len(items), 1)


def evaluate_checkpoints(checkpoints: str | Path | Sequence[str | Path], out_dir: str | Path,
                         bench_dir: str | Path | None = None, benchmarks: Sequence[str] | None = None,
                         heldout: str | Sequence[str] | None = None, mc: MCArgs = MCArgs(),
                         ppl_max_tokens: int = 20_000, dtype: str = "auto", device: str = "auto",
                         progress: bool = True) -> dict:
    """Score every release; write ``checkpoints.json``/``.md``/``.png`` in ``out_dir``; return the table."""
    from baichuan2.eval.harness import evaluate_mc
    from baichuan2.eval.perplexity import perplexity
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer
    from baichuan2.tokenizer.corpus import iter_documents

    releases = find_releases(checkpoints)
    benches = present_benchmarks(bench_dir, benchmarks)
    if not benches and not heldout:
        raise InputError("nothing to evaluate: give held-out text files and/or a directory with MC benchmarks")
    texts = [d["text"] for d in iter_documents(heldout)] if heldout else []
    out = Path(out_dir)
    rows = []
    for r in releases:
        model, tok = load_pretrained(r["path"], dtype=dtype, device=device).eval(), Tokenizer.from_pretrained(r["path"])
        row = {"name": r["name"], "path": r["path"], "tokens": r["tokens"]}
        if texts:
            ppl = perplexity(model, tok, texts, batch_size=mc.batch_size, max_tokens=ppl_max_tokens, bos=mc.bos)
            row["heldout"] = {k: ppl[k] for k in ("perplexity", "bits_per_byte", "tokens")}
        for name, bench in benches.items():
            res = evaluate_mc(model, tok, bench, mc, out / r["name"] / name, progress=progress)
            row[name] = {k: res[k] for k in ("accuracy", "macro_accuracy", "n", "mean_shots")}
        rows.append(row)
        del model
    table = {"releases": rows, "benchmarks": list(benches), "chance": {k: chance_level(b) for k, b in benches.items()},
             "settings": {"shots": mc.shots, "mode": mc.mode, "limit": mc.limit, "bos": mc.bos}}
    atomic_write_json(out / "checkpoints.json", table)
    atomic_write_text(out / "checkpoints.md", format_table(table) + "\n")
    plot_checkpoints(table, out / "checkpoints.png")
    return table


def format_table(table: dict) -> str:
    names = table["benchmarks"]
    ppl = any("heldout" in r for r in table["releases"])
    head = ["checkpoint", "tokens"] + (["held-out ppl", "bits/byte"] if ppl else []) + [f"{n} acc %" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["releases"]:
        cells = [r["name"], f"{r['tokens']:,}" if r["tokens"] is not None else "-"]
        if ppl:
            h = r.get("heldout", {})
            cells += [f"{h['perplexity']:.2f}", f"{h['bits_per_byte']:.4f}"] if h else ["-", "-"]
        cells += [f"{r[n]['accuracy']:.2f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    if names:
        lines.append("| chance | | " + ("| | " if ppl else "") + " | ".join(f"{table['chance'][n]:.2f}" for n in names)
                     + " |")
    return "\n".join(lines)


def plot_checkpoints(table: dict, path: str | Path) -> None:
    """Figure 7 style: accuracy vs training tokens per benchmark, chance dashed; held-out bits/byte beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["releases"]
    tokens = [r["tokens"] for r in rows]
    by_tokens = all(t is not None for t in tokens)
    x = tokens if by_tokens else list(range(1, len(rows) + 1))
    has_ppl = any("heldout" in r for r in rows)
    panels = (1 if table["benchmarks"] else 0) + has_ppl
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if table["benchmarks"]:
        ax = axes.pop(0)
        for i, name in enumerate(table["benchmarks"]):
            ax.plot(x, [r[name]["accuracy"] for r in rows], "o-", color=f"C{i}", label=name.upper())
        for level in sorted({round(v, 2) for v in table["chance"].values()}):  # one line per distinct level
            ax.axhline(level, color="0.4", ls="--", lw=1)
            ax.annotate(f"chance {level:.1f}%", (0.99, level), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", fontsize=8, color="0.3")
        ax.set_ylabel(f"accuracy % ({table['settings']['shots']}-shot)")
        ax.set_title("Benchmarks across training")
        ax.legend()
        ax.grid(alpha=0.3)
        _x_axis(ax, by_tokens, rows)
    if has_ppl:
        ax = axes.pop(0)
        pts = [(xi, r["heldout"]["bits_per_byte"]) for xi, r in zip(x, rows, strict=True) if "heldout" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C7")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title("Held-out loss across training")
        ax.grid(alpha=0.3)
        _x_axis(ax, by_tokens, rows)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _x_axis(ax, by_tokens: bool, rows: list[dict]) -> None:
    if by_tokens:
        from matplotlib.ticker import FuncFormatter

        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(FuncFormatter(_human_tokens))
    else:
        ax.set_xlabel("checkpoint")
        ax.set_xticks(range(1, len(rows) + 1), [r["name"] for r in rows], rotation=30, ha="right")


def _human_tokens(value: float, _pos=None) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"
