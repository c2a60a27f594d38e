"""CMMLU 5-shot evaluation throughput: ours vs lm-evaluation-harness (HF backend) on the same tiny model.

The model is a small random Baichuan with the real Baichuan 2 tokenizer, saved in the HF layout so
lm-eval's ``hf`` backend loads it through ``AutoModelForCausalLM`` (registered by ``import baichuan2``).
lm-eval gets a local task per CMMLU subject (its own ``cmmlu`` template, CSV files from disk, 5 shots
from dev, first_n), so no download happens. Contenders, same questions:

  * lm-eval + HF backend (``HFLM``, loaded before timing): 4 log-likelihood requests per question;
  * lm-eval + our adapter (``Baichuan2LM``): the same requests through our batched scorer;
  * ours, ``loglik`` mode: the same 4 continuations per question;
  * ours, ``letter`` mode: one forward per question (the official CMMLU/Baichuan scoring).

    python benchmarks/eval_throughput.py [--bench ../shared/data/bench/cmmlu] [--subjects 4] [--limit 25]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

TASK_YAML = """task: {task}
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "以下是关于{name}的单项选择题，请直接给出正确答案的选项。\\n\\n"
doc_to_text: "{{{{Question.strip()}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{Answer}}}}"
metric_list:
  - metric: acc
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default=str(REPO.parent / "shared" / "data" / "bench" / "cmmlu"))
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "baichuan2-tokenizer"))
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--limit", type=int, default=25, help="questions per subject")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import csv
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    import baichuan2  # noqa: F401  (registers the Auto classes)
    from baichuan2.eval.harness import MCArgs, evaluate_mc
    from baichuan2.eval.lm_eval_adapter import Baichuan2LM
    from baichuan2.eval.tasks import load_benchmark
    from baichuan2.model import Baichuan, ModelConfig
    from baichuan2.model.checkpoint import save_pretrained
    from baichuan2.tokenizer import Tokenizer

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="evalbench-"))
    tok = Tokenizer.from_pretrained(args.tokenizer)
    cfg = ModelConfig.from_name("tiny-rope", vocab_size=tok.vocab_size, max_position_embeddings=2048)
    model = Baichuan(cfg).eval()
    save_pretrained(model, tmp / "model", tokenizer=tok)
    print(f"model: {model.num_params() / 1e6:.1f} M parameters (tiny-rope, real Baichuan 2 vocabulary), "
          f"{torch.get_num_threads()} threads")

    full = load_benchmark("cmmlu", args.bench)
    names = sorted(full.subjects)[: args.subjects]
    # The same questions for everyone: the first `limit` test rows of each subject, written as lm-eval tasks.
    tasks = []
    meta = json.loads((REPO / "src" / "baichuan2" / "eval" / "assets" / "cmmlu_subjects.json").read_text())
    for name in names:
        src = Path(args.bench) / "data"
        rows = list(csv.reader(open(src / "test" / f"{name}.csv", encoding="utf-8")))
        test = tmp / f"{name}_test.csv"
        with open(test, "w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows(rows[: args.limit + 1])
        task = f"cmmlu_local_{name}"
        (tmp / f"{task}.yaml").write_text(TASK_YAML.format(task=task, test=test, dev=src / "dev" / f"{name}.csv",
                                                           name=meta[name]["name"]), encoding="utf-8")
        tasks.append(task)
    n = args.limit * len(names)
    for s in list(full.subjects):
        if s not in names:
            del full.subjects[s]

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    tm = TaskManager(include_path=str(tmp))
    common = dict(tasks=tasks, num_fewshot=5, task_manager=tm, batch_size=args.batch_size, log_samples=False)
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(tmp / "model"), dtype="float32", device="cpu", batch_size=args.batch_size)
    warm = dict(common, limit=1)  # load the CSV datasets once, outside the timings
    lm_eval.simple_evaluate(model=hf, **warm)
    res_hf, t_hf = timed(lambda: lm_eval.simple_evaluate(model=hf, **common))
    res_ad, t_ad = timed(lambda: lm_eval.simple_evaluate(
        model=Baichuan2LM(model=model, tokenizer=tok, batch_size=args.batch_size), **common))
    _, t_ll = timed(lambda: evaluate_mc(model, tok, full, MCArgs(mode="loglik", limit=args.limit,
                                                                 batch_size=args.batch_size), tmp / "ours-ll",
                                        progress=False))
    _, t_le = timed(lambda: evaluate_mc(model, tok, full, MCArgs(mode="letter", limit=args.limit,
                                                                 batch_size=args.batch_size), tmp / "ours-letter",
                                        progress=False))

    def acc(res):
        vals = [v["acc,none"] for k, v in res["results"].items() if "acc,none" in v]
        return 100 * sum(vals) / len(vals)

    print(f"\nCMMLU 5-shot, {len(names)} subjects x {args.limit} questions = {n} questions")
    print(f"{'contender':<40}{'q/s':>8}{'seconds':>9}{'vs lm-eval HF':>15}")
    for label, t in [("lm-eval + HF transformers backend", t_hf), ("lm-eval + our adapter", t_ad),
                     ("ours, loglik (4 continuations/q)", t_ll), ("ours, letter (1 forward/q)", t_le)]:
        print(f"{label:<40}{n / t:>8.2f}{t:>9.1f}{t_hf / t:>14.2f}x")
    print(f"\naccuracy (random model, ~25% expected): lm-eval HF {acc(res_hf):.1f}%, lm-eval adapter "
          f"{acc(res_ad):.1f}%")


if __name__ == "__main__":
    main()
