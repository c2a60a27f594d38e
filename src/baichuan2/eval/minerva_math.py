r"""MATH (Hendrycks et al. 2021): 4-shot Minerva prompt, greedy, exact match after Minerva's normalisation.

Data (given by the user; none ships here): the MATH layout ``<root>/test/<Type>/<id>.json`` (or any folder
of such ``.json`` files), or JSONL files with one problem per line; each problem has ``problem``,
``solution`` (the answer in ``\boxed{}``), ``level`` ("Level 1".."Level 5") and ``type`` ("Algebra", ...).

Prompt (Lewkowycz et al. 2022, Minerva, Appendix D.2; as lm-eval's ``minerva_math``): four fixed worked
problems, each ``Problem:\n{problem}\n\nSolution:\n{solution}`` whose solution ends with
"Final Answer: The final answer is $X$. I hope it is correct."; generation stops at the next "Problem:".
The prediction is X (else the last ``\boxed{}``); prediction and the solution's last ``\boxed{}`` are both
normalised with Minerva's ``normalize_final_answer`` (units, ``\text{}``, spaces, ``\fracab``, thousands
separators; we also read ``\dfrac``/``\tfrac`` as ``\frac``) and compared as strings.
Accuracy is reported overall, per type and per level.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from baichuan2.eval.cache import ItemCache
from baichuan2.eval.generation import GenArgs, prompt_budget, run_generation, stop_at
from baichuan2.utils.io import InputError, atomic_write_json, iter_jsonl

# (the stray "}" after the first problem is in the published prompt, kept for comparability)
MINERVA_SHOTS = [
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
     "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives "
     "$x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\n"
     "Final Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
     "times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
     "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
     "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
     "Final Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
     "$(x, y)$ where $x$ and $y$ are both nonzero, find $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we "
     "also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
     "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
]

# Minerva's normalize_final_answer (Lewkowycz et al. 2022, Listing 1)
SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
REMOVED_EXPRESSIONS = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
                       "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
                       "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
                       "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
                       "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots"]


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (plus ``\\dfrac``/``\\tfrac`` read as ``\\frac``)."""
    answer = answer.split("=")[-1]
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        answer = answer.replace(expr, "")
    # the answer inside $...$, \text{}, \textbf{}, \overline{}, \boxed{}
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    # shorthand TeX: \fracab -> \frac{a}{b}, \fracabc -> \frac{a}{b}c, \sqrta -> \sqrt{a}, \sqrtab -> \sqrt{a}b
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # 100,000 -> 100000
        answer = answer.replace(",", "")
    return answer


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}`` / ``\\boxed x``), braces balanced."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    rest = text[i:]
    if rest.startswith("\\boxed "):
        return rest[len("\\boxed "):].split("$")[0].strip()
    start = rest.find("{")
    if start < 0:
        return None
    depth = 0
    for j, ch in enumerate(rest[start:], start):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return rest[start + 1: j]
    return None


_FINAL = re.compile(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.", re.S)


def extract_answer(completion: str) -> str | None:
    """Minerva's "Final Answer: The final answer is X. I hope it is correct.", else the last ``\\boxed{}``."""
    text = completion.split("Problem:")[0]
    m = _FINAL.search(text)
    if m:
        return m.group(1).strip()
    return last_boxed(text)


def build_prompt(problem: str, shots: int = 4) -> str:
    out = "".join(f"Problem:\n{q}\n\nSolution:\n{a}\n\n" for q, a in MINERVA_SHOTS[:shots])
    return out + f"Problem:\n{problem}\n\nSolution:\n"


def _check(row, where: str) -> dict:
    if not isinstance(row, dict) or not {"problem", "solution"} <= set(row):
        raise InputError(f"{where}: expected a MATH problem with problem, solution, level, type")
    if last_boxed(row["solution"]) is None:
        raise InputError(f"{where}: the solution has no \\boxed{{}} answer")
    return {"problem": row["problem"], "solution": row["solution"], "level": str(row.get("level", "?")),
            "type": str(row.get("type", "?"))}


def load_math(path: str | Path) -> list[dict]:
    """Problems from a MATH directory (``test/<Type>/*.json`` or any ``*.json``/``*.jsonl`` below it) or files."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found (MATH data: a directory of .json problems or .jsonl files)")
    if path.is_dir():
        root = path / "test" if (path / "test").is_dir() else path
        files = sorted(p for p in root.rglob("*") if p.suffix in (".json", ".jsonl"))
    else:
        files = [path]
    problems = []
    for f in files:
        if f.suffix == ".jsonl":
            problems += [_check(r, f"{f}:{line}") for line, r in iter_jsonl(f)]
        else:
            try:
                row = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{f}: not JSON ({e})") from None
            rows = row if isinstance(row, list) else [row]
            problems += [_check(r, str(f)) for r in rows]
    if not problems:
        raise InputError(f"{path}: no MATH problems found")
    return problems


def evaluate_math(model, tok, data: str | Path, args: GenArgs, out_dir: str | Path, shots: int = 4,
                  progress: bool = True) -> dict:
    """Accuracy overall, per type and per level (resumable); writes ``results.json`` and ``items.jsonl``."""
    from baichuan2.eval.harness import bos_prefix, fit_shots

    problems = load_math(data)
    problems = problems[: args.limit] if args.limit else problems
    prefix, budget = bos_prefix(tok, args.bos), prompt_budget(model, args.max_new_tokens)
    items = []
    for i, p in enumerate(problems):
        prompt = fit_shots(tok, lambda k, q=p["problem"]: build_prompt(q, k), shots, budget, prefix)
        items.append({"key": i, "ids": prompt.ids, "shots": prompt.shots,
                      "target": normalize_final_answer(last_boxed(p["solution"]) or ""), "type": p["type"],
                      "level": p["level"]})

    def score(chunk: list[dict], completions: list[list[str]]) -> list[dict]:
        out = []
        for it, texts in zip(chunk, completions, strict=True):
            raw = [extract_answer(t) for t in texts]
            preds = [normalize_final_answer(r) if r is not None else None for r in raw]
            out.append({"key": it["key"], "type": it["type"], "level": it["level"], "target": it["target"],
                        "pred": preds[0], "shots": it["shots"], "correct": [p == it["target"] for p in preds],
                        "completion": texts[0]})
        return out

    settings = {"benchmark": "math", "shots": shots, "limit": args.limit, "n": args.n,
                "max_new_tokens": args.max_new_tokens, "bos": bool(prefix)}
    with ItemCache(out_dir, settings, ("key",)) as cache:
        timing = run_generation(model, tok, items, args, stop_at(["Problem:"]), score, cache, "math", progress)
        records = [cache[(it["key"],)] for it in items]

    def table(field: str) -> dict:
        groups: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            groups[r[field]].append(r["correct"][0])
        return {k: {"accuracy": 100 * sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}

    results = {"benchmark": "math", "accuracy": 100 * sum(r["correct"][0] for r in records) / max(len(records), 1),
               "n": len(records), "shots": shots, "by_type": table("type"), "by_level": table("level"),
               "settings": settings, **timing}
    atomic_write_json(Path(out_dir) / "results.json", results)
    return results
