"""Per-token log-probabilities (and entropies) in chunks of positions, for DPO and PPO.

At a 125,696-token vocabulary a ``[batch, seq, vocab]`` fp32 logits tensor is the largest thing in an
alignment step (8 x 2,048 positions: 8.2 GB, and as much again for its gradient).  Here each chunk of
positions makes its logits, keeps the picked log-probability and drops them; the backward pass
recomputes one chunk at a time (activation checkpointing per chunk), so the peak is one chunk's logits.
The chunk size is the fused loss's (``model.fused_loss.auto_chunk_rows``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ChunkedLogProbs(torch.autograd.Function):
    """``logp[N] = log_softmax(hidden @ weight.T)[i, targets[i]]`` chunk by chunk.

    Forward keeps nothing but the inputs; backward recomputes each chunk's logits and adds its share of the
    weight gradient into one ``[V, H]`` fp32 buffer (as ``model.fused_loss`` does for the cross-entropy), so
    the peak is one chunk of logits whatever the number of positions."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                compute_dtype: torch.dtype):
        w = weight.to(compute_dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_rows):
            logits = (hidden[s:s + chunk_rows].to(compute_dtype) @ w.t()).float()
            y = targets[s:s + chunk_rows].clamp(min=0)[:, None]
            out[s:s + chunk_rows] = logits.gather(1, y).squeeze(1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        rows, dtype = ctx.chunk_rows, ctx.compute_dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s:s + rows].to(dtype)
            logits = (h @ w.t()).float()
            # d logp_i / d logits_i = onehot(y_i) - softmax_i, scaled by the incoming gradient
            grad = torch.softmax(logits, dim=-1).neg_()
            grad.scatter_add_(1, targets[s:s + rows].clamp(min=0)[:, None],
                              torch.ones_like(grad[:, :1]))
            grad.mul_(grad_out[s:s + rows, None]).nan_to_num_(0.0)
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[s:s + rows] = (grad @ w).to(hidden.dtype)
            if grad_weight is not None:  # in place: no [V, H] temporary per chunk
                grad_weight.addmm_(grad.t().float(), h.float())
        return grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_rows: int = 0) -> torch.Tensor:
    """``[..., T]`` log p(target) at each position (0 where the target is -100), ``chunk_rows`` positions at a
    time: no ``[positions, vocab]`` tensor exists in the forward or the backward pass.  Under autocast the
    matmuls run in the autocast dtype and the softmax in fp32."""
    from baichuan2.model.fused_loss import auto_chunk_rows

    shape = targets.shape
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    rows = chunk_rows or auto_chunk_rows(weight.shape[0])
    y = targets.reshape(-1)
    with torch.autocast(device_type, enabled=False):
        out = ChunkedLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, y, rows, dtype)
    return out.masked_fill(y == -100, 0.0).view(shape)


@torch.no_grad()
def token_entropy(hidden: torch.Tensor, weight: torch.Tensor, chunk_rows: int = 0) -> torch.Tensor:
    """``[..., T]`` entropy of the next-token distribution, chunk by chunk (statistics only: no gradient)."""
    from baichuan2.model.fused_loss import auto_chunk_rows

    h = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk_rows or auto_chunk_rows(weight.shape[0])
    parts = []
    for s in range(0, h.shape[0], rows):
        logp = torch.log_softmax(F.linear(h[s:s + rows], weight).float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts).view(hidden.shape[:-1])


def causal_lm(model):
    """The Baichuan causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_and_head(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states ``[b, t, H]`` and the (normalised) output head ``[V, H]``.

    Under FSDP2 the head is read *after* the forward, so the root module (embeddings, norm, head) must stay
    unsharded until the backward (torch's own default for the root): otherwise the head is a sharded DTensor
    here, and its gradient would miss FSDP's reduce-scatter."""
    from torch.distributed.fsdp import FSDPModule

    lm = causal_lm(model)
    if isinstance(lm, FSDPModule):
        lm.set_reshard_after_forward(False, recurse=False)
    out = model(input_ids, attention_mask=attention_mask, return_logits=False, return_hidden=True)
    return out.hidden_states, lm.lm_head.normalized_weight()


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
    """``[b]`` summed log-probabilities of each row's targets (aligned: ``targets[:, i]`` follows ``ids[:, i]``)."""
    hidden, weight = hidden_and_head(model, input_ids, attention_mask)
    return token_logprobs(hidden, weight, targets).sum(-1)
