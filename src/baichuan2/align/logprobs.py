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


def _chunk_logprobs(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    picked = logits.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_rows: int = 0) -> torch.Tensor:
    """``[..., T]`` log p(target) at each position (0 where the target is -100), ``chunk_rows`` positions at a
    time: each chunk's fp32 logits live only inside its chunk (recomputed in the backward pass)."""
    from torch.utils.checkpoint import checkpoint

    from baichuan2.model.fused_loss import auto_chunk_rows

    shape = targets.shape
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = chunk_rows or auto_chunk_rows(weight.shape[0])
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, h.shape[0], rows):
        args = (weight, h[s:s + rows], y[s:s + rows])
        parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    out = torch.cat(parts) if parts else h.new_zeros(0)
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
    """Final hidden states ``[b, t, H]`` and the (normalised) output head ``[V, H]``."""
    out = model(input_ids, attention_mask=attention_mask, return_logits=False, return_hidden=True)
    return out.hidden_states, causal_lm(model).lm_head.normalized_weight()


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
    """``[b]`` summed log-probabilities of each row's targets (aligned: ``targets[:, i]`` follows ``ids[:, i]``)."""
    hidden, weight = hidden_and_head(model, input_ids, attention_mask)
    return token_logprobs(hidden, weight, targets).sum(-1)
