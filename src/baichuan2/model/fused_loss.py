"""Output head + cross-entropy + max-z loss fused and split over chunks of positions.

Baichuan 2 split the large-vocabulary cross-entropy to cut peak memory.  Here
the ``[tokens x vocab]`` logits never exist at once: for each chunk of rows the
forward pass computes the logits, the loss terms *and* their gradients (the
loss is a scalar, so d loss / d logits is known right away), then drops the
logits.  Backward only scales the stored ``grad_hidden``/``grad_weight`` by the
incoming gradient.  No logits tensor, no zero-filled gradient buffers, no
recomputation: the same matmuls as the plain path, a fraction of the memory
traffic (measured in benchmarks/model_throughput.py).

Loss semantics equal the plain path exactly: mean cross-entropy over targets
!= -100 plus ``z_weight`` x mean squared max logit over the same positions.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def auto_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so one chunk of fp32 logits is ~8 MB (stays in cache on CPUs), within [64, 4096]."""
    return int(min(4096, max(64, (2 * 1024 * 1024) // max(vocab_size, 1))))


class FusedHeadLoss(torch.autograd.Function):
    """``(loss, ce, z) = f(hidden [N, H], weight [V, H], targets [N])``; only ``loss`` is differentiable."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_weight: float,
                chunk_rows: int, compute_dtype: torch.dtype):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid_all = targets != IGNORE_INDEX
        n_valid = valid_all.sum().clamp(min=1).to(torch.float32)
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows].to(compute_dtype)
            y = targets[start:start + chunk_rows]
            valid = valid_all[start:start + chunk_rows]
            y_safe = y.masked_fill(~valid, 0)[:, None]
            logits = (h @ w.t()).float()
            zmax, zidx = logits.max(dim=-1)
            lse = torch.logsumexp(logits, dim=-1)
            ce_sum += ((lse - logits.gather(1, y_safe).squeeze(1)) * valid).sum()
            z_sum += (zmax.square() * valid).sum()
            if not need_grad:
                continue
            # d loss / d logits = (softmax - onehot(y)) / n  +  z_weight * 2 z / n * onehot(argmax)
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, y_safe, torch.full_like(y_safe, -1.0, dtype=grad.dtype))
            grad.scatter_add_(1, zidx[:, None], (2.0 * z_weight * zmax)[:, None])
            grad.mul_((valid / n_valid)[:, None])
            grad = grad.to(compute_dtype)
            grad_hidden[start:start + chunk_rows] = (grad @ w).to(hidden.dtype)
            grad_weight += (grad.t() @ h).float()
        ce, z = ce_sum / n_valid, z_sum / n_valid
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        loss = ce + z_weight * z
        ctx.mark_non_differentiable(ce, z)
        return loss, ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_weight: float,
                    chunk_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, z)`` for ``hidden`` [..., H] against ``targets`` [...] with head ``weight`` [V, H].

    Under autocast the matmuls run in the autocast dtype and the softmax in fp32,
    as the plain path does.
    """
    device_type = hidden.device.type
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    chunk_rows = chunk_rows or auto_chunk_rows(weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return FusedHeadLoss.apply(hidden.flatten(0, -2), weight, targets.flatten(), float(z_weight), chunk_rows,
                                   compute_dtype)
