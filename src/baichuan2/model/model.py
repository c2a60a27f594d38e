"""The Baichuan 2 transformer, in one readable module.

Decoder-only, pre-norm (RMSNorm, eps 1e-6), SwiGLU MLP, fused ``W_pack`` QKV,
RoPE (7B family, base 10000, computed in fp32) or ALiBi (13B family, Baichuan's
slope formula for any head count), NormHead output layer (rows L2-normalised
in the forward pass) and the max-z auxiliary loss.  No biases; untied
embeddings.  Parameter names equal the official Hugging Face checkpoints, so
``model.state_dict()`` *is* the official layout.

Attention masks follow the official 13B code: ``attention_mask`` is a
``[batch, seq]`` integer tensor where 0 marks padding and any positive value
is a segment (document) id; a key is visible to a query only when both carry
the same non-zero id and the key is not in the future.  Plain 0/1 HF masks are
the one-segment special case, and packed pretraining rows use ids 1, 2, 3...
Positions (RoPE) restart at every segment, so a packed row computes exactly
what its documents would compute alone.

Everything tensor-parallel code needs is read from tensor shapes rather than
the config (heads per rank), so parallelism can be applied from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from baichuan2.model import cpu_kernels
from baichuan2.model.config import ModelConfig

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------
# position encodings
# ---------------------------------------------------------------------------------------

def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes exactly as Baichuan 2's ``_get_interleave`` (and BLOOM / the ALiBi paper).

    For a power of two n the slopes are ``2^(-8k/n)``, k = 1..n.  Otherwise the
    slopes of the closest smaller power of two c are followed by every other
    slope of 2c, e.g. 40 heads = 32 geometric slopes + 8 interleaved ones.
    """
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


