"""The pipeline's results page: ``summary.md`` and ``index.html``, rewritten after every stage.

Each finished stage becomes one section (Markdown text plus figures); the same sections give
``summary.md`` (for a terminal or a Git forge) and ``index.html`` (Markdown rendered by markdown-it
through the web chat's renderer, serve/markdown.py, into the Jinja template ``assets/index.html.j2``).
A stage adds a figure to its section by returning ``{"figures": [{"path": "x.png", "title": "...", "caption": "..."}]}`` (paths relative
to the run directory) in its result; the stage functions here add the standard ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from baichuan2.utils.io import atomic_write_text

# What each stage does, in one line (printed when it starts and shown on the page).
DESCRIPTIONS = {
    "corpus": "build the default corpus from text installed on this machine",
    "data": "clean, deduplicate (exact, MinHash, semantic) and score the documents",
    "tokenizer": "train a Baichuan-2-style BPE tokenizer; measure its compression",
    "tokens": "hold out 3% of the documents; encode both parts into token shards",
    "pretrain": "pretrain the main model, releasing checkpoints on a token schedule",
    "scaling": "train a ladder of smaller models, fit L(C) = a·C^b + L∞, predict the main model",
    "sample": "generate from the final released checkpoint",
    "sft": "fine-tune on the bundled dialogues (assistant-only loss) and ask the chat model",
    "eval": "every released checkpoint: held-out perplexity and a 5-shot C-Eval/CMMLU/MMLU slice (files present)",
}


@dataclass
class Section:
    name: str
    title: str
    status: str  # done | running | interrupted | pending
    seconds: float | None = None
    headline: str = ""  # one line of Markdown: the stage's key numbers
    body: str = ""  # Markdown
    figures: list[dict] = field(default_factory=list)


def md_escape(text: str) -> str:
    """Text shown literally inside Markdown (model output, file names): no markup, no raw HTML."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", str(text))


def plain(markdown_line: str) -> str:
    """A headline for the terminal: without the emphasis and code marks."""
    return re.sub(r"\\(.)", r"\1", markdown_line.replace("**", "").replace("`", ""))


def fenced(text: str, info: str = "") -> str:
    """A code block that shows ``text`` verbatim; runs of blank lines are counted, not drawn, so
    a completion of 64 newlines is one readable line rather than a tall empty box."""
    text = re.sub(r"\n(?:[ \t\r\f\v]*\n){3,}", lambda m: f"\n⏎ × {m.group().count(chr(10))} (newlines)\n",
                  text)
    text = text[:-1] if text.endswith("\n") else text
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def _num(x, fmt: str = ",") -> str:
    return "?" if x is None else format(x, fmt)


