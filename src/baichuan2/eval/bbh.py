"""BIG-Bench Hard, 3-shot, answer only, exact match (Baichuan 2's BBH setting; lm-eval's ``bbh_fewshot``).

Layout (suzgunmirac/BIG-Bench-Hard): ``bbh/<task>.json`` with ``{"examples": [{"input", "target"}]}`` and
``cot-prompts/<task>.txt`` holding the task description and three exemplars with chain-of-thought
answers ending in "So the answer is X.". The answer-only prompt keeps the description and the final
answers: ``description + "\\n\\n" + "Q: {input}\\nA: {answer}\\n\\n" x3 + "Q: {input}\\nA:"``. Generation is greedy
and stops at a blank line or the next "Q:"; the stripped first line is compared with the target.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from baichuan2.utils.io import InputError, atomic_write_json


@dataclass
class BBHTask:
    name: str
    description: str
    shots: list[tuple[str, str]]  # (input, answer)
    examples: list[tuple[str, str]]  # (input, target)

    def prompt(self, question: str, k: int = 3) -> str:
        out = self.description + "\n\n"
        for q, a in self.shots[:k]:
            out += f"Q: {q}\nA: {a}\n\n"
        return out + f"Q: {question}\nA:"


_ANSWER = re.compile(r"So the answer is (.+?)\.?\s*$", re.S)


def parse_cot_prompt(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Description and (question, final answer) exemplars of a BBH ``cot-prompts/<task>.txt`` file."""
    body = text.split("-----", 1)[1] if "-----" in text else text
    blocks = re.split(r"\n\s*\nQ: ", "\n\n" + body.strip())
    description = blocks[0].strip()
    shots = []
    for block in blocks[1:]:
        if "\nA: " not in block:
            continue
        q, a = block.split("\nA: ", 1)
        m = _ANSWER.search(a.strip())
        shots.append((q.strip(), (m.group(1) if m else a).strip()))
    if not description or not shots:
        raise InputError("not a BBH chain-of-thought prompt file (description, then Q:/A: exemplars)")
    return description, shots


def load_bbh(root: str | Path) -> dict[str, BBHTask]:
    root = Path(root)
    tasks = {}
    data = root / "bbh"
    if not data.exists():
        raise InputError(f"{data}: not found (expected the BIG-Bench-Hard layout bbh/ + cot-prompts/)")
    for path in sorted(data.glob("*.json")):
        prompt_file = root / "cot-prompts" / f"{path.stem}.txt"
        if not prompt_file.exists():
            raise InputError(f"{prompt_file}: missing exemplars for task {path.stem}")
        try:
            description, shots = parse_cot_prompt(prompt_file.read_text(encoding="utf-8"))
        except InputError as e:
            raise InputError(f"{prompt_file}: {e}") from None
        examples = [(e["input"], str(e["target"])) for e in json.loads(path.read_text(encoding="utf-8"))["examples"]]
        tasks[path.stem] = BBHTask(path.stem, description, shots, examples)
    if not tasks:
        raise InputError(f"{data}: no BBH tasks")
    return tasks


def extract_answer(generated: str) -> str:
    text = generated.split("\n\n")[0].split("\nQ:")[0]
    return text.strip().split("\n")[0].strip()


def evaluate_bbh(model, tok, tasks: dict[str, BBHTask], out_dir: str | Path, shots: int = 3, limit: int = 0,
                 batch_size: int = 8, max_new_tokens: int = 32, progress: bool = True) -> dict:
    """Greedy 3-shot exact-match accuracy per task and averaged (items and tasks); writes results.json."""
    from tqdm import tqdm

    from baichuan2.eval.harness import bos_prefix, fit_shots
    from baichuan2.model.generate import SamplingConfig, generate

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False, stop_token_ids=[tok.eos_id])
    context = model.config.max_position_embeddings - max_new_tokens
    prefix = bos_prefix(tok)
    per_task, records = {}, []
    total = sum(min(len(t.examples), limit or len(t.examples)) for t in tasks.values())
    bar = tqdm(total=total, desc=f"bbh ({shots}-shot)", unit="q", disable=not progress)
    start = time.time()
    for name, task in tasks.items():
        examples = task.examples[:limit] if limit else task.examples
        correct = 0
        for k in range(0, len(examples), batch_size):
            batch = examples[k: k + batch_size]
            prompts = [fit_shots(tok, lambda k, q=q: task.prompt(q, k), min(shots, len(task.shots)), context,
                                 prefix).ids for q, _ in batch]
            outs = generate(model, prompts, cfg)
            for (q, target), ids in zip(batch, outs, strict=True):
                pred = extract_answer(tok.decode(ids))
                correct += pred == target
                records.append({"task": name, "target": target, "pred": pred, "correct": pred == target})
            bar.update(len(batch))
        per_task[name] = {"accuracy": 100 * correct / max(len(examples), 1), "n": len(examples)}
    bar.close()
    n = sum(t["n"] for t in per_task.values())
    results = {"benchmark": "bbh", "shots": shots,
               "accuracy": 100 * sum(r["correct"] for r in records) / max(n, 1),
               "macro_accuracy": sum(t["accuracy"] for t in per_task.values()) / max(len(per_task), 1),
               "n": n, "tasks": per_task, "seconds": round(time.time() - start, 2)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    with open(out / "items.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return results
