"""Few-shot multiple-choice evaluation: prompts -> scores -> per-subject / per-category / average accuracy.

Two scoring modes (both reported by name in the results, since they differ by points, see lm-eval#1421):
  ``letter``  argmax over the answer letters' next-token logits at the last prompt position
              (official CMMLU/MMLU scripts, Baichuan's evaluation);
  ``loglik``  argmax of log p(" A" | prompt) and so on, one continuation per option (lm-eval's ``acc``).

Prompts longer than the context drop few-shot examples from the end until they fit (hendrycks/Baichuan
rule). Each item's result is appended to ``items.jsonl`` as soon as its batch is scored, so an
interrupted run resumes where it stopped; ``results.json`` is written atomically at the end.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from baichuan2.eval.scoring import continuation_logprobs, letter_logprobs
from baichuan2.eval.tasks import LETTERS, Benchmark, Item, Subject
from baichuan2.utils.io import atomic_write_json, iter_jsonl

# Baichuan 2 technical report / README, base models (C-Eval, MMLU, CMMLU, Gaokao, AGIEval 5-shot; BBH 3-shot).
PAPER = {
    "baichuan2-7b-base": {"ceval": 54.00, "mmlu": 54.16, "cmmlu": 57.07, "gaokao": 47.47, "agieval": 42.73,
                          "bbh": 41.56},
    "baichuan2-13b-base": {"ceval": 58.10, "mmlu": 59.17, "cmmlu": 61.97, "gaokao": 54.33, "agieval": 48.17,
                           "bbh": 48.78},
}


@dataclass
class MCArgs:
    """Args:
        shots: Few-shot examples per prompt (5 in the paper).
        mode: "letter" (next-token logits of the letters; Baichuan/official) or "loglik" (lm-eval style).
        limit: Items per subject (0 = all); for quick checks.
        batch_size: Prompts per forward pass.
    """

    shots: int = 5
    mode: str = "letter"
    limit: int = 0
    batch_size: int = 8


def fit_shots(tok, render: Callable[[int], str], shots: int, max_tokens: int) -> list[int]:
    """``[bos] + ids`` of ``render(k)`` for the largest ``k <= shots`` that fits ``max_tokens`` (shots dropped
    from the end); a zero-shot prompt that still does not fit keeps its end."""
    k = shots
    while True:
        ids = [tok.bos_id] + tok.encode(render(k))
        if len(ids) <= max_tokens or k == 0:
            return ids if len(ids) <= max_tokens else [tok.bos_id] + ids[-(max_tokens - 1):]
        k -= 1


def build_prompt(tok, bench: Benchmark, subject: Subject, item: Item, shots: int, max_tokens: int) -> list[int]:
    """Token ids of the few-shot prompt, dropping shots from the end until it fits ``max_tokens``."""
    return fit_shots(tok, lambda k: bench.prompt(subject, subject.dev[:k], item), min(shots, len(subject.dev)),
                     max_tokens)


def letter_token_ids(tok, n: int) -> list[int]:
    return [tok.encode(letter)[-1] for letter in LETTERS[:n]]


def _score(model, tok, bench, subject: Subject, items: list[Item], args: MCArgs) -> list[dict]:
    limit = model.config.max_position_embeddings
    if args.mode == "letter":
        prompts = [build_prompt(tok, bench, subject, it, args.shots, limit) for it in items]
        groups: dict[int, list[int]] = defaultdict(list)  # by number of options (AGIEval mixes 4 and 5)
        for i, it in enumerate(items):
            groups[len(it.choices)].append(i)
        scores: list[list[float]] = [[] for _ in items]
        for n, idx in groups.items():
            lp = letter_logprobs(model, [prompts[i] for i in idx], letter_token_ids(tok, n), args.batch_size)
            for row, i in zip(lp.tolist(), idx, strict=True):
                scores[i] = row
    elif args.mode == "loglik":
        pairs, owners = [], []
        for i, it in enumerate(items):
            conts = [tok.encode(" " + LETTERS[j]) for j in range(len(it.choices))]
            ctx = build_prompt(tok, bench, subject, it, args.shots, limit - max(map(len, conts)))
            pairs += [(ctx, cont) for cont in conts]
            owners += [i] * len(conts)
        scores = [[] for _ in items]
        for (lp, _), i in zip(continuation_logprobs(model, pairs, args.batch_size), owners, strict=True):
            scores[i].append(lp)
    else:
        raise ValueError(f"unknown scoring mode {args.mode!r} (letter or loglik)")
    out = []
    for it, s in zip(items, scores, strict=True):
        pred = LETTERS[max(range(len(s)), key=s.__getitem__)]
        out.append({"subject": subject.name, "index": it.index, "answer": it.answer, "pred": pred,
                    "correct": pred == it.answer, "scores": [round(x, 4) for x in s]})
    return out


def evaluate_mc(model, tok, bench: Benchmark, args: MCArgs, out_dir: str | Path, progress: bool = True) -> dict:
    """Score every test item (resuming from ``out_dir/items.jsonl``), aggregate, write ``results.json``."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache_file = out / "items.jsonl"
    settings = {"benchmark": bench.name, "shots": args.shots, "mode": args.mode, "limit": args.limit}
    settings_file = out / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        cache_file.unlink(missing_ok=True)  # different settings: cached scores are not comparable
    atomic_write_json(settings_file, settings)
    done: dict[tuple[str, int], dict] = {}
    if cache_file.exists():
        for _, r in iter_jsonl(cache_file, strict=False):
            if not isinstance(r, Exception):  # a line cut by a crash: that item is simply scored again
                done[(r["subject"], r["index"])] = r
    todo = [(s, s.test[: args.limit] if args.limit else s.test) for s in bench.subjects.values()]
    total = sum(len(items) for _, items in todo)
    start = time.time()
    scored = 0
    bar = tqdm(total=total, desc=f"{bench.name} ({args.shots}-shot, {args.mode})", unit="q", disable=not progress)
    with open(cache_file, "a", encoding="utf-8") as fh:
        for s, items in todo:
            pending = [it for it in items if (s.name, it.index) not in done]
            bar.update(len(items) - len(pending))
            for k in range(0, len(pending), args.batch_size * 4):
                chunk = pending[k: k + args.batch_size * 4]
                for r in _score(model, tok, bench, s, chunk, args):
                    done[(s.name, r["index"])] = r
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
                fh.flush()
                scored += len(chunk)
                bar.update(len(chunk))
    bar.close()
    seconds = time.time() - start
    results = aggregate(bench, [done[(s.name, it.index)] for s, items in todo for it in items])
    results.update(settings=settings, seconds=round(seconds, 2),
                   items_per_second=round(scored / seconds, 2) if scored and seconds > 0 else None)
    atomic_write_json(out / "results.json", results)
    return results


