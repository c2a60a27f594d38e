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
  eval       every release: held-out perplexity, 5-shot C-Eval/CMMLU/MMLU slice  (baichuan2 eval checkpoints)
  index.html + summary.md are rewritten after every stage (pipeline/page.py)

Interrupted (Ctrl-C, a kill, a crash), the same command continues: finished stages are skipped,
pretraining and every scaling rung resume from their last training checkpoint (``checkpoint_every``
steps), the data pipeline and the benchmark scorer from their own partial outputs.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from baichuan2.pipeline.page import DESCRIPTIONS, headline, plain, write_page
from baichuan2.pipeline.scaling_cli import LadderArgs
from baichuan2.utils.io import atomic_write_json, read_json


@dataclass
class PipelineRecipe:
    """Args:
        out_dir: Run directory (browse out_dir/index.html when done).
        code_bytes: Bytes of standard-library source in the corpus.
        docs_bytes: Bytes of standard-library documentation in the corpus.
        workers: Worker processes for the data pipeline and token encoding.
        embed_encoder: Encoder for embedding clustering ("minilm", a directory, "lm:<ckpt>", or "none").
        embed_max_chars: Characters of each document given to the encoder.
        languages: Language tags the data stage keeps (e.g. [zh, en]); empty keeps every language.
        vocab_size: Tokenizer vocabulary size.
        val_fraction: Share of documents held out (by doc_id hash) for the validation loss the scaling fit uses.
        ladder: Scaling ladder; its target is the main pretrained model (same recipe as the rungs).
        release_every_tokens: Release a HF checkpoint of the main model every this many tokens.
        checkpoint_every: Steps between training checkpoints of the main model and of each scaling rung
            (an interrupted run resumes from the last one).
        sample_prompt: Prompt for the sample generation at the end.
        sft_epochs: Passes over the bundled dialogues in the SFT stage.
        sft_lr: SFT peak learning rate.
        chat_prompts: Questions put to the fine-tuned model at the end of the SFT stage.
        bench_dir: Benchmark files in their published layouts (ceval/, cmmlu/, mmlu/); the eval stage scores
            every released checkpoint on held-out perplexity and on a 5-shot slice of those present.
        eval_benchmarks: Multiple-choice benchmarks of that slice (Figure 7's three; skipped when absent).
        eval_limit: Questions per subject in that slice.
    """

    out_dir: str = "runs/pipeline"
    code_bytes: int = 3_000_000
    docs_bytes: int = 3_000_000
    workers: int = 2
    embed_encoder: str = "minilm"
    embed_max_chars: int = 300
    languages: list[str] = field(default_factory=list)
    vocab_size: int = 4096
    val_fraction: float = 0.03
    ladder: LadderArgs = field(default_factory=LadderArgs)
    release_every_tokens: int = 300_000
    checkpoint_every: int = 100
    sample_prompt: str = "def read_file(path):\n"
    sft_epochs: int = 2
    sft_lr: float = 1e-3
    chat_prompts: list[str] = field(default_factory=lambda: ["What is your name?", "你好吗？"])
    bench_dir: str = "../shared/data/bench"
    eval_benchmarks: list[str] = field(default_factory=lambda: ["ceval", "cmmlu", "mmlu"])
    eval_limit: int = 2


