"""Pretraining throughput: our trainer vs a minimal transformers + torch.optim.AdamW loop, side by side.

Both train the same shape (our preset; HF as LlamaForCausalLM with identical dimensions) on the same
token rows, with identical settings: AdamW (0.9, 0.95), weight decay 0.1, gradient clipping 0.5, the
same LR, the same global batch and micro-batch, the same precision. Ours is `baichuan2.train.pretrain`
end to end (packed loader with document masks, fused head + loss, logging, everything); theirs is the
loop a user would write in 20 lines. Reports tokens/s and MFU against this machine's measured matmul
peak at the same precision (so 100% = the fastest a square matmul runs here).

    python benchmarks/train_throughput.py [--sizes ladder-20m,ladder-100m] [--steps 12] [--precision auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_shards(directory: Path, vocab: int, tokens: int) -> None:
    from baichuan2.tokenizer.shards import write_shard
    from baichuan2.utils.io import atomic_write_json

    rng = np.random.default_rng(0)
    docs, total = [], 0
    while total < tokens:
        n = int(rng.integers(100, 2000))
        docs.append(rng.integers(3, vocab, n))
        total += n + 1
    write_shard(directory / "shard-00000", docs, eos_id=2)
    atomic_write_json(directory / "manifest.json", {"tokenizer": {"vocab_size": vocab}})


def hf_loop(preset: str, vocab: int, seq: int, rows: int, micro: int, steps: int, precision: str,
            shards: Path) -> list[float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from baichuan2.model import ModelConfig
    from baichuan2.train.data import PackedDataset

    cfg = ModelConfig.from_name(preset, vocab_size=vocab, max_position_embeddings=seq)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden_size,
                                         intermediate_size=cfg.intermediate_size,
                                         num_hidden_layers=cfg.num_hidden_layers,
                                         num_attention_heads=cfg.num_attention_heads,
                                         num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=seq,
                                         tie_word_embeddings=False))
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95))
    data = PackedDataset(str(shards), seq, seed=0, use_doc_weights=False)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = data.batch(list(range(step * rows, (step + 1) * rows)))
        for m in range(0, rows, micro):
            ids = batch["input_ids"][m:m + micro]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss / (rows // micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def ours(preset: str, vocab: int, seq: int, rows: int, micro: int, steps: int, precision: str, shards: Path,
         out: Path) -> list[float]:
    from baichuan2.train.optim import OptimArgs
    from baichuan2.train.trainer import CheckpointArgs, DataArgs, ModelArgs, PretrainConfig, TrainArgs, pretrain
    from baichuan2.utils.metrics import read_metrics

    cfg = PretrainConfig(out_dir=str(out), model=ModelArgs(preset=preset, overrides={"vocab_size": vocab}),
                         data=DataArgs(shards=str(shards), seq_len=seq, use_doc_weights=False),
                         optim=OptimArgs(lr=3e-4, warmup_steps=0),
                         train=TrainArgs(global_batch_tokens=rows * seq, micro_batch_size=micro, max_steps=steps,
                                         precision=precision),
                         checkpoint=CheckpointArgs(release_final=False, save_every=10**9))
    pretrain(cfg)
    return [r["step_time"] for r in read_metrics(out / "metrics.jsonl") if "step_time" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="ladder-20m,ladder-100m")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=8, help="sequences per optimizer step")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = ap.parse_args()

    from baichuan2.model import ModelConfig
    from baichuan2.train.mfu import peak_flops
    from baichuan2.train.trainer import resolve_precision

    precision = resolve_precision(args.precision, torch.device("cpu"))
    peak, source = peak_flops(torch.device("cpu"), precision)
    print(f"precision {precision}; peak {peak / 1e9:.0f} GFLOP/s ({source}); threads {torch.get_num_threads()}; "
          f"batch {args.rows} x {args.seq} tokens, micro-batch {args.micro}")
    print(f"{'model':<14}{'params':>9}{'ours tok/s':>12}{'HF tok/s':>10}{'ratio':>8}{'ours MFU':>10}{'HF MFU':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "tokens"
        shards.mkdir()
        make_shards(shards, args.vocab, args.seq * args.rows * (args.steps + 2) * 2)
        for preset in args.sizes.split(","):
            cfg = ModelConfig.from_name(preset, vocab_size=args.vocab, max_position_embeddings=args.seq)
            tokens = args.rows * args.seq
            theirs = hf_loop(preset, args.vocab, args.seq, args.rows, args.micro, args.steps, precision, shards)
            mine = ours(preset, args.vocab, args.seq, args.rows, args.micro, args.steps, precision, shards,
                        Path(tmp) / f"run-{preset}")
            # skip the first two steps (allocator and kernel warm-up) in both
            t_ours, t_hf = statistics.median(mine[2:]), statistics.median(theirs[2:])
            fpt = cfg.flops_per_token(args.seq)
            print(f"{preset:<14}{cfg.num_params() / 1e6:>8.1f}M{tokens / t_ours:>12.0f}{tokens / t_hf:>10.0f}"
                  f"{t_hf / t_ours:>7.2f}x{fpt * tokens / t_ours / peak:>10.1%}{fpt * tokens / t_hf / peak:>9.1%}")


if __name__ == "__main__":
    main()