class RotaryEmbedding(nn.Module):
    """RoPE tables kept in fp32 whatever the model dtype (the paper's bf16 position fix).

    The tables are plain attributes, not buffers, so ``model.to(bfloat16)`` cannot
    round them and they never appear in a state dict (as in the official files).
    """

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        self._max = max_positions
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.device != device or self._cos.shape[0] < length:
            n = max(length, self._max)
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
                                            / self.head_dim))
            t = torch.arange(n, device=device, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin

    def forward(self, position_ids: torch.Tensor, max_position: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``position_ids`` [b, t] as [b, t, 1, 1, head_dim] (fp32), once per forward pass.

        ``max_position`` bounds the ids (past + new tokens) so no device sync is needed."""
        cos, sin = self._tables(max_position + 1, device)
        return cos[position_ids][:, :, None, None], sin[position_ids][:, :, None, None]


def fused_cpu_ops(x: torch.Tensor):
    """Our fused CPU kernels (``kernels/decode_ops.cpp``) for an inference operation on ``x``, or None: with
    grad, under torch.compile, off the CPU, in other dtypes, or with the kernels off or unbuildable."""
    if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16)
            or x.stride(-1) != 1 or torch.compiler.is_compiling()):
        return None
    return cpu_kernels.load_decode_ops()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, t, ..., head_dim] in fp32 and cast back.

    GPT-NeoX "half" convention (not interleaved), identical to HF Baichuan 2-7B and Llama."""
    ops = fused_cpu_ops(x) if x.shape[-1] % 32 == 0 else None
    if ops is not None:  # one pass, the same products and sums (cos/sin [b|1, t, 1.., d] -> [b, t, d])
        b, t, d = x.shape[0], x.shape[1], x.shape[-1]
        cos, sin = (c.reshape(c.shape[0], t, d).expand(b, t, d) for c in (cos, sin))
        return ops.rope(x.reshape(b, t, -1, d), cos, sin).view(x.shape)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of every token within its run of equal mask values (0-based).

    For a left-padded 0/1 mask this is ``cumsum - 1`` on real tokens; for packed
    segment ids it restarts at each document.
    """
    b, t = attention_mask.shape
    idx = torch.arange(t, device=attention_mask.device).expand(b, t)
    starts = torch.ones_like(attention_mask, dtype=torch.bool)
    starts[:, 1:] = attention_mask[:, 1:] != attention_mask[:, :-1]
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - run_start


# ---------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------

class Cache(Protocol):
    """What attention needs from a KV cache; transformers' ``DynamicCache`` fits as is."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class KVCache:
    """Preallocated per-layer key/value buffers: decoding writes in place, no concatenation.

    Shapes are ``[batch, heads, max_len, head_dim]``.  ``update`` appends this
    step's keys/values for one layer and returns views of everything so far.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype, kv_groups: int = 1):
        # kv_groups > 1: the model's key/value heads repeat in groups (`kv_head_groups`); attention then
        # hands over one head per group and the buffers hold heads / kv_groups heads
        self.kv_groups = kv_groups
        shape = (batch, heads // kv_groups, max_len, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.max_len = max_len

    @classmethod
    def for_model(cls, model: Baichuan, batch: int, max_len: int, kv_groups: int = 1) -> KVCache:
        p = model.model.embed_tokens.weight
        cfg = model.config
        return cls(cfg.num_hidden_layers, batch, cfg.num_attention_heads, cfg.head_dim, max_len, p.device, p.dtype,
                   kv_groups)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.lengths[layer_idx]
        end = start + key_states.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.keys[layer_idx][:, :, start:end] = key_states
        self.values[layer_idx][:, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only / reorder batch rows (used when finished sequences leave a batch)."""
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].index_select(0, index)
            self.values[i] = self.values[i].index_select(0, index)


class SlotKVCache:
    """Keys/values of many sequences of different lengths, one preallocated row (slot) each.

    Continuous batching keeps the running sequences in rows ``0..n-1`` and decodes them together, each
    at its own length: ``select(n)`` picks the rows of the next forward pass, which appends its ``t`` new
    tokens to every row at that row's own position; positions (RoPE) and the causal / ALiBi bias come
    from the per-row lengths (``ragged_bias``), so no row is padded or recomputed.  Buffers are
    ``[slots, heads, max_len, head_dim]``: memory pages are only touched as rows fill up.
    """

    def __init__(self, num_layers: int, slots: int, heads: int, head_dim: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype, kv_groups: int = 1):
        if heads % kv_groups:
            raise ValueError(f"{heads} heads do not split into groups of {kv_groups}")
        # Grouped-query attention (weights converted from a GQA model repeat each key/value head over its
        # group of query heads): attention hands over one head per group (`Attention.forward` reads
        # ``kv_groups``), so the cache is kv_groups times smaller and decoding reads kv_groups times less
        # memory (attention reads every cached key).
        self.kv_groups, self.kv_heads = kv_groups, heads // kv_groups
        shape = (slots, self.kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.lengths = [0] * slots  # tokens held by each row
        # Positions [0, finite[r]) of row r hold finite numbers.  Attention reads every row up to the
        # longest one (masked), and a masked NaN/inf left in recycled memory would still poison the
        # probabilities @ values product, so rows are zeroed lazily, just ahead of what is read.
        self.finite = [0] * slots
        self.slots, self.max_len, self.device, self.dtype = slots, max_len, torch.device(device), dtype
        self._rows = 0
        self._starts = torch.zeros(0, dtype=torch.long)
        self._t = 0
        self._flat: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: Baichuan, slots: int, max_len: int, kv_groups: int = 1) -> SlotKVCache:
        """Buffers in the model's dtype, except on CPU without our decode kernel (`decode_attention`), where a
        bf16/fp16 model's keys and values are kept in fp32 (exactly the same numbers): PyTorch's CPU
        attention kernels for one query per row are 2-3.5x slower in bf16 than in fp32 (measured at batch
        1-64), and decoding reads the cache every step.  Our kernel reads bf16 directly: half the bytes.
        ``kv_groups``: see `kv_head_groups` (the caller checks the weights; they must not change meanwhile)."""
        p = model.model.embed_tokens.weight
        cfg = model.config
        dtype = p.dtype
        # (built here, at engine start, if it is built at all: not in the middle of the first request)
        kernel = p.device.type == "cpu" and _decode_kernel(cfg.head_dim) is not None
        if p.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            dtype = dtype if kernel and dtype == torch.bfloat16 else torch.float32
        return cls(cfg.num_hidden_layers, slots, cfg.num_attention_heads, cfg.head_dim, max_len, p.device, dtype,
                   kv_groups)

    def decode_attention(self, slopes: torch.Tensor | None):
        """For a one-token step on CPU: ``attend(q, k, v) -> [rows, heads, 1, head_dim]`` (fp32) by our kernel,
        each row attending over its own length only (no mask, nothing read past the row's end); else None."""
        kernel = _decode_kernel(self.keys[0].shape[-1]) if self.device.type == "cpu" else None
        if kernel is None or self.dtype not in (torch.float32, torch.bfloat16):
            return None
        lengths = self._starts + 1
        slopes = torch.empty(0) if slopes is None else slopes.to(device="cpu", dtype=torch.float32)
        scale = 1.0 / math.sqrt(self.keys[0].shape[-1])
        return lambda q, k, v: kernel(q, k, v, lengths, slopes, scale).transpose(1, 2)

    def select(self, rows: int) -> None:
        """The next forward pass covers rows ``0..rows-1``."""
        self._rows = rows

    def begin(self, t: int) -> tuple[torch.Tensor, int]:
        """Start a forward pass of ``t`` new tokens per selected row: ``(position_ids [rows, t], kv_len)``."""
        lengths = self.lengths[: self._rows]
        kv_len = max(lengths) + t
        if kv_len > self.max_len:
            raise ValueError(f"KV cache full: {kv_len} positions needed, {self.max_len} allocated")
        for r in range(self._rows):
            if self.finite[r] < kv_len:
                end = min(self.max_len, kv_len + 256)
                for layer in range(len(self.keys)):
                    self.keys[layer][r, :, self.finite[r]:end] = 0
                    self.values[layer][r, :, self.finite[r]:end] = 0
                self.finite[r] = end
        self._starts = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self._t = t
        self._flat = None  # made by the first `update` of a one-token step (the fused decode step needs none)
        return self._starts[:, None] + torch.arange(t, device=self.device)[None], kv_len

    def ragged_bias(self, kv_len: int, dtype: torch.dtype, slopes: torch.Tensor | None) -> torch.Tensor | None:
        """SDPA mask for the selected rows: key k is visible to new token j of row r iff k <= start_r + j;
        with ALiBi slopes the additive ``slope * (k - q)`` bias.  None when every row has the same length
        and there is nothing to add (SDPA's plain path)."""
        q_pos = self._starts[:, None] + torch.arange(self._t, device=self.device)[None]  # [b, t]
        k_pos = torch.arange(kv_len, device=self.device)
        if slopes is None:
            if self._t == 1 and len(set(self.lengths[: self._rows])) == 1:
                return None
            return (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [b, 1, t, kv]
        rel = (k_pos[None, None, :] - q_pos[:, :, None]).to(torch.float32)  # [b, t, kv]
        bias = slopes.to(device=self.device, dtype=torch.float32)[None, :, None, None] * rel[:, None]
        return bias.masked_fill(rel[:, None] > 0, float("-inf")).to(dtype)  # [b, heads, t, kv]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = key_states.shape[0], key_states.shape[2]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if t == 1:  # one decoding step: a scatter at each row's own position (index_copy_ on flat offsets:
            # ~10x cheaper than advanced-index assignment at 64 rows)
            if self._flat is None:  # flat [row, head, position] offsets of this step, shared by every layer
                heads = torch.arange(self.kv_heads, device=self.device)
                rows = torch.arange(self._rows, device=self.device)
                self._flat = ((rows[:, None] * self.kv_heads + heads[None]) * self.max_len
                              + self._starts[:, None]).flatten()
            d = keys.shape[-1]
            keys.view(-1, d).index_copy_(0, self._flat, key_states.reshape(-1, d).to(keys.dtype))
            values.view(-1, d).index_copy_(0, self._flat, value_states.reshape(-1, d).to(values.dtype))
        else:
            for r, start in enumerate(self.lengths[:b]):
                keys[r, :, start:start + t] = key_states[r]
                values[r, :, start:start + t] = value_states[r]
        kv_len = max(self.lengths[:b]) + t
        return keys[:b, :, :kv_len], values[:b, :, :kv_len]

    def commit(self) -> None:
        """End the forward pass: every selected row now holds ``t`` more tokens."""
        for r in range(self._rows):
            self.lengths[r] += self._t

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths[: self._rows], default=0)

    def load(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Fill ``row`` with one sequence's keys/values (``[kv_heads, n, head_dim]`` per layer)."""
        n = keys[0].shape[1]
        for layer in range(len(self.keys)):
            self.keys[layer][row, :, :n] = keys[layer]
            self.values[layer][row, :, :n] = values[layer]
        self.lengths[row] = n
        self.finite[row] = max(self.finite[row], n)

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` into row ``dst`` (keeps the running rows contiguous when one leaves)."""
        n = self.lengths[src]
        for layer in range(len(self.keys)):
            self.keys[layer][dst, :, :n] = self.keys[layer][src, :, :n]
            self.values[layer][dst, :, :n] = self.values[layer][src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0
        self.finite[dst] = max(self.finite[dst], n)


def _decode_kernel(head_dim: int):
    """Our compiled CPU decode-attention kernel for this head size, or None (then SDPA is used)."""
    if head_dim % 16 or not 16 <= head_dim <= 128 and head_dim != 256:  # the sizes the kernel is built for
        return None
    return cpu_kernels.load_decode_attention()


def kv_head_groups(model: Baichuan) -> int:
    """How many consecutive query heads share identical key and value projections in every layer.

    A checkpoint converted from a grouped-query-attention model (``convert from-llama/from-gguf``) keeps
    the official ``W_pack`` layout by repeating each key/value head over its group of query heads; the
    repeats are exact copies, so a KV cache needs only one head per group.  1 for Baichuan 2's own
    models (or weights this process cannot read whole, e.g. tensor-parallel shards)."""
    cfg = model.config
    heads, d, h = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    try:
        packs = [layer.self_attn.W_pack.weight.detach() for layer in model.model.layers]
    except AttributeError:
        return 1
    if any(type(w) not in (nn.Parameter, torch.Tensor) or w.shape != (3 * h, h) for w in packs):
        return 1
    for groups in sorted((g for g in range(2, heads + 1) if heads % g == 0), reverse=True):
        def repeated(w: torch.Tensor, rows: slice = slice(None)) -> bool:
            kv = w[h:].unflatten(0, (2, heads // groups, groups, d))[:, :, :, rows]  # [k|v, group, member, d, h]
            return bool((kv == kv[:, :, :1]).all())
        # one row per head first: for weights without repeats every group size fails there, cheaply
        if all(repeated(w, slice(0, 1)) for w in packs) and all(repeated(w) for w in packs):
            return groups
    return 1


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      is_causal: bool = False) -> torch.Tensor:
    """SDPA of ``q`` [b, heads, t, d] over grouped ``k``/``v`` [b, kv_heads, kv, d] (query head j reads
    key/value head j // (heads / kv_heads)).  For one decoding step the group's queries become the rows of
    one [b, kv_heads, group, d] query, so the cache is read once per group, not once per query head."""
    b, heads, t, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if t != 1 or is_causal:
        return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                              attn_mask=mask, is_causal=is_causal)
    if mask is not None and mask.shape[1] != 1:  # per-head (ALiBi) bias [b, heads, 1, kv] -> [b, kv_heads, group, kv]
        mask = mask.reshape(mask.shape[0], kv_heads, groups, mask.shape[-1])
    y = F.scaled_dot_product_attention(q.reshape(b, kv_heads, groups, d), k, v, attn_mask=mask)
    return y.reshape(b, heads, 1, d)


# ---------------------------------------------------------------------------------------
# attention masks
# ---------------------------------------------------------------------------------------

def build_attention_bias(q_len: int, kv_len: int, device: torch.device, dtype: torch.dtype,
                         attention_mask: torch.Tensor | None = None,
                         slopes: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
    """Return ``(attn_mask, is_causal)`` for SDPA.

    Queries are the last ``q_len`` of ``kv_len`` positions.  Without padding,
    segments or ALiBi the result is ``(None, True)`` for a square causal block
    (so SDPA can pick its flash / memory-efficient kernels) or ``(None, False)``
    for one decoding step.  Otherwise an explicit mask: boolean ``[b, 1, q, kv]``
    for RoPE, additive float ``[b|1, heads, q, kv]`` with the ALiBi bias.
    """
    past = kv_len - q_len
    if attention_mask is None and slopes is None:
        if past == 0:
            return None, True
        if q_len == 1:
            return None, False
    q_pos = torch.arange(past, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None]  # [1, q, kv]
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {kv_len} "
                             f"(past {past} + new {q_len})")
        seg_k = attention_mask
        seg_q = attention_mask[:, past:]
        allowed = allowed & (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_k[:, None, :] != 0)
        # A padding query sees nothing; let it see itself so softmax stays finite
        # (its output is never used: its own label is ignored and no real token attends to it).
        allowed = allowed | (q_pos[:, None] == k_pos[None, :])[None]
    allowed = allowed[:, None]  # [b|1, 1, q, kv]
    if slopes is None:
        return allowed, False
    rel = (k_pos[None, :] - q_pos[:, None]).to(torch.float32)  # j - i <= 0 where visible
    bias = slopes.to(device=device, dtype=torch.float32)[:, None, None] * rel[None]  # [heads, q, kv]
    bias = bias[None].masked_fill(~allowed, float("-inf"))
    return bias.to(dtype), False


def segment_runs(attention_mask: torch.Tensor) -> list[list[tuple[int, int, int]]] | None:
    """``(start, end, id)`` of every run of equal ids in each row of a segment-id / padding mask (0 =
    padding), or None when some nonzero id comes back after a gap (then only the dense mask is right)."""
    runs = []
    for row in attention_mask.tolist():
        out, seen = [], set()
        for i, seg in enumerate(row):
            if out and out[-1][2] == seg:
                out[-1][1] = i + 1
                continue
            if seg and seg in seen:
                return None
            seen.add(seg)
            out.append([i, i + 1, seg])
        runs.append([tuple(r) for r in out])
    return runs


def segmented_attention(runs: list[list[tuple[int, int, int]]], slopes: torch.Tensor | None, dtype: torch.dtype):
    """``attend(q, k, v)`` for a pass over packed segments with nothing cached before them (CPU inference:
    a batch of prompts prefilled in one row): each segment attends causally to itself only, as the dense
    segment mask says, but without the mask: segments of one length are stacked into one SDPA call, so the
    work is the sum of the segments' squares, not the square of their sum (64 short prompts packed into 933
    tokens on SmolLM2: 2.0 s of masked SDPA over 30 layers before, 0.2 s now), and each segment's numbers
    are those of the call a prompt prefilled alone makes. A padding position (id 0) sees only itself."""
    by_length: dict[int, list[tuple[int, int, int]]] = {}  # segments of one length go through one SDPA call
    padding = []
    for row, row_runs in enumerate(runs):
        for start, end, seg in row_runs:
            (by_length.setdefault(end - start, []) if seg else padding).append((row, start, end))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        out = q.new_empty(q.shape, dtype=k.dtype)
        for row, start, end in padding:
            out[row, :, start:end] = v[row, :, start:end].repeat_interleave(groups, 0)
        for n, segs in by_length.items():
            mask, is_causal = build_attention_bias(n, n, q.device, dtype, None, slopes)
            qs, ks, vs = (torch.stack([x[row, :, start:end] for row, start, end in segs]) for x in (q, k, v))
            y = F.scaled_dot_product_attention(qs.to(k.dtype), ks, vs, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=groups > 1)
            for (row, start, end), part in zip(segs, y):
                out[row, :, start:end] = part
        return out
    return attend


@dataclass
class AttentionBias:
    """How every layer of one forward pass attends: built once per forward, shared by all layers."""

    mask: torch.Tensor | None = None
    is_causal: bool = False
    # callable (q, k, v) -> out replacing SDPA: FlexAttention, or the CPU decode kernel over a slot cache
    attend: Any = None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of q/k/v inside the layers: the autocast dtype when autocast is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# ---------------------------------------------------------------------------------------
# prepacked weights (CPU inference)
# ---------------------------------------------------------------------------------------

class PrepackedWeight:
    """A prepacked copy of a weight for CPU inference, rebuilt when the weight changes.

    Why: PyTorch's fp32 CPU matmul goes through MKL, which runs its slow generic kernels on AMD CPUs and
    re-packs the weight on every call; a weight packed once is 3-4x faster at decode batch sizes (8-64
    rows).  fp32 weights go to our AVX-512 kernel (``kernels/fp32_gemm.cpp``: 48-column panels, 1.4-1.6x
    oneDNN's packed inner product on one core at 16-64 rows), bf16 weights to our AMX kernel
    (``kernels/bf16_gemm.cpp``: 1.1-2.3x oneDNN at 1-64 rows); without those, to oneDNN's blocked layout
    (AVX512-BF16/AMX for bf16: 2x faster than ``F.linear`` at batch 1 on the 125,696-row vocabulary head).  A packed row's result does not depend on how many rows share the call, so batched
    and unbatched decoding agree exactly.
    The copy costs the weight's memory once more; it is an inference cache only: never in a state dict,
    not copied by ``deepcopy``/pickle, keyed on the weight's storage and version counter, and dropped by
    its owner on every ``train()``/``eval()`` switch (fused optimizers update weights without bumping
    the version counter)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.packed: torch.Tensor | None = None
        self.gemm = None  # our fp32 kernel when ``packed`` is in its panel layout
        self.rows = 0

    @staticmethod
    def supported(w: torch.Tensor) -> bool:
        return (type(w) in (nn.Parameter, torch.Tensor) and w.dim() == 2 and w.device.type == "cpu"
                and w.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available())

    def get(self, w: torch.Tensor, transform=None) -> torch.Tensor:
        """The packed ``transform(w)`` (default ``w``); ``w`` must be `supported`."""
        key = (w.data_ptr(), w._version, w.dtype)
        if self.key != key:
            self.packed = None  # free the stale copy before building the new one
            source = w.detach() if transform is None else transform(w.detach())
            fp32 = source.dtype == torch.float32
            self.gemm = cpu_kernels.load_fp32_gemm() if fp32 else cpu_kernels.load_bf16_gemm()
            self.rows, cols = source.shape
            if self.gemm is not None and fp32:  # [ceil(N/48), K, 48] panels, zero-padded columns
                panels = -(-self.rows // 48)
                self.packed = (F.pad(source, (0, 0, 0, panels * 48 - self.rows))
                               .view(panels, 48, cols).transpose(1, 2).contiguous())
            elif self.gemm is not None:  # [ceil(N/32), ceil(K/32), 2, 16, 16, 2]: AMX tiles, k pairs innermost
                panels, steps = -(-self.rows // 32), -(-cols // 32)
                self.packed = (F.pad(source, (0, steps * 32 - cols, 0, panels * 32 - self.rows))
                               .view(panels, 2, 16, steps, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous())
            else:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(source.contiguous(), 16)
            self.key = key
        return self.packed

    def linear(self, x: torch.Tensor, w: torch.Tensor, transform=None, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        """``F.linear(x, transform(w), bias)`` on the packed copy."""
        packed = self.get(w, transform)
        if self.gemm is None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        y = self.gemm(x.reshape(-1, x.shape[-1]), packed, self.rows).view(*x.shape[:-1], self.rows)
        return y if bias is None else y + bias

    def clear(self) -> None:
        self.key = self.packed = self.gemm = None

    def __deepcopy__(self, memo) -> PrepackedWeight:
        return PrepackedWeight()

    def __getstate__(self) -> dict:
        return {"key": None, "packed": None, "gemm": None, "rows": 0}


def _use_prepacked(module: nn.Module, w: torch.Tensor) -> bool:
    return module.prepack and not (torch.is_grad_enabled() and w.requires_grad) and PrepackedWeight.supported(w)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) that can run CPU inference on a prepacked weight.

    Off until `prepack_for_inference` switches it on (the serving/decoding engine does); then every
    forward without grad on a CPU fp32/bf16 weight uses a `PrepackedWeight`."""

    prepack = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_prepacked(self, self.weight):
            return super().forward(x)
        if "_packed" not in self.__dict__:
            self._packed = PrepackedWeight()
        return self._packed.linear(x, self.weight, bias=self.bias)

    def can_prepack(self) -> bool:
        return _use_prepacked(self, self.weight) and self.bias is None

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight[rows])`` on a prepacked copy of those rows only (see `can_prepack`)."""
        if "_packed_rows" not in self.__dict__:
            self._packed_rows = PrepackedWeight()
        return self._packed_rows.linear(x, self.weight, lambda w: w.index_select(0, rows))

    def train(self, mode: bool = True) -> Linear:
        for name in ("_packed", "_packed_rows"):
            if name in self.__dict__:
                self.__dict__[name].clear()
        return super().train(mode)


def prepack_for_inference(model: nn.Module, enable: bool = True) -> int:
    """Switch prepacked CPU inference on (or off, freeing the copies) for every `Linear` and `NormHead`
    of ``model``; returns how many weights will be packed (on their next no-grad forward)."""
    n = 0
    if enable and any(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters()):
        cpu_kernels.load_fp32_gemm()  # built now (once per machine) rather than inside the first request
    for module in model.modules():
        if isinstance(module, (Linear, NormHead)) and type(module).forward in (Linear.forward, NormHead.forward):
            module.prepack = enable
            if "_packed" in module.__dict__ and not enable:
                module._packed.clear()
            n += enable and PrepackedWeight.supported(module.weight)
    return n


# ---------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 and cast back (as the official code)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_cpu_ops(x) if self.weight.dtype == x.dtype and x.shape[-1] % 16 == 0 else None
        if ops is not None:  # inference on CPU: the same computation in one pass
            return ops.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.W_pack = Linear(h, 3 * h, bias=False)  # rows: [Wq; Wk; Wv]
        self.o_proj = Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None, bias: AttentionBias,
                cache: Cache | None) -> torch.Tensor:
        groups = getattr(cache, "kv_groups", 1)
        if groups > 1 and isinstance(self.W_pack, Linear) and self.W_pack.can_prepack():
            q, k, v = self._grouped_qkv(x, rope, groups)
        else:
            qkv = self.W_pack(x).unflatten(-1, (3, -1, self.head_dim))  # [b, t, 3, heads, d]
            # split (not indexing) so the backward pass concatenates instead of zero-filling per tensor
            qk, v = qkv.split((2, 1), dim=2)
            if rope is not None:
                qk = apply_rope(qk, *rope)  # q and k rotated in one pass
            q, k = qk.unbind(2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)  # [b, heads, t, d]
            if groups > 1:  # the cache holds one key/value head per group
                k, v = k[:, ::groups], v[:, ::groups]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if bias.attend is not None:
            y = bias.attend(q, k, v).to(q.dtype)
        elif k.shape[1] != q.shape[1]:  # a grouped cache (SlotKVCache of a GQA model): one K/V head per group
            y = grouped_attention(q.to(k.dtype), k, v, bias.mask, bias.is_causal).to(q.dtype)
        else:
            # a cache may hold keys/values in a wider dtype than the model (SlotKVCache on CPU): attend in
            # that dtype, hand the result back in the queries' own (a no-op everywhere else)
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=bias.mask,
                                               is_causal=bias.is_causal).to(q.dtype)
        return self.o_proj(y.transpose(1, 2).flatten(2))

    def _grouped_qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, groups: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries of every head, keys/values of one head per group (inference on a grouped cache): only those
        rows of ``W_pack`` are multiplied (SmolLM2: 960 of 1728 rows' worth of K/V work saved)."""
        heads = self.W_pack.weight.shape[0] // (3 * self.head_dim)
        qkv = self.grouped_projection(x, groups).unflatten(-1, (-1, self.head_dim))  # [b, t, H + 2H/g, d]
        q, k, v = qkv.split((heads, heads // groups, heads // groups), dim=2)
        if rope is not None:
            cos, sin = rope[0].squeeze(2), rope[1].squeeze(2)  # [b, t, 1, d]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def grouped_projection(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """``x`` times the rows of ``W_pack`` for every query head and the first key/value head of each group:
        ``[..., (H + 2H/groups) * head_dim]`` (``W_pack`` must be a prepackable `Linear`)."""
        rows = self.__dict__.get("_group_rows")
        if rows is None or rows[0] != groups:
            heads = self.W_pack.weight.shape[0] // (3 * self.head_dim)
            d, width = self.head_dim, heads * self.head_dim
            leaders = torch.arange(0, heads, groups)[:, None] * d + torch.arange(d)[None]  # first head of each group
            index = torch.cat([torch.arange(width), width + leaders.flatten(), 2 * width + leaders.flatten()])
            rows = self.__dict__["_group_rows"] = (groups, index.to(self.W_pack.weight.device))
        return self.W_pack.forward_rows(x, rows[1])


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        ops = fused_cpu_ops(gate) if gate.shape[-1] % 16 == 0 and up.stride(-1) == 1 else None
        return self.down_proj(ops.silu_mul(gate, up) if ops is not None else F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), **attn_kwargs)
        return x + self.mlp(self.post_attention_layernorm(x))


class NormHead(nn.Module):
    """Output head whose vocabulary rows are L2-normalised in the forward pass.

    The stored weight stays un-normalised (as in the official checkpoints); the
    gradient flows through the normalisation.  Without grad the normalised
    matrix is cached until the weight changes (tracked by its version counter),
    so decoding does not renormalise a [vocab x hidden] matrix every token.  The
    cache is also dropped on every ``train()``/``eval()`` switch and every forward with
    grad, because fused optimizers (``AdamW(fused=True)``) update weights in place
    without bumping the version counter.
    """

    def __init__(self, hidden_size: int, vocab_size: int, normalize: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._cache: tuple[Any, torch.Tensor] | None = None
        # False: a plain linear head (``config.norm_head=False``, weights converted from Llama models);
        # it keeps this class's fused loss and decoding path, only the row normalisation is skipped.
        self.normalize = normalize

    def normalized_weight(self) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            self._cache = None
            return self._normalize(w)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._cache is None or self._cache[0] != key:
            normalized = self._normalize(w.detach())
            if normalized.device.type == "cpu":  # column-major: faster matrix-vector products when decoding
                normalized = normalized.t().contiguous().t()
            self._cache = (key, normalized)
        return self._cache[1]

    prepack = False  # switched on by `prepack_for_inference`

    def train(self, mode: bool = True) -> NormHead:
        self._cache = None
        if "_packed" in self.__dict__:
            self._packed.clear()
        return super().train(mode)

    def _normalize(self, w: torch.Tensor) -> torch.Tensor:
        return F.normalize(w, dim=-1) if self.normalize else w

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, z_weight: float = 0.0,
                chunk_rows: int = 0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, or with ``targets`` the fused ``(ce + z_weight * z, ce, z)`` without materialising logits.

        (The loss runs inside this module's call so FSDP/hooks see the head being used.)"""
        if targets is None:
            if _use_prepacked(self, self.weight):  # the normalised matrix, packed (no plain copy kept)
                if "_packed" not in self.__dict__:
                    self._packed = PrepackedWeight()
                return self._packed.linear(hidden, self.weight, self._normalize)
            return F.linear(hidden, self.normalized_weight())
        from baichuan2.model.fused_loss import fused_head_loss

        return fused_head_loss(hidden, self.normalized_weight(), targets, z_weight, chunk_rows)


class BaichuanModel(nn.Module):
    """The trunk: embeddings, decoder layers and the final norm (``model.*`` in checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.position_embedding == "rope":
            self.rope: RotaryEmbedding | None = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                                                config.rope_theta)
            self._slopes = None
        else:
            self.rope = None
            self._slopes = torch.tensor(alibi_slopes(config.num_attention_heads), dtype=torch.float32, device="cpu")
        self.gradient_checkpointing = False
        # Set by tensor-parallel code when each rank holds a slice of the heads (ALiBi needs their slopes).
        self.head_slice: slice | None = None

    def slopes(self, device: torch.device) -> torch.Tensor | None:
        """ALiBi slopes for the heads this module computes: all, or this tensor-parallel rank's slice."""
        if self._slopes is None:
            return None
        if self._slopes.device != device:
            self._slopes = self._slopes.to(device)
        return self._slopes if self.head_slice is None else self._slopes[self.head_slice]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        if isinstance(cache, SlotKVCache):
            return self._forward_slots(x, cache)
        past = cache.get_seq_length(0) if cache is not None else 0
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.long)
            if attention_mask.shape[1] != past + t:
                raise ValueError(f"attention_mask has {attention_mask.shape[1]} positions; expected past + new = "
                                 f"{past} + {t}")
            if bool((attention_mask == attention_mask[:, :1]).all()) and bool((attention_mask[:, 0] != 0).all()):
                attention_mask = None  # one segment, no padding: let SDPA take its fast causal path
        max_position = past + t  # bound on derived position ids, known without a device sync
        if self.rope is not None and position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=x.device)[None]
        elif position_ids is not None:
            max_position = int(position_ids.max())
        slopes = self.slopes(x.device)
        if self.config.attn_implementation == "flex" and cache is None:
            from baichuan2.model.flex import flex_attention_bias

            bias = AttentionBias(attend=flex_attention_bias(t, attention_mask, slopes, x.device))
        elif attention_mask is not None and past == 0 and x.device.type == "cpu" and not torch.is_grad_enabled() \
                and (runs := segment_runs(attention_mask)) is not None:
            bias = AttentionBias(attend=segmented_attention(runs, slopes, _compute_dtype(x)))
        else:
            mask, is_causal = build_attention_bias(t, past + t, x.device, _compute_dtype(x), attention_mask, slopes)
            bias = AttentionBias(mask=mask, is_causal=is_causal)
        rope = self.rope(position_ids, max_position, x.device) if self.rope is not None else None
        attn_kwargs = dict(rope=rope, bias=bias, cache=cache)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False, **attn_kwargs)
            else:
                x = layer(x, **attn_kwargs)
        return self.norm(x)

    def _forward_slots(self, x: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        """Continuous-batching pass: every row continues its own sequence at its own length."""
        t = x.shape[1]
        position_ids, kv_len = cache.begin(t)
        slopes = self.slopes(x.device)
        attend = cache.decode_attention(slopes) if t == 1 else None
        bias = AttentionBias(attend=attend) if attend else AttentionBias(mask=cache.ragged_bias(kv_len, cache.dtype,
                                                                                                 slopes))
        rope = self.rope(position_ids, kv_len, x.device) if self.rope is not None else None
        ops = self._fused_decode_ops(x, cache) if attend else None
        if ops is not None:
            x = self._decode_step(x, cache, attend, rope, ops)
            cache.commit()
            return x
        for layer in self.layers:
            x = layer(x, rope=rope, bias=bias, cache=cache)
        cache.commit()
        return self.norm(x)

    def _fused_decode_ops(self, x: torch.Tensor, cache: SlotKVCache):
        """Our fused CPU kernels when `_decode_step` can run this model and cache, else None."""
        ops = fused_cpu_ops(x)
        cfg = self.config
        if ops is None or cache.dtype != x.dtype or cfg.head_dim % 32 or cfg.hidden_size % 16:
            return None
        norms = [self.norm] + [n for layer in self.layers for n in (layer.input_layernorm,
                                                                     layer.post_attention_layernorm)]
        if any(type(n) is not RMSNorm or n.weight.dtype != x.dtype for n in norms):
            return None
        for layer in self.layers:
            if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention:
                return None
            w_pack = layer.self_attn.W_pack
            if cache.kv_groups > 1 and not (isinstance(w_pack, Linear) and w_pack.can_prepack()):
                return None
        return ops

    def _decode_step(self, x: torch.Tensor, cache: SlotKVCache, attend, rope, ops) -> torch.Tensor:
        """One token per row over a slot cache on CPU (`forward`'s numbers, bit for bit): the layers' own
        modules do the matmuls; between them, one kernel call each rotates q/k and writes k/v into the cache
        (`rope_append`) and adds a sublayer's output to the residual stream and normalises it (`add_rms_norm`).
        Why: at SmolLM2's 30 thin layers the ~40 PyTorch operators per layer this replaces (views, splits,
        dtype copies, scatters into the cache) cost 10-17% of a 64-row step (measured in bf16 and fp32)."""
        rows, heads, d = x.shape[0], self.config.num_attention_heads, self.config.head_dim
        x = x.reshape(rows, -1).clone()  # the residual stream, updated in place (never the caller's tensor)
        empty = x.new_empty(0, dtype=torch.float32)
        cos, sin = (c.reshape(rows, d) for c in rope) if rope is not None else (empty, empty)
        groups, starts = cache.kv_groups, cache._starts
        first = self.layers[0].input_layernorm
        h = ops.rms_norm(x, first.weight, first.eps)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = attn.grouped_projection(h, groups) if groups > 1 else attn.W_pack(h)
            q = ops.rope_append(qkv, cos, sin, cache.keys[i], cache.values[i], starts, heads)
            keys, values = cache.keys[i][:rows], cache.values[i][:rows]
            y = attend(q.view(rows, heads, 1, d), keys, values).transpose(1, 2).reshape(rows, heads * d)
            norm = layer.post_attention_layernorm
            h = ops.add_rms_norm(x, attn.o_proj(y.to(x.dtype)), norm.weight, norm.eps)
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h = ops.add_rms_norm(x, layer.mlp(h), norm.weight, norm.eps)
        return h.view(rows, 1, -1)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # ce_loss + z_loss_weight * z_loss
    ce_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None  # mean over target positions of (max logit)^2, unweighted
    hidden_states: torch.Tensor | None = None


class Baichuan(nn.Module):
    """Baichuan 2 causal LM: ``model`` (trunk) + ``lm_head`` (NormHead, or plain when ``config.norm_head`` is false)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = BaichuanModel(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size, normalize=config.norm_head)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise as the official code: every Linear/Embedding ~ N(0, 0.02), norms = 1,
        the padding row of the embedding zeroed, NormHead kaiming-uniform (a = sqrt 5)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, NormHead):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: Cache | None = None, return_logits: bool = True, return_hidden: bool = False,
                last_only: bool = False) -> ModelOutput:
        """Run the model.

        ``targets`` are already aligned with the inputs (``targets[:, i]`` is the
        token after ``input_ids[:, i]``; -100 = ignored).  With targets the output
        carries ``loss = ce + z_loss_weight * z`` where z is the mean squared max
        logit over target positions (the paper's max-z loss); backpropagate
        ``loss`` (with the fused loss, ``ce_loss``/``z_loss`` are detached
        values for logging).  Logits are skipped when ``return_logits=False``
        and targets are given.  ``last_only`` computes logits for the final
        position only (generation).
        """
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        out = ModelOutput(hidden_states=hidden if return_hidden else None)
        if targets is not None:
            out.loss, out.ce_loss, out.z_loss, out.logits = causal_lm_loss(
                self.lm_head, hidden, targets, self.config.z_loss_weight, fused=self.config.fused_loss,
                chunk_rows=self.config.loss_chunk_size, return_logits=return_logits)
        elif return_logits:
            out.logits = self.lm_head(hidden[:, -1:] if last_only else hidden)
        return out

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel() + self.lm_head.weight.numel()
        return n


def causal_lm_loss(head: NormHead, hidden: torch.Tensor, targets: torch.Tensor, z_weight: float,
                   fused: bool = True, chunk_rows: int = 0, return_logits: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(loss, ce, z, logits)``: mean cross-entropy and mean squared max logit over targets != -100.

    The fused path (default when logits are not requested) never materialises
    the logits; its ``ce``/``z`` are detached values and ``loss`` carries the
    gradient.  The official code averages z^2 over every position, padding
    included; here ignored positions are excluded so padding never shapes the logits.
    """
    if fused and not return_logits:
        loss, ce, z = head(hidden, targets=targets, z_weight=z_weight, chunk_rows=chunk_rows)
        return loss, ce, z, None
    logits = head(hidden)
    flat = logits.flatten(0, 1).float()
    y = targets.flatten()
    valid = y != IGNORE_INDEX
    n_valid = valid.sum().clamp(min=1)
    ce = F.cross_entropy(flat, y, ignore_index=IGNORE_INDEX, reduction="sum") / n_valid
    z = flat.max(dim=-1).values.pow(2).masked_fill(~valid, 0.0).sum() / n_valid
    return ce + z_weight * z, ce, z, (logits if return_logits else None)
