"""FlexAttention path: ALiBi as a ``score_mod`` and packed documents as a block mask.

SDPA needs ALiBi as a dense ``[heads, S, S]`` float bias (2.7 GB in fp32 for
40 heads at S = 4096) and cannot use its flash kernel with it.  FlexAttention
computes the bias inside the fused kernel and skips fully masked blocks, so
long-context ALiBi training and document-masked packing stay memory-efficient.
Used for full-sequence passes (training, scoring); decoding with a KV cache
goes through SDPA.  Works on CPU and CUDA (compiled through Inductor).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_bias(t: int, attention_mask: torch.Tensor | None, slopes: torch.Tensor | None,
                        device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Build the block mask once per forward; return ``attend(q, k, v)`` for every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    if attention_mask is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        batch = None
    else:
        seg = attention_mask

        def mask_mod(b, h, q_idx, kv_idx):
            same = (seg[b, q_idx] == seg[b, kv_idx]) & (seg[b, kv_idx] != 0)
            # padding queries attend to themselves only, keeping softmax finite
            return ((q_idx >= kv_idx) & same) | (q_idx == kv_idx)

        batch = seg.shape[0]
    block_mask = create_block_mask(mask_mod, batch, None, t, t, device=device)

    score_mod = None
    if slopes is not None:
        s = slopes.to(device=device, dtype=torch.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + s[h] * (kv_idx - q_idx)

    flex = _compiled_flex()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)

    return attend