def aggregate(bench: Benchmark, records: list[dict]) -> dict:
    """Accuracy (%) per subject, per category, micro (item-weighted) and macro (subject mean) averages."""
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_subject[r["subject"]].append(bool(r["correct"]))
    subjects = {k: {"accuracy": 100 * sum(v) / len(v), "n": len(v), "category": bench.subjects[k].category}
                for k, v in by_subject.items()}
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for k, v in by_subject.items():
        by_cat[bench.subjects[k].category].extend(v)
    flat = [c for v in by_subject.values() for c in v]
    return {"benchmark": bench.name,
            "accuracy": 100 * sum(flat) / max(len(flat), 1),
            "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1),
            "n": len(flat), "categories": {k: {"accuracy": 100 * sum(v) / len(v), "n": len(v)}
                                           for k, v in sorted(by_cat.items())},
            "subjects": dict(sorted(subjects.items()))}


def format_table(results: dict, per_subject: bool = False) -> str:
    lines = [f"{results['benchmark']}: {results['accuracy']:.2f}% (micro, {results['n']} questions), "
             f"{results['macro_accuracy']:.2f}% (macro)"]
    rows = results["subjects"] if per_subject else results["categories"]
    width = max((len(k) for k in rows), default=8) + 2
    lines.append(f"  {'subject' if per_subject else 'category':<{width}}{'acc %':>8}{'n':>7}")
    lines += [f"  {k:<{width}}{v['accuracy']:>8.2f}{v['n']:>7}" for k, v in rows.items()]
    return "\n".join(lines)


def compare(results: dict[str, float], reference: dict[str, float]) -> str:
    """Table of ours vs a reference (e.g. ``PAPER['baichuan2-7b-base']``) on the benchmarks both have."""
    lines = [f"{'benchmark':<10}{'ours':>8}{'reference':>11}{'diff':>8}"]
    for k in sorted(set(results) & set(reference)):
        lines.append(f"{k:<10}{results[k]:>8.2f}{reference[k]:>11.2f}{results[k] - reference[k]:>+8.2f}")
    return "\n".join(lines)
