"""Alignment throughput and memory on this machine (a benchmark, not a test).

1. Peak memory of the log-probabilities DPO/PPO need at Baichuan 2's 125,696-token vocabulary, for one
   7B-shape layer (hidden 4,096) on 2 x 1,024 positions: the full ``[b, s, V]`` fp32 log-softmax + gather
   vs ``align.logprobs.token_logprobs`` (chunks of positions, recomputed in backward), forward + backward.
2. SFT tokens/s and DPO steps/s of our engine on a small model, fp32 eager vs bf16 vs bf16 + compile,
   with MFU against the measured matmul peak (``train.mfu``).

    python benchmarks/align_throughput.py [--quick]

(The side-by-side with TRL's SFTTrainer/DPOTrainer is not implemented yet; TRL's DPO loss itself is
checked against ours in tests/align/test_dpo.py.)
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_of(variant: str, vocab: int, hidden: int, batch: int, seq: int, queue) -> None:
    """In a fresh process: peak RSS growth (MB) of one forward + backward of the log-probs."""
    from baichuan2.align.logprobs import token_logprobs

    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    h = torch.randn(batch, seq, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, seq))
    weight.grad = torch.zeros_like(weight)  # the gradient buffer exists either way: not counted
    h.grad = torch.zeros_like(h)
    base = _peak_rss_mb()
    if variant == "full":
        lp = torch.log_softmax((h @ weight.t()).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    else:
        lp = token_logprobs(h, weight, targets)
    lp.sum().backward()
    queue.put(_peak_rss_mb() - base)


def memory_figure(vocab: int = 125_696, hidden: int = 4096, batch: int = 2, seq: int = 1024) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    peaks = {}
    for variant in ("full", "chunked"):
        q = ctx.Queue()
        proc = ctx.Process(target=_peak_of, args=(variant, vocab, hidden, batch, seq, q))
        proc.start()
        peaks[variant] = q.get()
        proc.join()
    a, b = peaks["full"], peaks["chunked"]
    print(f"log-probs, vocab {vocab:,}, 7B-shape head (hidden {hidden}), {batch}x{seq} positions, fwd+bwd: "
          f"peak memory above inputs and gradient buffers: full logits {a:,.0f} MB, chunked {b:,.0f} MB "
          f"({a / max(b, 1.0):.1f}x less); the [b, s, V] fp32 logits alone are {batch * seq * vocab * 4 / 2**20:,.0f} MB",
          flush=True)


def throughput(quick: bool) -> None:
    from baichuan2.align.dpo import DPOArgs, DPOObjective, DPOPair, dpo_optim
    from baichuan2.align.sft import SFTArgs, SFTObjective, sft_optim
    from baichuan2.model import Baichuan, ModelConfig
    from baichuan2.train.engine import CheckpointArgs, FitArgs, fit
    from baichuan2.train.mfu import peak_flops

    seq, batch, steps = 256, 8, 4 if quick else 10
    vocab = 4096
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (seq,), generator=g).tolist() for _ in range(batch * steps)]
    sft_rows = [(r, [-100] * (seq // 2) + r[seq // 2 + 1:] + [-100]) for r in rows]
    half = seq // 2
    pairs = [DPOPair((r[:half], [-100] * 8 + r[9:half] + [-100]), (r[half:], [-100] * 8 + r[half + 9:] + [-100]))
             for r in rows]
    variants = (("fp32", False), ("bf16", False)) if quick else (("fp32", False), ("bf16", False), ("bf16", True))
    for precision, compile_ in variants:
        for name in ("sft", "dpo"):
            torch.manual_seed(0)
            model = Baichuan(ModelConfig.from_name("ladder-2m", vocab_size=vocab, max_position_embeddings=seq))
            if name == "sft":
                obj, optim = SFTObjective(sft_rows, [], 0, SFTArgs(max_length=seq, batch_size=batch)), sft_optim()
            else:
                ref = torch.zeros(len(pairs), 2, dtype=torch.float64)
                obj, optim = DPOObjective(pairs, [], 0, DPOArgs(max_length=half, batch_size=batch), ref, None), \
                    dpo_optim()
            fit_args = FitArgs(precision=precision, compile=compile_, micro_batch_size=batch, device="cpu")
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                res = fit(model, obj, Path(tmp), optim, fit_args, CheckpointArgs(keep_last=0), progress=False)
                dt = time.perf_counter() - t0
            peak, _ = peak_flops(torch.device("cpu"), precision)
            tok_s = res.tokens / dt
            mfu = model.config.flops_per_token(seq) * tok_s / peak
            print(f"{name} {precision}{' + compile' if compile_ else ''}: {tok_s:,.0f} tokens/s, "
                  f"{res.steps / dt:.2f} steps/s, MFU {mfu:.1%} (compile time included), peak RSS "
                  f"{_peak_rss_mb():,.0f} MB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    a = ap.parse_args()
    if not a.skip_memory:
        memory_figure(seq=512 if a.quick else 1024)
    if not a.memory_only:
        throughput(a.quick)


if __name__ == "__main__":
    main()