def headline(name: str, r: dict) -> str:
    """The stage's key counts in one line (also printed when the stage ends)."""
    if name == "corpus":
        src = r.get("sources", {})
        return f"{sum(v['docs'] for v in src.values()):,} documents: " + ", ".join(
            f"{k} {v['docs']:,}" for k, v in src.items())
    if name == "data":
        m, s = r.get("minhash", {}), r.get("semantic", {})
        read = r.get("input_docs")
        kept = f"{r.get('output_docs', 0):,} documents kept" + (f" of {read:,} read" if read else "")
        semantic = (f"{_num(s.get('semantic_dups'))} semantic duplicates" if s.get("enabled", True)
                    else "no semantic duplicates (embedding clustering off)")
        return f"{kept}; removed {_num(m.get('exact_dups'))} exact, {_num(m.get('near_dups'))} near and {semantic}"
    if name == "tokenizer":
        comp = r.get("compression", {})
        main = [k for k in ("lang:en", "lang:zh", "source:code", "en", "zh") if k in comp]  # not all 50 languages
        parts = [f"{k} {comp[k]['tokens_per_char']:.3f}" for k in main]
        return (f"{comp.get('all', {}).get('tokens_per_char', float('nan')):.3f} tokens/char overall"
                + (f" ({', '.join(parts)})" if parts else ""))
    if name == "tokens":
        return (f"{r.get('tokens', 0):,} training tokens in {r.get('docs', 0):,} documents; "
                f"{r.get('val_tokens', 0):,} held out ({r.get('val_docs', 0):,} documents)")
    if name == "pretrain":
        return (f"`{r.get('preset', '?')}`, {r.get('tokens', 0):,} tokens: held-out loss {_num(r.get('val_loss'), '.4f')}"
                f", training loss {_num(r.get('smoothed_loss'), '.4f')} (mean of the last 10% of steps); "
                f"{len(r.get('releases', []))} released checkpoints")
    if name == "scaling":
        if "predicted_loss" not in r:
            return ""
        lo, hi = r["prediction_interval_5_95"]
        return (f"{len(r.get('rungs', []))} rungs: predicted {r['predicted_loss']:.4f} (5–95%: {lo:.4f}–{hi:.4f}), "
                f"actual {r['actual_loss']:.4f}: **{100 * r['relative_error']:.2f}% error**")
    if name == "sample":
        return f"{r.get('new_tokens', 0)} tokens generated from `{md_escape(Path(r.get('checkpoint', '')).name)}`"
    if name == "sft":
        return (f"{r.get('train_conversations', 0):,} conversations, {r.get('steps', 0)} steps: held-out assistant loss "
                f"{_num(r.get('val_loss_before'), '.3f')} → {_num(r.get('val_loss_after'), '.3f')}")
    if name == "eval":
        parts = []
        if "heldout" in r:
            parts.append(f"held-out perplexity {r['heldout']['perplexity']:.1f} "
                         f"({r['heldout']['bits_per_byte']:.3f} bits/byte)")
        for bench, res in r.items():
            if isinstance(res, dict) and "accuracy" in res:
                chance = r.get("chance", {}).get(bench)
                parts.append(f"{bench.upper()} 5-shot {res['accuracy']:.1f}% on {res['n']} questions"
                             + (f" (chance {chance:.1f}%)" if chance is not None else ""))
        skipped = [bench.upper() for bench, res in r.items() if isinstance(res, dict) and "skipped" in res]
        if skipped:
            parts.append(f"{', '.join(skipped)} skipped (no benchmark files)")
        releases = len(r.get("checkpoints", []))
        return (f"final release: {'; '.join(parts)}" + (f" — {releases} released checkpoints scored" if releases > 1
                                                        else ""))
    return ""


def _fit_line(s: dict) -> str:
    f = s["fit"]
    return (f"Fit: L(C) = ({f['a']:.4g} ± {f['a_std']:.2g})·(C/{f['c0']:.3g})^({f['b']:.3f} ± {f['b_std']:.3f}) + "
            f"({f['l_inf']:.4f} ± {f['l_inf_std']:.4f}) on {f['n_points']} rungs, rms residual {f['residual_rms']:.4f}. "
            "The ± are one standard error from the fit's Jacobian; a, b and L∞ are strongly correlated, so the "
            "bootstrap interval of the prediction is the number to read.")


def body(name: str, r: dict, out: Path) -> str:
    """The stage's section text (Markdown), beyond its headline."""
    if name == "corpus":
        rows = [f"| {md_escape(k)} | {v['docs']:,} |" for k, v in r.get("sources", {}).items()]
        return "\n".join(["| source | documents |", "|---|---:|", *rows])
    if name == "data":
        by_src = r.get("output_by_source", {})
        lines = ["Full report: [data/report.md](data/report.md) (counts per step and source, examples of every "
                 "removal reason); removed documents are in `data/rejects/`."]
        if by_src:
            lines += ["", "| source | kept |", "|---|---:|", *[f"| {md_escape(k)} | {v:,} |" for k, v in by_src.items()]]
        langs = r.get("output_by_language", {})
        if langs:
            top = sorted(langs.items(), key=lambda kv: -kv[1])
            rest = sum(v for _, v in top[10:])
            lines += ["", "Language mix of the kept documents (the data pipeline's language tags):", "",
                      "| language | kept |", "|---|---:|", *[f"| {md_escape(k)} | {v:,} |" for k, v in top[:10]]]
            lines += [f"| {len(top) - 10} others | {rest:,} |"] if rest else []
        return "\n".join(lines)
    if name == "tokenizer":
        comp = r.get("compression", {})
        return "\n".join(["Tokens per character (lower is better) and bytes per token, per language tag and source:",
                          "", "| group | tokens/char | bytes/token |", "|---|---:|---:|"] +
                         [f"| {md_escape(k)} | {v['tokens_per_char']:.3f} | {v['bytes_per_token']:.2f} |"
                          for k, v in comp.items()])
    if name == "pretrain":
        rel = r.get("releases", [])
        return "\n".join([f"Released checkpoints in `pretrain/release/`: {', '.join(f'`{x}`' for x in rel) or 'none'}.",
                          "", "Training log: [pretrain/metrics.jsonl](pretrain/metrics.jsonl)."])
    if name == "scaling":
        if "fit" not in r:
            return ""
        rows = [f"| {md_escape(x['name'])} | {x['params']:,} | {x['tokens']:,} | {x['flops']:.3g} | {x['loss']:.4f} |"
                for x in r.get("rungs", [])]
        return "\n".join([_fit_line(r), "", f"| rung | non-embedding params | tokens | FLOPs | {r.get('loss_key', 'loss')} |",
                          "|---|---:|---:|---:|---:|", *rows, "",
                          "Fit and rungs: [scaling/scaling_fit.json](scaling/scaling_fit.json)."])
    if name == "sample":
        return f"Greedy completion (prompt, then the model's continuation):\n\n{fenced(r.get('prompt', '') + r.get('completion', ''))}"
    if name == "sft":
        rows = [f"| {md_escape(q)} | {md_escape(a).replace(chr(10), ' ⏎ ') if a.strip() else '*(empty answer)*'} |"
                for q, a in r.get("answers", {}).items()]
        return "\n".join(["Greedy answers of the chat model:", "", "| question | answer |", "|---|---|", *rows, "",
                          f"Chat with it: `baichuan2 chat {r.get('checkpoint', '')}`"])
    if name == "eval" and r.get("table"):
        return "\n".join(["Every released checkpoint of the main model against the tokens it had seen (the report's "
                          "§5.6 and Figure 7, `baichuan2 eval checkpoints`):", "", r["table"], "",
                          "Table and per-question records: [eval/checkpoints/checkpoints.md]"
                          "(eval/checkpoints/checkpoints.md), `eval/checkpoints/<release>/<benchmark>/items.jsonl`."])
    return ""