def stage_corpus(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.pipeline.corpus import build_default_corpus

    return {"sources": build_default_corpus(out / "corpus", code_bytes=r.code_bytes, docs_bytes=r.docs_bytes)}


def stage_data(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.data.embed import EmbedArgs
    from baichuan2.data.language import LanguageArgs
    from baichuan2.data.pipeline import DataRecipe, run_pipeline
    from baichuan2.data.score import ScoreArgs

    inputs = [str(out / "corpus" / f"{s}.jsonl") for s in ("docs", "code", "dialog", "zh")]
    recipe = DataRecipe(inputs=inputs, out_dir=str(out / "data"), workers=r.workers,
                        language=LanguageArgs(keep=list(r.languages)),
                        embed=EmbedArgs(enabled=r.embed_encoder != "none", encoder=r.embed_encoder,
                                        max_chars=r.embed_max_chars, clusters=32),
                        score=ScoreArgs(source_weights={"docs": 1.0, "code": 1.0, "dialog": 0.5, "zh": 1.5}))
    rep = run_pipeline(recipe)
    corpus = read_json(out / "stages" / "corpus.json")["sources"]
    return {"input_docs": sum(v["docs"] for v in corpus.values()), "output_docs": rep["output_docs"],
            "minhash": {k: v for k, v in rep["minhash"].items() if k != "cluster_size_hist"},
            "semantic": rep["semantic"], "output_by_source": rep["output_by_source"],
            "output_by_language": rep.get("output_by_language", {}),
            "figures": [{"path": "data/cluster_sizes.png", "title": "MinHash near-duplicate cluster sizes",
                         "caption": "clusters of each size (log scale); size 1 = no near duplicate"}]}


def stage_tokenizer(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.tokenizer.stats import compression_stats
    from baichuan2.tokenizer.train import train_tokenizer

    data = str(out / "data" / "output")
    train_tokenizer([data], str(out / "tokenizer"), vocab_size=r.vocab_size, max_sentences=300_000)
    print("[tokenizer] compression per language and source over the whole output", flush=True)
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
    print(f"[pretrain] {target.name}: {target.params:,} non-embedding parameters, {target.tokens:,} tokens; "
          f"checkpoint every {r.checkpoint_every} steps (an interrupted run resumes from the last)", flush=True)
    result = train_rung(_ladder_args(r, out), target, str(out / "tokens"), run_dir, evals=12,
                        release_every_tokens=r.release_every_tokens, release_final=True, save_every=r.checkpoint_every)
    plot_runs([str(run_dir)], str(out / "loss.png"), keys=("loss", "lr", "grad_norm", "tokens_per_s"), smooth=5)
    releases = sorted(p.name for p in (run_dir / "release").iterdir()) if (run_dir / "release").exists() else []
    return {**result, "releases": releases,
            "figures": [{"path": "loss.png", "title": "Pretraining curves",
                         "caption": "training loss (smoothed over 5 logged points) with the held-out loss, learning "
                                    "rate, gradient norm and throughput per step"}]}


def _seconds_left(done: list[tuple[float, float, float]], todo: list[tuple[float, float]]) -> float | None:
    """Time left for runs of (tokens, flops per token), from finished runs' (tokens, flops per token, seconds):
    seconds per token = overhead + cost * flops per token, fitted on the finished runs (with one, all of
    its time per token counts as overhead: an upper bound for the smaller rungs)."""
    import numpy as np

    if not done or not todo:
        return None
    tokens, fpt, secs = (np.array(v, dtype=float) for v in zip(*done))
    per_token = secs / tokens
    if len(set(fpt)) >= 2:
        (overhead, cost), *_ = np.linalg.lstsq(np.stack([np.ones_like(fpt), fpt], 1), per_token, rcond=None)
        overhead, cost = max(overhead, 0.0), max(cost, 0.0)
    else:
        overhead, cost = float(per_token.max()), 0.0
    return float(sum(t * (overhead + cost * f) for t, f in todo))


def stage_scaling(r: PipelineRecipe, out: Path) -> dict:
    from baichuan2.pipeline.scaling_cli import fit_results, train_rung

    rungs, target = _ladder(r, out)
    main = read_json(out / "stages" / "pretrain.json")
    timing = [(target.tokens, target.flops / target.tokens, main["seconds"])] if main.get("seconds") else []
    results = []
    for i, rung in enumerate(rungs):
        run_dir = out / "scaling" / "rungs" / rung.name
        trained_now = not (run_dir / "result.json").exists()
        if trained_now:
            left = _seconds_left(timing, [(x.tokens, x.flops / x.tokens) for x in rungs[i:]])
            eta = f"; about {left / 60:.1f} min left for the ladder" if left is not None else ""
            print(f"[scaling] rung {i + 1}/{len(rungs)}: {rung.name}, {rung.params:,} non-embedding parameters, "
                  f"{rung.tokens:,} tokens{eta}", flush=True)
        t0 = time.time()
        results.append(train_rung(_ladder_args(r, out), rung, str(out / "tokens"), run_dir,
                                  save_every=r.checkpoint_every, release_final=False))
        if trained_now:
            timing.append((rung.tokens, rung.flops / rung.tokens, time.time() - t0))
    print("[scaling] fitting L(C) and bootstrapping its prediction interval", flush=True)
    s = fit_results(results, target, out / "scaling", main, progress=True)
    rows = [{"name": x["name"], "params": x["params"], "tokens": x["tokens"], "flops": x["flops"],
             "loss": x[s["loss_key"]]} for x in results]
    return {**{k: s[k] for k in ("fit", "predicted_loss", "prediction_interval_5_95", "actual_loss", "relative_error",
                                 "loss_key")}, "rungs": rows,
            "figures": [{"path": "scaling/scaling_law.png", "title": "Scaling law",
                         "caption": f"each rung's {'held-out' if s['loss_key'] == 'val_loss' else 'training'} loss against "
                                    "training compute; the fit, "
                                    "its bootstrap 5-95% band, and the main model's predicted and actual loss"}]}


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
    from baichuan2.train.engine import CheckpointArgs
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.pipeline.corpus import chatterbot_documents
    from baichuan2.serve.engine import Engine
    from baichuan2.tokenizer import Tokenizer

    ckpt = read_json(out / "stages" / "pretrain.json")["release_dir"]
    convs = [d["messages"] for d in chatterbot_documents() if d["doc_id"].split(":")[1].split("/")[0]
             in ("english", "chinese")]
    args = SFTArgs(max_length=r.ladder.seq_len, epochs=r.sft_epochs, batch_size=16, val_fraction=0.05)
    # SFT runs on the training engine: it checkpoints like pretraining and a re-run resumes from the last one
    m = sft(load_pretrained(ckpt), Tokenizer.from_pretrained(ckpt), convs, out / "sft", args,
            optim=sft_optim(lr=r.sft_lr), checkpoint=CheckpointArgs(save_every=r.checkpoint_every), resume=True)
    print(f"[sft] asking the chat model {len(r.chat_prompts)} questions", flush=True)
    engine = Engine(str(out / "sft"))
    cfg = engine.sampling(temperature=0, max_new_tokens=32)
    answers = {q: engine.complete(engine.chat_prompt([{"role": "user", "content": q}], 32), cfg).text
               for q in r.chat_prompts}
    return {**{k: m[k] for k in ("train_conversations", "steps", "val_loss_before", "val_loss_after")},
            "checkpoint": str(out / "sft"), "answers": answers}


def _releases(run_dir: Path) -> list[str]:
    """The run's released checkpoints, one per training step: a scheduled release written at the last step
    holds the same weights as the final one, which stands for both."""
    from baichuan2.eval.checkpoints import find_releases

    by_step: dict = {}
    for rel in find_releases(run_dir):
        step = read_json(Path(rel["path"]) / "release.json").get("step", rel["path"])
        if rel["name"] == "final" or step not in by_step:
            by_step[step] = rel["path"]
    return list(by_step.values())


def stage_eval(r: PipelineRecipe, out: Path) -> dict:
    """Every released checkpoint (Baichuan 2 §5.6, Figure 7): held-out perplexity, and a 5-shot slice of the
    multiple-choice benchmarks whose files are present; the final release's numbers are the headline."""
    from baichuan2.eval.checkpoints import evaluate_checkpoints, format_table, present_benchmarks
    from baichuan2.eval.harness import MCArgs
    from baichuan2.utils.io import InputError

    present, skipped = [], {}
    for name in r.eval_benchmarks:
        try:
            if name in present_benchmarks(r.bench_dir, [name]):
                present.append(name)
                continue
        except InputError as e:
            skipped[name] = {"skipped": str(e)}
            continue
        skipped[name] = {"skipped": "no benchmark directory given"}
    releases = _releases(out / "pretrain")
    print(f"[eval] {len(releases)} released checkpoints ({', '.join(Path(p).name for p in releases)}): held-out "
          f"perplexity" + (f", 5-shot {', '.join(present)} ({r.eval_limit} per subject)" if present else "")
          + (f"; no files for {', '.join(skipped)}" if skipped else ""), flush=True)
    table = evaluate_checkpoints(releases, out / "eval" / "checkpoints", r.bench_dir if present else None, present,
                                 heldout=str(out / "split" / "val"), mc=MCArgs(shots=5, limit=r.eval_limit),
                                 ppl_max_tokens=20_000)
    final = table["releases"][-1]
    return {"checkpoint": final["path"], "heldout": final["heldout"], **{k: final[k] for k in present}, **skipped,
            "checkpoints": table["releases"], "chance": table["chance"], "table": format_table(table),
            "figures": [{"path": "eval/checkpoints/checkpoints.png", "title": "Benchmarks across training",
                         "caption": "each released checkpoint's 5-shot accuracy against the tokens it was trained on "
                                    "(chance dashed) and its held-out bits per byte, like the report's Figure 7"}]}


STAGES = [("corpus", stage_corpus), ("data", stage_data), ("tokenizer", stage_tokenizer), ("tokens", stage_tokens),
          ("pretrain", stage_pretrain), ("scaling", stage_scaling), ("sample", stage_sample), ("sft", stage_sft),
          ("eval", stage_eval)]


def _silence_library_progress() -> None:
    """Loading a model prints a "Loading weights" bar per load (transformers/safetensors); the stages
    print their own progress. The environment variable reaches worker processes too."""
    import logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # bitsandbytes (imported by peft) warns on every import that an optional kernel hub package is absent
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def _resume_command(out: Path) -> str:
    argv = sys.argv[1:]
    if argv[:1] == ["pipeline"]:
        return shlex.join(["baichuan2", *argv])
    return f"baichuan2 pipeline --out_dir {shlex.quote(str(out))}"


def _same_recipe(saved: dict, recipe: dict) -> bool:
    """out_dir may differ (a moved run directory is the same run); everything else must match."""
    return {k: v for k, v in saved.items() if k != "out_dir"} == {k: v for k, v in recipe.items() if k != "out_dir"}


def run_all(recipe: PipelineRecipe, until: str = "") -> dict:
    """Run (or continue) the stages in order, up to and including ``until``; rewrite the page after each."""
    out = Path(recipe.out_dir)
    names = [name for name, _ in STAGES]
    if until and until not in names:
        raise SystemExit(f"pipeline: unknown stage {until!r} (stages: {', '.join(names)})")
    order = names[: names.index(until) + 1] if until else names
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "recipe.json"
    wanted = json.loads(json.dumps(asdict(recipe)))
    if saved.exists() and not _same_recipe(read_json(saved), wanted):
        raise SystemExit(f"pipeline: {out} was started with a different recipe; use another --out_dir")
    atomic_write_json(saved, wanted)
    _silence_library_progress()
    t0 = time.time()
    stages: dict[str, dict] = {}
    for k, (name, fn) in enumerate(STAGES[: len(order)], 1):
        marker = out / "stages" / f"{name}.json"
        if marker.exists():
            stages[name] = read_json(marker)
            print(f"[{name} {k}/{len(order)}] done earlier: {plain(headline(name, stages[name]))}", flush=True)
            continue
        print(f"[{name} {k}/{len(order)}] {DESCRIPTIONS[name]}", flush=True)
        write_page(out, stages, order, running=name, total_seconds=time.time() - t0)
        started = time.time()
        try:
            result = fn(recipe, out) or {}
        except KeyboardInterrupt:
            _close_progress_bars()  # else a bar redraws itself after the message at exit
            write_page(out, stages, order, running=name, interrupted=True, total_seconds=time.time() - t0)
            print(f"\npipeline: interrupted during {name}; finished stages and checkpoints are kept. "
                  f"To continue, run the same command: {_resume_command(out)}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        result["seconds"] = round(time.time() - started, 1)
        atomic_write_json(marker, result)
        stages[name] = result
        print(f"[{name} {k}/{len(order)}] finished in {result['seconds']} s: {plain(headline(name, result))}", flush=True)
        write_page(out, stages, order, total_seconds=time.time() - t0)
    print(f"pipeline: {len(stages)} stages done, {time.time() - t0:.0f} s in this session; open "
          f"{out / 'index.html'} or {out / 'summary.md'}")
    if "sft" in stages:
        print(f"chat with the fine-tuned model:  baichuan2 chat {stages['sft']['checkpoint']}")
    return stages


def pipeline(out_dir: str = "", recipe: PipelineRecipe = PipelineRecipe(), until: str = "") -> None:
    """Run the whole Baichuan 2 recipe on the bundled offline corpus and write a browsable run directory.

    corpus -> data (filters, exact/MinHash/semantic dedup, scores) -> tokenizer (+ compression stats) ->
    token shards -> pretraining with released checkpoints -> scaling-law ladder predicting the main run ->
    sample generation -> SFT on dialogues -> perplexity and a 5-shot slice, with index.html / summary.md
    rewritten after every stage. Interrupt it at any time (Ctrl-C or a kill) and run the same command
    again to continue: finished stages are skipped and training resumes from its last checkpoint.
    About 12 minutes on 2 idle CPU cores.

    Args:
        out_dir: Run directory (default: recipe.out_dir, runs/pipeline). Flags given on the command line win
            over a --config recipe whatever their order.
        recipe: Pipeline settings (`--config src/baichuan2/recipes/pipeline-default.yaml` or flags).
        until: Stop after this stage (corpus, data, tokenizer, tokens, pretrain, scaling, sample, sft, eval).
    """
    if out_dir:
        recipe.out_dir = out_dir
    run_all(recipe, until)


COMMANDS = pipeline
