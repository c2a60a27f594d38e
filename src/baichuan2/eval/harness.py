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
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from baichuan2.eval.cache import ItemCache
from baichuan2.eval.scoring import continuation_logprobs, letter_logprobs
from baichuan2.eval.tasks import ANSWER_SEPARATOR, LETTERS, Benchmark, Item, Subject
from baichuan2.utils.io import atomic_write_json

# Baichuan 2 technical report Table 1 (= GitHub README; C-Eval, MMLU, CMMLU, Gaokao, AGIEval 5-shot; BBH 3-shot;
# GSM8K 4-shot; HumanEval 0-shot pass@1) and Table 6 (MATH 4-shot, MBPP 3-shot), base models.
PAPER = {
    "baichuan2-7b-base": {"ceval": 54.00, "mmlu": 54.16, "cmmlu": 57.07, "gaokao": 47.47, "agieval": 42.73,
                          "bbh": 41.56, "gsm8k": 24.49, "humaneval": 18.29, "math": 5.58, "mbpp": 24.20},
    "baichuan2-13b-base": {"ceval": 58.10, "mmlu": 59.17, "cmmlu": 61.97, "gaokao": 54.33, "agieval": 48.17,
                           "bbh": 48.78, "gsm8k": 52.77, "humaneval": 17.07, "math": 10.08, "mbpp": 30.20},
}


@dataclass
class MCArgs:
    """Args:
        shots: Few-shot examples per prompt (5 in the paper).
        mode: "letter" (next-token logits of the letters; Baichuan/official) or "loglik" (lm-eval style).
        limit: Items per subject (0 = all); for quick checks.
        batch_size: Prompts per forward pass.
        bos: Start prompts with BOS: "auto" (the tokenizer config's add_bos_token), "true" or "false".
    """

    shots: int = 5
    mode: str = "letter"
    limit: int = 0
    batch_size: int = 8
    bos: str = "auto"


def wants_bos(tok) -> bool:
    """Whether prompts start with BOS: the tokenizer's ``add_bos_token`` (its attribute, else its directory's
    ``tokenizer_config.json``). The official Baichuan 2 tokenizer says false (base-model usage is
    ``tokenizer(prompt)``), and our pretraining separates documents with EOS only, so no config means no BOS."""
    flag = getattr(tok, "add_bos_token", None)
    if flag is not None:
        return bool(flag)
    source = getattr(tok, "model_file", None) or getattr(tok, "path", None)
    if source is not None:
        config = Path(source) if Path(source).is_dir() else Path(source).parent
        config = config / "tokenizer_config.json"
        if config.is_file():
            return bool(json.loads(config.read_text(encoding="utf-8")).get("add_bos_token", False))
    return False


def bos_prefix(tok, bos: str | bool = "auto") -> list[int]:
    """``[bos_id]`` or ``[]``: ``bos`` is "auto" (follow the tokenizer config), true/"true" or false/"false"."""
    choice = str(bos).lower()
    if choice not in ("auto", "true", "false"):
        raise ValueError(f"bos must be auto, true or false, got {bos!r}")
    add = wants_bos(tok) if choice == "auto" else choice == "true"
    bos_id = getattr(tok, "bos_id", None)
    return [bos_id] if add and bos_id is not None and bos_id >= 0 else []


@dataclass
class Prompt:
    ids: list[int]
    text: str
    shots: int  # few-shot examples that fit (may be fewer than asked)


def fit_shots(tok, render: Callable[[int], str], shots: int, max_tokens: int, prefix: Sequence[int] = ()) -> Prompt:
    """``prefix + ids`` of ``render(k)`` for the largest ``k <= shots`` that fits ``max_tokens`` (shots dropped
    from the end); a zero-shot prompt that still does not fit keeps its end."""
    prefix = list(prefix)
    k = shots
    while True:
        text = render(k)
        ids = prefix + tok.encode(text)
        if len(ids) <= max_tokens:
            return Prompt(ids, text, k)
        if k == 0:
            return Prompt(prefix + ids[len(prefix):][-(max_tokens - len(prefix)):], text, 0)
        k -= 1