def sections(out: Path, stages: dict, order: list[str], running: str | None = None,
             interrupted: bool = False) -> list[Section]:
    result = []
    for name in order:
        r = stages.get(name)
        status = "done" if r is not None else ("interrupted" if interrupted else "running") if name == running \
            else "pending"
        sec = Section(name=name, title=DESCRIPTIONS.get(name, name), status=status)
        if r is not None:
            sec.seconds, sec.headline, sec.body = r.get("seconds"), headline(name, r), body(name, r, out)
            sec.figures = [f for f in r.get("figures", []) if (out / f["path"]).exists()]
        result.append(sec)
    return result


def next_steps(stages: dict, out: Path) -> str:
    release = stages.get("pretrain", {}).get("release_dir") or str(out / "pretrain" / "release" / "final")
    chat = stages.get("sft", {}).get("checkpoint")
    lines = []
    if chat:
        lines += [f"baichuan2 chat {chat}", f"baichuan2 serve {chat}"]
    if "pretrain" in stages:
        lines += [f"baichuan2 generate {release} 'def read_file(path):'"]
    return "\n".join(lines)


def write_page(out: Path, stages: dict, order: list[str], running: str | None = None,
               interrupted: bool = False, total_seconds: float | None = None) -> None:
    """Write summary.md and index.html for what has run so far (atomically; called after every stage)."""
    import jinja2

    from baichuan2.serve.markdown import render_markdown  # the web chat's renderer: markdown-it, no raw HTML

    secs = sections(out, stages, order, running, interrupted)
    done = sum(s.status == "done" for s in secs)
    state = ("finished" if done == len(secs) else f"interrupted during {running}" if interrupted
             else f"running: {running}" if running else f"{done} of {len(secs)} stages done")
    commands = next_steps(stages, out)

    md = [f"# Baichuan 2 pipeline run — {state}", "", "| stage | status | seconds | result |", "|---|---|---:|---|"]
    md += [f"| {s.name} | {s.status} | {'' if s.seconds is None else s.seconds} | {s.headline} |" for s in secs]
    for s in secs:
        if s.status != "done":
            continue
        md += ["", f"## {s.name}: {s.title}", "", s.headline, ""] + ([s.body, ""] if s.body else [])
        md += [f"![{md_escape(f['title'])}]({f['path']})" for f in s.figures]
    if commands:
        md += ["", "## Next", "", fenced(commands, "bash")]
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "assets"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    html = env.get_template("index.html.j2").render(
        state=state, finished=done == len(secs), interrupted=interrupted, total_seconds=total_seconds,
        sections=[{**s.__dict__, "headline_html": render_markdown(s.headline), "body_html": render_markdown(s.body)}
                  for s in secs],
        next_html=render_markdown(fenced(commands, "bash")) if commands else "")
    atomic_write_text(out / "index.html", html)
