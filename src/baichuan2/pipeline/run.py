"""`baichuan2 pipeline`: the whole recipe on the bundled corpus, one command, resumable.

Stages (each also runs alone with its own verb; each leaves ``stages/<name>.json`` when done, so an
interrupted run continues with the first unfinished stage, and the tools inside resume too):

  corpus     build the default corpus from text installed on this machine     (pipeline.corpus)
  data       clean, dedup, cluster, score                                     (baichuan2 data run)
  tokenizer  train a Baichuan-2-style BPE tokenizer; compression stats         (baichuan2 tokenizer train/stats)
  tokens     encode the scored corpus into token shards with sampling weights  (baichuan2 tokenizer encode)
  pretrain   train the main model, releasing checkpoints on a token schedule   (baichuan2 pretrain)
  scaling    a ladder of smaller models; fit L(C); predict the main model      (baichuan2 scaling)
  sample     generate from the released checkpoint                             (baichuan2 generate)
  sft        fine-tune on the bundled dialogues (assistant-only loss); ask it   (baichuan2 sft)
  eval       held-out perplexity; 5-shot CMMLU/MMLU slice if the files exist  (baichuan2 eval)
  summary    index.html + summary.md with the plots embedded
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from baichuan2.pipeline.scaling_cli import LadderArgs
from baichuan2.utils.io import atomic_write_json, atomic_write_text, read_json


@dataclass
class PipelineRecipe:
    """Args:
        out_dir: Run directory (browse out_dir/index.html when done).
        code_bytes: Bytes of standard-library source in the corpus.
        docs_bytes: Bytes of standard-library documentation in the corpus.
        workers: Worker processes for the data pipeline and token encoding.
        embed_encoder: Encoder for embedding clustering ("minilm", a directory, "lm:<ckpt>", or "none").
        embed_max_chars: Characters of each document given to the encoder.
        vocab_size: Tokenizer vocabulary size.
        val_fraction: Share of documents held out (by doc_id hash) for the validation loss the scaling fit uses.
        ladder: Scaling ladder; its target is the main pretrained model (same recipe as the rungs).
        release_every_tokens: Release a HF checkpoint of the main model every this many tokens.
        sample_prompt: Prompt for the sample generation at the end.
        sft_epochs: Passes over the bundled dialogues in the SFT stage.
        sft_lr: SFT peak learning rate.
        chat_prompts: Questions put to the fine-tuned model at the end of the SFT stage.
        bench_dir: Benchmark files in their published layouts (cmmlu/, mmlu/); the eval stage scores a
            5-shot slice when they are present and held-out perplexity always.
        eval_limit: Questions per subject in that slice.
    """

    out_dir: str = "runs/pipeline"
    code_bytes: int = 3_000_000
    docs_bytes: int = 3_000_000
    workers: int = 2
    embed_encoder: str = "minilm"
    embed_max_chars: int = 300
    vocab_size: int = 4096
    val_fraction: float = 0.03
    ladder: LadderArgs = field(default_factory=LadderArgs)
    release_every_tokens: int = 300_000
    sample_prompt: str = "def read_file(path):\n"
    sft_epochs: int = 2
    sft_lr: float = 1e-3
    chat_prompts: list[str] = field(default_factory=lambda: ["What is your name?", "你好吗？"])
    bench_dir: str = "../shared/data/bench"
    eval_limit: int = 2


def _stage(out: Path, name: str, fn, *args):
    """Run a stage once; its result (a JSON-able dict) is the done marker."""
    marker = out / "stages" / f"{name}.json"
    if marker.exists():
        print(f"[{name}] done earlier, skipping")
        return read_json(marker)
    print(f"[{name}] starting", flush=True)
    t0 = time.time()
    result = fn(*args) or {}
    result["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(marker, result)
    print(f"[{name}] finished in {result['seconds']} s", flush=True)
    return result


def stage_corpus(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.pipeline.corpus import build_default_corpus

    return {"sources": build_default_corpus(out / "corpus", code_bytes=r.code_bytes, docs_bytes=r.docs_bytes)}


def stage_data(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.data.embed import EmbedArgs
    from baichuan2.data.pipeline import DataRecipe, run_pipeline
    from baichuan2.data.score import ScoreArgs

    inputs = [str(out / "corpus" / f"{s}.jsonl") for s in ("docs", "code", "dialog", "zh")]
    recipe = DataRecipe(inputs=inputs, out_dir=str(out / "data"), workers=r.workers,
                        embed=EmbedArgs(enabled=r.embed_encoder != "none", encoder=r.embed_encoder,
                                        max_chars=r.embed_max_chars, clusters=32),
                        score=ScoreArgs(source_weights={"docs": 1.0, "code": 1.0, "dialog": 0.5, "zh": 1.5}))
    rep = run_pipeline(recipe)
    return {"output_docs": rep["output_docs"], "minhash": {k: v for k, v in rep["minhash"].items()
                                                           if k != "cluster_size_hist"},
            "semantic": rep["semantic"], "output_by_source": rep["output_by_source"]}


def stage_tokenizer(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.tokenizer.stats import compression_stats
    from baichuan2.tokenizer.train import train_tokenizer

    data = str(out / "data" / "output")
    train_tokenizer([data], str(out / "tokenizer"), vocab_size=r.vocab_size, max_sentences=300_000)
    stats = compression_stats([str(out / "tokenizer")], [data])
    return {"compression": next(iter(stats.values()))}


def split_heldout(src: Path, out: Path, fraction: float) -> None:
    """Deterministically hold out ~fraction of the documents (by a hash of doc_id) for validation loss."""
    import zlib

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for name in ("train", "val"):
        (out / name).mkdir(parents=True, exist_ok=True)
    cut = int(fraction * 2**32)
    for part in sorted(src.glob("*.parquet")):
        table = pq.read_table(part)
        held = pa.array([zlib.crc32(str(d).encode()) < cut for d in table.column("doc_id").to_pylist()])
        pq.write_table(table.filter(pc.invert(held)), out / "train" / part.name)
        pq.write_table(table.filter(held), out / "val" / part.name)


def stage_tokens(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.tokenizer.encode import encode_corpus

    split_heldout(out / "data" / "output", out / "split", r.val_fraction)
    m = encode_corpus([str(out / "split" / "train")], str(out / "tokens"), str(out / "tokenizer"), workers=r.workers,
                      overwrite=True)
    v = encode_corpus([str(out / "split" / "val")], str(out / "tokens-val"), str(out / "tokenizer"),
                      workers=r.workers, overwrite=True)
    return {"docs": m["total_docs"], "tokens": m["total_tokens"], "val_docs": v["total_docs"],
            "val_tokens": v["total_tokens"]}


def _ladder_args(r: PipelineRecipe, out: Path) -> LadderArgs:
    return replace(r.ladder, val_shards=str(out / "tokens-val"))


def _ladder(r: PipelineRecipe, out: Path):
    from baichuan2.pipeline.scaling_cli import plan_rungs
    from baichuan2.tokenizer.shards import read_manifest

    vocab = read_manifest(out / "tokens")["tokenizer"]["vocab_size"]
    return plan_rungs(_ladder_args(r, out), vocab)


def stage_pretrain(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.pipeline.scaling_cli import train_rung
    from baichuan2.train.plot import plot_runs

    _, target = _ladder(r, out)
    run_dir = out / "pretrain"
    result = train_rung(_ladder_args(r, out), target, str(out / "tokens"), run_dir,
                        evals=12, release_every_tokens=r.release_every_tokens, release_final=True, save_every=50)
    plot_runs([str(run_dir)], str(out / "loss.png"), keys=("loss", "lr", "grad_norm", "tokens_per_s"), smooth=5)
    releases = sorted(p.name for p in (run_dir / "release").iterdir()) if (run_dir / "release").exists() else []
    return {**result, "releases": releases}


def stage_scaling(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.pipeline.scaling_cli import fit_results, train_rung

    rungs, target = _ladder(r, out)
    results = [train_rung(_ladder_args(r, out), rung, str(out / "tokens"), out / "scaling" / "rungs" / rung.name) for rung in rungs]
    actual = read_json(out / "pretrain" / "result.json")
    s = fit_results(results, target, out / "scaling", actual)
    return {k: s[k] for k in ("fit", "predicted_loss", "prediction_interval_5_95", "actual_loss", "relative_error")}


def stage_sample(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.model.generate import SamplingConfig, generate
    from baichuan2.tokenizer import Tokenizer

    ckpt = read_json(out / "stages" / "pretrain.json")["release_dir"]
    model = load_pretrained(ckpt).eval()
    tok = Tokenizer.from_pretrained(ckpt)
    ids = generate(model, [tok.encode(r.sample_prompt)], SamplingConfig(max_new_tokens=64, do_sample=False,
                                                                         repetition_penalty=1.1,
                                                                         stop_token_ids=[tok.eos_id]))[0]
    return {"checkpoint": ckpt, "prompt": r.sample_prompt, "completion": tok.decode(ids), "new_tokens": len(ids)}


def stage_sft(r: PipelineRecipe, out: Path) -> dict:
    """Fine-tune the released model on the bundled English/Chinese chatterbot dialogues; ask it something."""
    from baichuan2.align.sft import SFTArgs, sft, sft_optim
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.pipeline.corpus import chatterbot_documents
    from baichuan2.serve.engine import Engine
    from baichuan2.tokenizer import Tokenizer

    ckpt = read_json(out / "stages" / "pretrain.json")["release_dir"]
    convs = [d["messages"] for d in chatterbot_documents() if d["doc_id"].split(":")[1].split("/")[0]
             in ("english", "chinese")]
    args = SFTArgs(max_length=r.ladder.seq_len, epochs=r.sft_epochs, batch_size=16, val_fraction=0.05)
    m = sft(load_pretrained(ckpt), Tokenizer.from_pretrained(ckpt), convs, out / "sft", args, optim=sft_optim(lr=r.sft_lr))
    engine = Engine(str(out / "sft"))
    cfg = engine.sampling(temperature=0, max_new_tokens=32)
    answers = {q: engine.complete(engine.chat_prompt([{"role": "user", "content": q}], 32), cfg).text
               for q in r.chat_prompts}
    return {**{k: m[k] for k in ("train_conversations", "steps", "val_loss_before", "val_loss_after")},
            "checkpoint": str(out / "sft"), "answers": answers}


def stage_eval(r: PipelineRecipe, out: Path) -> dict:
    """Held-out perplexity, and a small 5-shot CMMLU/MMLU slice when the benchmark files are present."""
    import pyarrow.parquet as pq

    from baichuan2.eval.harness import MCArgs, evaluate_mc
    from baichuan2.eval.perplexity import perplexity
    from baichuan2.eval.tasks import load_benchmark
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    ckpt = read_json(out / "stages" / "pretrain.json")["release_dir"]
    model, tok = load_pretrained(ckpt).eval(), Tokenizer.from_pretrained(ckpt)
    texts = [t for part in sorted((out / "split" / "val").glob("*.parquet"))
             for t in pq.read_table(part, columns=["text"]).column("text").to_pylist()]
    result: dict = {"heldout": perplexity(model, tok, texts, max_tokens=20_000)}
    bench = Path(r.bench_dir)
    for name in ("cmmlu", "mmlu"):
        if (bench / name).exists():
            res = evaluate_mc(model, tok, load_benchmark(name, str(bench / name)),
                              MCArgs(shots=5, limit=r.eval_limit), out / "eval" / name, progress=False)
            result[name] = {k: res[k] for k in ("accuracy", "macro_accuracy", "n", "items_per_second")}
        else:
            result[name] = {"skipped": f"{bench / name} not found"}
    return result


def write_summary(out: Path, stages: dict) -> None:
    d, t, p, s, smp = (stages.get(k, {}) for k in ("data", "tokenizer", "pretrain", "scaling", "sample"))
    comp = t.get("compression", {})
    md = ["# Baichuan 2 pipeline run", "",
          "| stage | seconds | result |", "|---|---|---|"]
    notes = {
        "corpus": ", ".join(f"{k}: {v['docs']} docs" for k, v in stages.get("corpus", {}).get("sources", {}).items()),
        "data": f"{d.get('output_docs')} docs kept; exact dups {d.get('minhash', {}).get('exact_dups')}, near dups "
                f"{d.get('minhash', {}).get('near_dups')}, semantic dups {d.get('semantic', {}).get('semantic_dups')}",
        "tokenizer": f"{comp.get('all', {}).get('tokens_per_char', 0):.3f} tokens/char overall",
        "tokens": f"{stages.get('tokens', {}).get('tokens', 0):,} training tokens, "
                  f"{stages.get('tokens', {}).get('val_tokens', 0):,} held out",
        "pretrain": f"{p.get('tokens', 0):,} tokens, final loss {p.get('smoothed_loss', 0):.4f} (train, smoothed), "
                    f"{p.get('val_loss') or 0:.4f} (held out); "
                    f"{len(p.get('releases', []))} released checkpoints",
        "scaling": f"predicted {s.get('predicted_loss', 0):.4f} vs actual {s.get('actual_loss', 0):.4f} "
                   f"({100 * s.get('relative_error', 0):.2f}% error)",
        "sample": f"{smp.get('new_tokens', 0)} tokens generated",
        "sft": f"{stages.get('sft', {}).get('train_conversations', 0)} conversations; held-out assistant loss "
               f"{stages.get('sft', {}).get('val_loss_before') or 0:.3f} -> {stages.get('sft', {}).get('val_loss_after') or 0:.3f}",
        "eval": _eval_note(stages.get("eval", {})),
    }
    for name, note in notes.items():
        if name in stages:
            md.append(f"| {name} | {stages[name].get('seconds', '')} | {note} |")
    md += ["", "## Data", "", "Report: [data/report.md](data/report.md)", "", "![cluster sizes](data/cluster_sizes.png)",
           "", "## Tokenizer (tokens per character, lower is better)", ""]
    md += [f"- {k}: {v['tokens_per_char']:.3f} ({v['bytes_per_token']:.2f} bytes/token)" for k, v in comp.items()]
    md += ["", "## Pretraining", "", "![loss](loss.png)", "", f"Released checkpoints in pretrain/release/: "
           + ", ".join(p.get("releases", [])), "", "## Scaling law", "", "![scaling law](scaling/scaling_law.png)", ""]
    if s:
        f = s["fit"]
        md.append(f"L(C) = {f['a']:.4g}·(C/{f['c0']:.3g})^{f['b']:.4f} + {f['l_inf']:.4f}; predicted "
                  f"{s['predicted_loss']:.4f}, actual {s['actual_loss']:.4f}, error {100 * s['relative_error']:.2f}%")
    if smp:
        md += ["", "## Sample from the final checkpoint", "", "```", smp["prompt"] + smp["completion"], "```"]
    sft_stage = stages.get("sft", {})
    if sft_stage:
        md += ["", "## Chat model (SFT on the bundled dialogues, greedy answers)", ""]
        md += [f"- {q} → {a!r}" for q, a in sft_stage.get("answers", {}).items()]
    ckpt = smp.get("checkpoint", str(out / "pretrain" / "release" / "final"))
    chat_ckpt = sft_stage.get("checkpoint", ckpt)
    md += ["", "## Next", "", f"    baichuan2 chat {chat_ckpt}", f"    baichuan2 serve {chat_ckpt}",
           f"    baichuan2 generate {ckpt} 'def read_file(path):'", ""]
    text = "\n".join(md)
    atomic_write_text(out / "summary.md", text)
    atomic_write_text(out / "index.html", _html(text))


def _eval_note(e: dict) -> str:
    parts = []
    if "heldout" in e:
        parts.append(f"held-out perplexity {e['heldout']['perplexity']:.1f} ({e['heldout']['bits_per_byte']:.3f} bits/byte)")
    for name in ("cmmlu", "mmlu"):
        if "accuracy" in e.get(name, {}):
            parts.append(f"{name} 5-shot {e[name]['accuracy']:.1f}% on {e[name]['n']} questions (chance 25%)")
        elif name in e:
            parts.append(f"{name} skipped (no benchmark files)")
    return "; ".join(parts)


def _html(md: str) -> str:
    """Minimal markdown -> HTML (headings, images, tables, code) so the summary needs no extra package."""
    out, in_code, in_table = [], False, False
    for line in md.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                out.append("<table border=1 cellpadding=4>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}" width="720"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("    "):
            out.append(f"<pre>{html.escape(line.strip())}</pre>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "<!doctype html><meta charset=utf-8><title>Baichuan 2 pipeline</title><body>" + "\n".join(out) + "</body>"


STAGES = [("corpus", stage_corpus), ("data", stage_data), ("tokenizer", stage_tokenizer), ("tokens", stage_tokens),
          ("pretrain", stage_pretrain), ("scaling", stage_scaling), ("sample", stage_sample), ("sft", stage_sft),
          ("eval", stage_eval)]


def run_all(recipe: PipelineRecipe) -> dict:
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "recipe.json"
    if saved.exists() and read_json(saved) != json.loads(json.dumps(asdict(recipe))):
        raise SystemExit(f"pipeline: {out} was started with a different recipe; use another --out_dir")
    atomic_write_json(saved, asdict(recipe))
    t0 = time.time()
    stages = {name: _stage(out, name, fn, recipe, out) for name, fn in STAGES}
    write_summary(out, stages)
    print(f"pipeline finished in {time.time() - t0:.0f} s (this session): open {out / 'index.html'} or {out / 'summary.md'}")
    print(f"chat with the fine-tuned model:  baichuan2 chat {stages['sft']['checkpoint']}")
    return stages


def pipeline(out_dir: str = "runs/pipeline", recipe: PipelineRecipe = PipelineRecipe()) -> None:
    """Run the whole Baichuan 2 recipe on the bundled offline corpus and write a browsable run directory.

    corpus -> data (filters, exact/MinHash/semantic dedup, scores) -> tokenizer (+ compression stats) ->
    token shards -> pretraining with released checkpoints -> scaling-law ladder predicting the main run ->
    sample generation -> SFT on dialogues -> perplexity and a 5-shot slice -> index.html / summary.md with
    the plots. Interrupt it at any time and run the same command again to continue. About 12 minutes on
    2 CPU cores.

    Args:
        out_dir: Run directory (overrides recipe.out_dir).
        recipe: Pipeline settings (`--config src/baichuan2/recipes/pipeline-default.yaml` or flags).
    """
    recipe.out_dir = out_dir
    run_all(recipe)


COMMANDS = pipeline
