"""GSM8K: 4-shot chain-of-thought, greedy, exact match on the final number (Baichuan 2 Table 1, OpenCompass style).

Layout (openai/grade-school-math): ``train.jsonl`` and ``test.jsonl`` with ``{"question", "answer"}``, the
answer a worked solution with ``<<48/2=24>>`` calculator notes ending in ``#### 72``. The exemplars are the
first ``shots`` train problems, written as OpenCompass writes its GSM8K prompt::

    Question: {question}
    Let's think step by step
    Answer:
    {solution without calculator notes}
    The answer is {number}

Generation stops at the next "Question:"; the prediction is the number after "The answer is" (or
"####"), else the last number in the completion; commas, currency signs and units are stripped and the
values compared as numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

from baichuan2.eval.cache import ItemCache
from baichuan2.eval.generation import GenArgs, prompt_budget, run_generation, stop_at
from baichuan2.utils.io import InputError, atomic_write_json, iter_jsonl

_CALC = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def load_split(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found (GSM8K expects train.jsonl and test.jsonl)")
    rows = []
    for line, r in iter_jsonl(path):
        if not isinstance(r, dict) or "question" not in r or "answer" not in r:
            raise InputError(f"{path}:{line}: expected {{\"question\", \"answer\"}}")
        rows.append(r)
    return rows


def reference_answer(solution: str) -> str:
    """The number after ``####`` in a GSM8K solution."""
    if "####" not in solution:
        raise InputError(f"GSM8K solution without '####': {solution[:60]!r}")
    return normalize_number(solution.split("####")[-1]) or ""


def exemplar(row: dict) -> str:
    steps, _, final = row["answer"].rpartition("####")
    steps = _CALC.sub("", steps).strip()
    return (f"Question: {row['question'].strip()}\nLet's think step by step\nAnswer:\n{steps}\n"
            f"The answer is {normalize_number(final)}\n\n")


def build_prompt(shots: list[dict], question: str) -> str:
    return "".join(exemplar(s) for s in shots) + f"Question: {question.strip()}\nLet's think step by step\nAnswer:\n"


def normalize_number(text: str) -> str | None:
    """The first number in ``text`` as a canonical string ('1,000.50' -> '1000.5', '$7' -> '7')."""
    m = _NUMBER.search(text.replace("$", ""))
    if not m:
        return None
    s = m.group(0).replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(completion: str) -> str | None:
    """The model's final number: after "The answer is" / "####" if present, else the last number."""
    text = completion.split("Question:")[0]
    for marker in ("The answer is", "the answer is", "####"):
        if marker in text:
            found = normalize_number(text.rsplit(marker, 1)[1])
            if found is not None:
                return found
    numbers = _NUMBER.findall(text.replace("$", ""))
    return normalize_number(numbers[-1]) if numbers else None


def evaluate_gsm8k(model, tok, data: str | Path, args: GenArgs, out_dir: str | Path, shots: int = 4,
                   progress: bool = True) -> dict:
    """Exact-match accuracy on the test split (resumable); writes ``results.json`` and ``items.jsonl``."""
    from baichuan2.eval.harness import bos_prefix, fit_shots

    data = Path(data)
    train, test = load_split(data / "train.jsonl"), load_split(data / "test.jsonl")
    test = test[: args.limit] if args.limit else test
    prefix = bos_prefix(tok, args.bos)
    budget = prompt_budget(model, args.max_new_tokens)
    items = []
    for i, row in enumerate(test):
        p = fit_shots(tok, lambda k, q=row["question"]: build_prompt(train[:k], q), shots, budget, prefix)
        items.append({"key": i, "ids": p.ids, "shots": p.shots, "target": reference_answer(row["answer"])})

    def score(chunk: list[dict], completions: list[list[str]]) -> list[dict]:
        out = []
        for it, texts in zip(chunk, completions, strict=True):
            preds = [extract_answer(t) for t in texts]
            out.append({"key": it["key"], "target": it["target"], "pred": preds[0], "shots": it["shots"],
                        "correct": [p == it["target"] for p in preds], "completion": texts[0]})
        return out

    settings = {"benchmark": "gsm8k", "shots": shots, "limit": args.limit, "n": args.n,
                "max_new_tokens": args.max_new_tokens, "bos": bool(prefix),
                **({} if args.greedy else {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed})}
    with ItemCache(out_dir, settings, ("key",)) as cache:
        timing = run_generation(model, tok, items, args, stop_at(["Question:"]), score, cache, "gsm8k", progress)
        records = [cache[(it["key"],)] for it in items]
    correct = [r["correct"][0] for r in records]
    results = {"benchmark": "gsm8k", "accuracy": 100 * sum(correct) / max(len(records), 1), "n": len(records),
               "shots": shots, "mean_shots": sum(it["shots"] for it in items) / max(len(items), 1),
               "settings": settings, **timing}
    atomic_write_json(Path(out_dir) / "results.json", results)
    return results
