"""GPU smoke benchmark (CUDA only, < 8 minutes on one GPU): pretraining, SFT and DPO on a ~1B model.

Each objective runs 20 steps through the training engine with bf16 autocast, FSDP2 on one device (a
1-rank device mesh, so the sharded code path runs), torch.compile of each decoder layer and FlexAttention,
then prints tokens/s and MFU against the GPU's dense bf16 peak (``train.mfu.GPU_PEAK``).

``--dry-run`` runs the same code path on the CPU (gloo instead of NCCL, a tiny ALiBi model, 2 steps each,
SDPA instead of FlexAttention, which has no CPU backward; MFU against the measured CPU bf16 matmul peak), so the script is known to
work before a GPU is lent (tests/train/test_gpu_smoke.py runs it).

    python benchmarks/gpu_smoke.py            # needs a CUDA GPU; exits with a message otherwise
    python benchmarks/gpu_smoke.py --dry-run  # the same on the CPU with a tiny model (~1 minute)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

STEPS, SEQ, MICRO, BATCH, VOCAB = 20, 2048, 4, 8, 125_696


def _one_device_mesh(device_type: str = "cuda"):
    """A 1-rank process group and (dp=1, tp=1) mesh, so FSDP2 wraps the model as it would on many GPUs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from baichuan2.train.parallel import DistInfo

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device_type, (1, 1), mesh_dim_names=("dp", "tp"))
    device = torch.device("cuda:0" if device_type == "cuda" else "cpu")
    return DistInfo(rank=0, world=1, device=device, mesh=mesh, dp_rank=0, dp_world=1)


def _model(vocab: int, dry_run: bool = False):
    from baichuan2.model import Baichuan, ModelConfig

    if dry_run:  # FlexAttention has no backward on the CPU (torch 2.13): SDPA there
        cfg = ModelConfig.from_name("tiny-alibi", vocab_size=vocab, max_position_embeddings=SEQ)
    else:
        cfg = ModelConfig.from_name("baichuan2-7b", hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                                    num_attention_heads=16, vocab_size=vocab, max_position_embeddings=SEQ,
                                    attn_implementation="flex")
    torch.manual_seed(0)
    return Baichuan(cfg)


def _fsdp(model, info):
    from baichuan2.train.parallel import apply_fsdp

    apply_fsdp(model.to(info.device), info.mesh["dp"])
    return model


def _report(name: str, res, seconds: float, model_cfg, device: torch.device) -> None:
    from baichuan2.train.mfu import peak_flops

    tok_s = res.tokens / seconds
    peak, source = peak_flops(device, "bf16")
    mfu = model_cfg.flops_per_token(SEQ) * tok_s / peak
    print(f"{name:9s} {res.steps} steps  {tok_s:12,.0f} tokens/s  MFU {mfu:6.1%} (of {peak / 1e12:.3g} TFLOP/s, "
          f"{source})  final loss {res.last_loss:.3f}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    global STEPS, SEQ, MICRO, BATCH, VOCAB
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps each (checks the script)")
    dry = ap.parse_args().dry_run
    if dry:
        STEPS, SEQ, MICRO, BATCH, VOCAB = 2, 64, 2, 4, 512
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    elif not torch.cuda.is_available():
        sys.exit("gpu_smoke: needs a CUDA GPU (this machine has none); --dry-run checks it on the CPU")
    from baichuan2.align.dpo import DPOArgs, DPOObjective, DPOPair, dpo_optim
    from baichuan2.align.sft import SFTArgs, SFTObjective, sft_optim
    from baichuan2.train.engine import CheckpointArgs, FitArgs, fit
    from baichuan2.train.optim import OptimArgs

    vocab = VOCAB
    info = _one_device_mesh("cpu" if dry else "cuda")
    dev = info.device
    fit_args = FitArgs(micro_batch_size=MICRO, precision="bf16", compile=True, log_every=5, device=dev.type)
    ckpt = CheckpointArgs(save_every=0, keep_last=0)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, vocab, (SEQ,), generator=g).tolist() for _ in range(BATCH * STEPS)]
    with tempfile.TemporaryDirectory() as tmp:
        # pretraining-shaped: every position is a target
        pre = [(r, r[1:] + [-100]) for r in rows]
        sft_rows = [(r, [-100] * (SEQ // 2) + r[SEQ // 2 + 1:] + [-100]) for r in rows]  # loss on the second half
        for name, data, optim in (("pretrain", pre, OptimArgs(lr=3e-4, warmup_steps=5)),
                                  ("sft", sft_rows, sft_optim(lr=2e-5))):
            model = _fsdp(_model(vocab, dry), info)
            objective = SFTObjective(data, [], 0, SFTArgs(max_length=SEQ, batch_size=BATCH, epochs=1))
            t0 = time.perf_counter()
            res = fit(model, objective, Path(tmp) / name, optim, fit_args, ckpt, info=info, progress=False)
            _sync(dev)
            _report(name, res, time.perf_counter() - t0, model.config, dev)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        half = SEQ // 2
        pairs = [DPOPair((r[:half], [-100] * (half // 2) + r[half // 2 + 1:half] + [-100]),
                         (r[half:], [-100] * (half // 2) + r[half + half // 2 + 1:] + [-100])) for r in rows]
        model = _fsdp(_model(vocab, dry), info)
        ref = torch.randn(len(pairs), 2, generator=g, dtype=torch.float64) - 500.0  # a precomputed reference
        objective = DPOObjective(pairs, [], 0, DPOArgs(max_length=half, batch_size=BATCH), ref, None)
        t0 = time.perf_counter()
        res = fit(model, objective, Path(tmp) / "dpo", dpo_optim(lr=5e-7), fit_args, ckpt, info=info, progress=False)
        _sync(dev)
        _report("dpo", res, time.perf_counter() - t0, model.config, dev)
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