def build_prompt(tok, bench: Benchmark, subject: Subject, item: Item, shots: int, max_tokens: int,
                 prefix: Sequence[int] = ()) -> Prompt:
    """The few-shot prompt, dropping shots from the end until it fits ``max_tokens``."""
    return fit_shots(tok, lambda k: bench.prompt(subject, subject.dev[:k], item), min(shots, len(subject.dev)),
                     max_tokens, prefix)


def answer_ids(tok, prompt_text: str, answer: str) -> list[int]:
    """The tokens ``answer`` adds after ``prompt_text``, read off the encoding of the two together (as
    lm-eval splits context and continuation). SentencePiece and byte-level BPE differ here: after
    "Answer:" a byte-level BPE writes " A" as one token, not "A"; Baichuan's SentencePiece writes "▁A"."""
    tail = prompt_text[-48:]  # merges never reach further back than a few characters
    ctx = tok.encode(tail)
    whole = tok.encode(tail + answer)
    common = 0
    while common < min(len(ctx), len(whole)) and ctx[common] == whole[common]:
        common += 1
    if common == len(whole):  # cannot happen for non-empty text, but never return nothing
        return tok.encode(answer)
    return whole[common:]


def letter_targets(tok, prompt_text: str, n: int, separator: str = "") -> tuple[list[int], list[int]]:
    """``(shared, letter_ids)`` for scoring the first ``n`` answer letters after ``prompt_text`` by one next-token
    distribution: ``shared`` are tokens every answer starts with (a byte-level BPE without a " A" token writes
    " A" as "Ġ" + "A"), appended to the prompt; ``letter_ids`` the first token where the answers differ."""
    answers = [answer_ids(tok, prompt_text, separator + letter) for letter in LETTERS[:n]]
    shared: list[int] = []
    for column in zip(*answers):
        if len(set(column)) > 1:
            break
        shared.append(column[0])
    k = len(shared)
    if any(len(a) <= k for a in answers) or len({a[k] for a in answers}) < n:
        raise ValueError("the answer letters do not start with distinct tokens under this tokenizer; "
                         "use loglik scoring")
    return shared, [a[k] for a in answers]


def letter_token_ids(tok, n: int, prompt_text: str = "", separator: str = "") -> list[int]:
    """The token that tells the first ``n`` answer letters apart right after ``prompt_text``."""
    shared, ids = letter_targets(tok, prompt_text, n, separator)
    if shared:
        raise ValueError("the answer letters share leading tokens here; use letter_targets")
    return ids


def _score(model, tok, bench, subject: Subject, items: list[Item], args: MCArgs) -> list[dict]:
    limit = model.config.max_position_embeddings
    prefix = bos_prefix(tok, args.bos)
    sep = ANSWER_SEPARATOR.get(bench.name, "")
    if args.mode == "letter":
        # grouped by the letters' ids (AGIEval mixes 4 and 5 options; ids depend on how the prompt ends)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        prompts, rows = [], []
        for i, it in enumerate(items):
            shared, letters = letter_targets(tok, bench.prompt(subject, [], it), len(it.choices), sep)
            p = build_prompt(tok, bench, subject, it, args.shots, limit - len(shared), prefix)
            prompts.append(p)
            rows.append(p.ids + shared)
            groups[tuple(letters)].append(i)
        scores: list[list[float]] = [[] for _ in items]
        for letters, idx in groups.items():
            lp = letter_logprobs(model, [rows[i] for i in idx], letters, args.batch_size)
            for row, i in zip(lp.tolist(), idx, strict=True):
                scores[i] = row
    elif args.mode == "loglik":
        pairs, owners, prompts = [], [], []
        for i, it in enumerate(items):
            probe = bench.prompt(subject, [], it)  # continuations depend only on how the prompt ends
            conts = [answer_ids(tok, probe, sep + LETTERS[j]) for j in range(len(it.choices))]
            p = build_prompt(tok, bench, subject, it, args.shots, limit - max(map(len, conts)), prefix)
            prompts.append(p)
            pairs += [(p.ids, cont) for cont in conts]
            owners += [i] * len(conts)
        scores = [[] for _ in items]
        for (lp, _), i in zip(continuation_logprobs(model, pairs, args.batch_size), owners, strict=True):
            scores[i].append(lp)
    else:
        raise ValueError(f"unknown scoring mode {args.mode!r} (letter or loglik)")
    out = []
    for it, s, p in zip(items, scores, prompts, strict=True):
        pred = LETTERS[max(range(len(s)), key=s.__getitem__)]
        out.append({"subject": subject.name, "index": it.index, "answer": it.answer, "pred": pred,
                    "correct": pred == it.answer, "shots": p.shots, "scores": [round(x, 4) for x in s]})
    return out


