"""AdamW with Baichuan 2's settings and the warm-up + cosine learning-rate schedule.

Report (section 2.5): AdamW, beta = (0.9, 0.95), weight decay 0.1, gradient
clipping 0.5, 2,000 linear warm-up steps to the peak LR (2e-4 for 7B, 1.5e-4
for 13B), then cosine decay to a minimum LR (value not stated; configurable,
10% of peak by default).  Weight decay applies to matrices only: norms and (by
default) embeddings are excluded, as the report leaves it open and most
modern recipes do.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class OptimArgs:
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 0.5
    warmup_steps: int = 2000
    warmup_frac: float = 0.0  # > 0: warm-up over this fraction of the run's steps instead (at least 1 step)
    decay_embeddings: bool = False

    def for_run(self, max_steps: int) -> OptimArgs:
        """These settings with ``warmup_frac`` resolved to a step count for a run of ``max_steps``."""
        if self.warmup_frac <= 0:
            return self
        return dataclasses.replace(self, warmup_steps=max(1, int(self.warmup_frac * max_steps)), warmup_frac=0.0)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "embed_tokens" in name
        if p.ndim < 2 or (is_embedding and not decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, args: OptimArgs) -> torch.optim.AdamW:
    from torch.distributed.tensor import DTensor

    groups = param_groups(model, args.weight_decay, args.decay_embeddings)
    # the fused kernel (one pass over each parameter) where every parameter is a plain tensor
    fused = not any(isinstance(p, DTensor) for p in model.parameters())
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, fused=fused)


def lr_at(step: int, args: OptimArgs, max_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` to ``lr``, then cosine to ``lr * min_lr_ratio`` at ``max_steps``."""
    min_lr = args.lr * args.min_lr_ratio
    if args.warmup_steps and step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    decay_steps = max(1, max_steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / decay_steps)
    return min_lr + 0.5 * (args.lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