def evaluate_mc(model, tok, bench: Benchmark, args: MCArgs, out_dir: str | Path, progress: bool = True) -> dict:
    """Score every test item (resuming from ``out_dir/items.jsonl``), aggregate, write ``results.json``."""
    from tqdm import tqdm

    out = Path(out_dir)
    settings = {"benchmark": bench.name, "shots": args.shots, "mode": args.mode, "limit": args.limit,
                "bos": bool(bos_prefix(tok, args.bos))}
    todo = [(s, s.test[: args.limit] if args.limit else s.test) for s in bench.subjects.values()]
    total = sum(len(items) for _, items in todo)
    start = time.time()
    scored = 0
    bar = tqdm(total=total, desc=f"{bench.name} ({args.shots}-shot, {args.mode})", unit="q", disable=not progress)
    with ItemCache(out, settings, ("subject", "index")) as cache:
        for s, items in todo:
            pending = [it for it in items if (s.name, it.index) not in cache]
            bar.update(len(items) - len(pending))
            for k in range(0, len(pending), args.batch_size * 4):
                chunk = pending[k: k + args.batch_size * 4]
                cache.add(_score(model, tok, bench, s, chunk, args))
                scored += len(chunk)
                bar.update(len(chunk))
        records = [cache[(s.name, it.index)] for s, items in todo for it in items]
    bar.close()
    seconds = time.time() - start
    results = aggregate(bench, records, args.shots)
    results.update(settings=settings, seconds=round(seconds, 2),
                   items_per_second=round(scored / seconds, 2) if scored and seconds > 0 else None)
    short = results["fewer_shots"]
    if short:
        print(f"warning: {bench.name}: {short} of {results['n']} questions got fewer than {args.shots} shots "
              f"(mean {results['mean_shots']:.2f}) to fit the {model.config.max_position_embeddings}-token context", file=sys.stderr)
    atomic_write_json(out / "results.json", results)
    return results


def aggregate(bench: Benchmark, records: list[dict], asked: int = 0) -> dict:
    """Accuracy (%) per subject, per category, micro (item-weighted) and macro (subject mean) averages, and the
    shots the prompts really held (``asked``: shots requested; 0 = do not count shortfalls)."""
    by_subject: dict[str, list[bool]] = defaultdict(list)
    shots: dict[str, list[int]] = defaultdict(list)
    for r in records:
        by_subject[r["subject"]].append(bool(r["correct"]))
        shots[r["subject"]].append(int(r.get("shots", 0)))
    subjects = {k: {"accuracy": 100 * sum(v) / len(v), "n": len(v), "category": bench.subjects[k].category,
                    "mean_shots": round(sum(shots[k]) / len(v), 3), "min_shots": min(shots[k])}
                for k, v in by_subject.items()}
    # items that got fewer shots than asked for (the subject's dev set may itself hold fewer)
    fewer = sum(x < min(asked, len(bench.subjects[k].dev)) for k, v in shots.items() for x in v) if asked else 0
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for k, v in by_subject.items():
        by_cat[bench.subjects[k].category].extend(v)
    flat = [c for v in by_subject.values() for c in v]
    return {"benchmark": bench.name,
            "accuracy": 100 * sum(flat) / max(len(flat), 1),
            "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / max(len(subjects), 1),
            "n": len(flat), "mean_shots": sum(map(sum, shots.values())) / max(len(flat), 1),
            "fewer_shots": fewer, "categories": {k: {"accuracy": 100 * sum(v) / len(v), "n": len(v)}
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
