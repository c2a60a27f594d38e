"""Continuous-batching decoding (`Batcher`), sampling and streaming.

`Batcher` is the one decoding engine: `generate`/`stream_tokens` (evaluation, PPO, the pipeline) run it
synchronously, the HTTP server and chat CLI run it in a scheduler thread (`baichuan2.serve.engine`).
Each step it admits waiting sequences within a KV-cache budget, prefills them in chunks (a shared prompt
prefix comes from the prefix cache instead of being recomputed), runs one batched decoding step for all
running sequences at their own lengths (`SlotKVCache`), each with its own sampling settings and random
generator, and retires finished or cancelled ones.

Sampling follows Hugging Face's order so settings mean the same thing:
repetition penalty (on every token seen so far, prompt included), then
temperature, top-k and top-p.  ``temperature == 0`` or ``do_sample=False``
is greedy.  Baichuan 2's chat defaults are ``SamplingConfig.chat()``
(temperature 0.3, top_k 5, top_p 0.85, repetition_penalty 1.05).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from baichuan2.model.model import (Baichuan, KVCache, PrepackedWeight, SlotKVCache, fused_cpu_ops, kv_head_groups,
                                   prepack_for_inference)


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    do_sample: bool = True
    stop_token_ids: list[int] = field(default_factory=lambda: [2])
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):  # (NaN fails this too)
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be finite, got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if problems:
            raise ValueError("invalid sampling settings: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def chat(cls, **overrides) -> SamplingConfig:
        """Baichuan 2-Chat's generation_config.json (user 195 also stops a runaway turn)."""
        base = cls(max_new_tokens=2048, temperature=0.3, top_k=5, top_p=0.85, repetition_penalty=1.05,
                   do_sample=True, stop_token_ids=[2, 195])
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_generation_config(cls, path: str | Path, **overrides) -> SamplingConfig:
        """Read a Hugging Face ``generation_config.json`` (file or directory holding one).

        HF semantics: ``eos_token_id`` may be a list (every id stops, e.g. ``<|im_end|>`` and
        ``<|endoftext|>``) and a file without ``do_sample`` means greedy decoding."""
        path = Path(path)
        if path.is_dir():
            path = path / "generation_config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        stops = cfg.get("eos_token_id", 2)
        stops = [int(s) for s in stops] if isinstance(stops, list) else [] if stops is None else [int(stops)]
        if cfg.get("user_token_id") is not None:
            stops.append(cfg["user_token_id"])
        values = dict(max_new_tokens=cfg.get("max_new_tokens", 256), temperature=cfg.get("temperature", 1.0),
                      top_k=cfg.get("top_k", 0) or 0, top_p=cfg.get("top_p", 1.0),
                      repetition_penalty=cfg.get("repetition_penalty", 1.0), do_sample=cfg.get("do_sample", False),
                      stop_token_ids=stops)
        values.update(overrides)
        return cls(**values)

    def to_generation_config(self, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                             user_token_id: int = 195, assistant_token_id: int = 196) -> dict:
        return {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
                "user_token_id": user_token_id, "assistant_token_id": assistant_token_id,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "repetition_penalty": self.repetition_penalty, "do_sample": self.do_sample}


def chat_generation_config(tok, pad_token_id: int) -> dict:
    """``generation_config.json`` of a chat model fine-tuned here (SFT, DPO, PPO): Baichuan 2-Chat's sampling
    defaults, stopping at the tokenizer's eos, with its bos and chat role ids."""
    chat = SamplingConfig.chat(stop_token_ids=[tok.eos_id])
    return chat.to_generation_config(pad_token_id, tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id)

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """HF semantics: for every token already present, divide positive logits by the
    penalty and multiply negative ones by it.  ``seen`` is a ``[batch, vocab]`` bool mask;
    ``penalty`` one number or one per row."""
    if not torch.is_tensor(penalty):
        if penalty == 1.0:
            return logits
        penalty = torch.tensor([penalty], dtype=logits.dtype, device=logits.device)
    # Only the seen entries change (a few hundred per row of a 125k vocabulary): gather, penalise and
    # scatter them instead of two dense passes over [batch, vocab] (~15% of a 16-row decoding step).
    rows, cols = seen.nonzero(as_tuple=True)
    p = penalty.to(logits.dtype).reshape(-1)
    p = p[rows] if p.numel() > 1 else p.expand(rows.shape)
    values = logits[rows, cols]
    out = logits.clone()
    out[rows, cols] = torch.where(values > 0, values / p, values * p)
    return out


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``argmax`` over the last dimension (first maximum on ties, as argmax).  On CPU our one-pass kernel
    (``argmax_rows``, ~10x PyTorch's reduction: 8 ms -> under 1 ms for 64 rows of a 49k vocabulary), else
    ``max(dim).indices``: the same answer from PyTorch's faster CPU reduction (2.6 vs 4.4 ms for argmax
    on [16, 125696])."""
    ops = fused_cpu_ops(logits) if logits.dim() == 2 and logits.shape[-1] > 0 else None
    if ops is not None:
        return ops.argmax_rows(logits)
    return logits.max(dim=-1).indices


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """Next token of every row of ``logits`` ``[batch, vocab]`` (already penalised), each row with its own
    settings: temperature (0 = greedy), top-k (0 = off), top-p, and one uniform draw in [0, 1) from the
    row's own generator, so a row's choice never depends on what else is in the batch.

    Top-k and top-p work on the ``max(k)`` best tokens only (a full sort only for rows without top-k):
    a token is dropped when the probability mass before it already reaches top_p (the first always stays).
    """
    out = greedy_tokens(logits)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return out
    idx = sampled.nonzero().squeeze(1)
    rows = logits[idx] / temperature[idx, None].to(logits.dtype)
    vocab = rows.shape[-1]
    k = top_k[idx].to(torch.long)
    k = torch.where((k <= 0) | (k > vocab), torch.full_like(k, vocab), k)
    width = int(k.max())
    values, order = torch.topk(rows, width, dim=-1)  # sorted, best first
    cols = torch.arange(width, device=rows.device)
    values = values.masked_fill(cols[None] >= k[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    p = top_p[idx, None].to(probs.dtype)
    probs = probs.masked_fill(((probs.cumsum(dim=-1) - probs) >= p) & (p < 1), 0.0)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms[idx].to(cdf.dtype) * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target, right=True).clamp(max=width - 1)
    out[idx] = order.gather(1, pick).squeeze(1)
    return out


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of ``logits`` ``[batch, vocab]`` (already penalised), one config for all."""
    b = logits.shape[0]
    temperature = torch.full((b,), 0.0 if cfg.greedy else cfg.temperature, device=logits.device)
    uniforms = torch.rand(b, generator=generator, device=generator.device if generator else "cpu").to(logits.device)
    return sample_rows(logits, temperature, torch.full((b,), cfg.top_k, device=logits.device),
                       torch.full((b,), cfg.top_p, device=logits.device), uniforms)


def column_major_weights(model: torch.nn.Module) -> None:
    """Store every plain Linear weight column-major (same values, same shape, transposed memory).

    At batch-1 decoding each matmul is a matrix-vector product; CPU BLAS reads an
    ``[in, out]``-contiguous matrix markedly faster than the ``[out, in]`` rows
    PyTorch uses by default (measured ~1.4x per matmul here), and training
    matmuls are equally fast either way.  Only fp32: bf16 matmuls (AVX512-BF16/AMX
    kernels) are faster with the default layout (measured 1.1-1.5x at batch 1-64).
    State dicts are unaffected (checkpoints are written contiguous).
    Sharded/DTensor weights are left alone.  Idempotent.
    """
    with torch.inference_mode(False), torch.no_grad():  # param data must stay usable by autograd
        for module in model.modules():
            w = getattr(module, "weight", None)
            if (isinstance(module, torch.nn.Linear) and type(w) is torch.nn.Parameter and w.dim() == 2
                    and w.is_contiguous() and w.device.type == "cpu" and w.dtype == torch.float32):
                w.data = w.data.t().contiguous().t()


def _packable_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2 and PrepackedWeight.supported(p))


def _available_memory() -> int:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; 0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------
# continuous batching
# ---------------------------------------------------------------------------------------

@dataclass(eq=False)
class Request:
    """One sequence to generate.  ``emit(token, finish_reason)`` is called from the thread that steps the
    batcher: once per new token (finish None), then once with ``(None, "stop" | "length" | "cancelled")``.
    Set ``cancelled`` from any thread; the sequence leaves at the next step."""

    prompt: list[int]
    cfg: SamplingConfig
    emit: Callable[[int | None, str | None], None] | None = None
    tokens: list[int] = field(default_factory=list)  # generated, stop token excluded
    stop_token: int | None = None  # the stop token that ended it, if any
    finish_reason: str | None = None
    cancelled: bool = False
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    # scheduler state
    computed: int = 0  # prompt tokens already in the prefill cache
    reserved: int = 0  # KV-cache tokens reserved at admission
    prefill: KVCache | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("every prompt needs at least one token")


class PrefixCache:
    """Keys/values of recent prompts, found again by any shared prefix (system or few-shot prompts).

    Prompts are cut into blocks of ``block`` tokens; each block boundary of a stored prompt is indexed by
    a chained hash of the tokens up to it, so a new prompt finds the longest stored prefix in one pass.
    Least recently used entries go first once ``max_tokens`` is exceeded."""

    def __init__(self, max_tokens: int, block: int = 16):
        self.max_tokens, self.block = max_tokens, block
        self.entries: OrderedDict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self.index: dict[int, int] = {}  # prefix hash -> entry id
        self.tokens = 0
        self.hits = self.queries = 0
        self._next_id = 0

    def _hashes(self, ids: Sequence[int], limit: int) -> list[int]:
        h, out = 0, []
        for end in range(self.block, limit + 1, self.block):
            h = hash((h, tuple(ids[end - self.block:end])))
            out.append(h)
        return out

    def lookup(self, prompt: list[int]) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """``(n, keys, values)``: the longest cached prefix (``n`` < len(prompt), 0 when none), per layer
        ``[heads, n, head_dim]`` views."""
        self.queries += 1
        best = (0, [], [])
        for i, h in enumerate(self._hashes(prompt, len(prompt) - 1)):
            entry_id = self.index.get(h)
            if entry_id is None:
                break
            n = (i + 1) * self.block
            tokens, keys, values = self.entries[entry_id]
            if tokens[:n] != prompt[:n]:  # a hash collision
                break
            best = (n, [k[:, :n] for k in keys], [v[:, :n] for v in values])
            self.entries.move_to_end(entry_id)
        if best[0]:
            self.hits += 1
        return best

    def insert(self, prompt: list[int], cache: KVCache) -> None:
        n = min(len(prompt), cache.get_seq_length()) // self.block * self.block
        if n == 0 or n > self.max_tokens:
            return
        hashes = self._hashes(prompt, n)
        if self.index.get(hashes[-1]) is not None:
            return  # this prefix is stored already
        entry_id, self._next_id = self._next_id, self._next_id + 1
        keys = [k[0, :, :n].clone() for k in cache.keys]
        values = [v[0, :, :n].clone() for v in cache.values]
        self.entries[entry_id] = (list(prompt[:n]), keys, values)
        self.tokens += n
        for h in hashes:
            self.index[h] = entry_id
        while self.tokens > self.max_tokens:
            old_id, (tokens, _, _) = self.entries.popitem(last=False)
            self.tokens -= len(tokens)
            for h in self._hashes(tokens, len(tokens)):
                if self.index.get(h) == old_id:
                    del self.index[h]


PACK_MAX_TOKENS = 1024  # longest packed multi-prompt prefill row (see `Batcher._prefill_fresh`)
SHARED_PREFIX_MIN = 64  # a prefix all prompts of a `stream_tokens` call share is computed once from this length


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    first, n = prompts[0], min(len(p) for p in prompts)
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return n


class Batcher:
    """Continuous batching over one model; not thread-safe (one thread calls ``add`` and ``step``).

    Args:
        max_seqs: sequences decoded together at most (rows of the slot KV cache).
        max_len: longest sequence, prompt + completion (default: the model's context length).
        kv_budget_tokens: KV-cache tokens all admitted sequences may reserve together (prompt + max new
            tokens each); admission waits for room.  Default: ``max_seqs * max_len``.
        prefill_chunk: prompt tokens computed per step, so a long prompt never stalls running streams.
        prefix_cache_tokens: prompt-prefix tokens kept for reuse (0 = no prefix cache).
        prepack: run the linear layers on prepacked weight copies (CPU; see `PrepackedWeight`);
            default: when the copies fit in the available memory.
    """

    def __init__(self, model: Baichuan, max_seqs: int = 64, max_len: int | None = None,
                 kv_budget_tokens: int | None = None, prefill_chunk: int = 512, prefix_cache_tokens: int = 0,
                 prepack: bool | None = None):
        if model.training:  # (a switch drops the model's inference caches: only when needed)
            model.eval()
        self.model = model
        if prepack is None:  # the packed copies cost the weights' memory once more: only when it is free
            prepack = _packable_bytes(model) * 1.25 < _available_memory()
        if not (prepack and prepack_for_inference(model)):
            column_major_weights(model)
        self.max_len = max_len or model.config.max_position_embeddings
        self.max_seqs = max_seqs
        # weights converted from a grouped-query model repeat each key/value head over its group: every
        # cache of this batcher keeps one head per group (the weights must not change during its life)
        self.kv_groups = kv_head_groups(model)
        self.kv_budget = kv_budget_tokens or max_seqs * self.max_len
        self.prefill_chunk = max(1, prefill_chunk)
        self.cache = SlotKVCache.for_model(model, max_seqs, self.max_len, self.kv_groups)
        vocab = model.config.vocab_size
        self.seen = torch.zeros((max_seqs, vocab), dtype=torch.bool, device=model.device)
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()
        self.running: list[Request] = []  # running[r] lives in cache row r
        self.reserved = 0
        self.generated_tokens = 0
        self.steps = 0

    def check(self, req: Request) -> None:
        """Raise ValueError when the request can never run here."""
        need = len(req.prompt) + req.cfg.max_new_tokens
        if len(req.prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(req.prompt)} tokens does not fit the context length {self.max_len}")
        if min(need, self.max_len) > self.kv_budget:
            raise ValueError(f"prompt + max_new_tokens = {need} tokens exceed the KV-cache budget of "
                             f"{self.kv_budget} tokens")

    def add(self, req: Request) -> None:
        self.check(req)
        if req.generator is None:
            seed = req.cfg.seed if req.cfg.seed is not None else int(torch.randint(2**62, ()))
            req.generator = torch.Generator().manual_seed(seed)
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def kv_tokens_used(self) -> int:
        return sum(self.cache.lengths[: len(self.running)]) + sum(r.computed for r in self.prefilling)

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: retire cancelled, admit, decode the running rows once, prefill a chunk."""
        self._drop_cancelled()
        self._admit()
        if self.running:
            self._decode()
        if self.prefilling:
            self._prefill()
        self.steps += 1

    # -- internals ---------------------------------------------------------------------

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.reserved -= req.reserved
        req.reserved, req.prefill = 0, None
        if req.emit is not None:
            req.emit(None, reason)

    def _retire_row(self, row: int) -> None:
        last = len(self.running) - 1
        if row != last:  # keep running rows contiguous: the last one takes the freed row
            self.cache.move(last, row)
            self.seen[row] = self.seen[last]
            self.running[row] = self.running[last]
        self.cache.lengths[last] = 0
        self.running.pop()

    def _drop_cancelled(self) -> None:
        for queue in (self.waiting, self.prefilling):
            for req in [r for r in queue if r.cancelled]:
                queue.remove(req)
                self._finish(req, "cancelled")
        for row in range(len(self.running) - 1, -1, -1):
            req = self.running[row]
            if req.cancelled:
                self._retire_row(row)
                self._finish(req, "cancelled")

    def _admit(self) -> None:
        while self.waiting and len(self.running) + len(self.prefilling) < self.max_seqs:
            req = self.waiting[0]
            need = min(len(req.prompt) + req.cfg.max_new_tokens, self.max_len)
            if self.reserved + need > self.kv_budget:
                break
            self.waiting.popleft()
            if req.cfg.max_new_tokens == 0:
                self._finish(req, "length")
                continue
            req.reserved = need
            self.reserved += need
            req.prefill = KVCache.for_model(self.model, 1, len(req.prompt), self.kv_groups)
            req.computed = 0
            if self.prefix_cache is not None:
                n, keys, values = self.prefix_cache.lookup(req.prompt)
                if n:
                    for layer in range(len(keys)):
                        req.prefill.keys[layer][0, :, :n] = keys[layer]
                        req.prefill.values[layer][0, :, :n] = values[layer]
                    req.prefill.lengths = [n] * len(keys)
                    req.computed = req.cached_tokens = n
            self.prefilling.append(req)

    def _prefill(self) -> None:
        """Compute up to ``prefill_chunk`` prompt tokens; the prompts completed here start running together
        (one pass of the output layer for all their first tokens: on a 125k vocabulary it costs as much
        as the rest of a small model)."""
        budget = self.prefill_chunk
        done, last_hidden = [], []
        while self.prefilling and budget > 0:
            fresh = self._prefill_fresh(budget)
            head = self.prefilling[0]
            if not fresh and budget < self.prefill_chunk and head.computed == 0 \
                    and len(head.prompt) > budget:
                break  # a prompt that no longer fits starts whole next step, not as a sliver (a pass of its own)
            for req in list(fresh) or [head]:
                if req in fresh:
                    hidden, n = fresh[req], len(req.prompt)
                else:
                    n = min(len(req.prompt) - req.computed, budget)
                    ids = torch.tensor([req.prompt[req.computed:req.computed + n]], device=self.model.device)
                    hidden = self.model.model(ids, cache=req.prefill)
                req.computed += n
                budget -= n
                if req.computed < len(req.prompt):
                    continue
                self.prefilling.popleft()  # `req` was at the head: fresh groups are taken from the head, in order
                if self.prefix_cache is not None:
                    self.prefix_cache.insert(req.prompt, req.prefill)
                row = len(self.running)
                self.cache.load(row, [k[0] for k in req.prefill.keys], [v[0] for v in req.prefill.values])
                self.seen[row] = False
                self.seen[row, torch.tensor(req.prompt, device=self.seen.device)] = True
                req.prefill = None
                self.running.append(req)
                done.append(req)
                last_hidden.append(hidden[:, -1])
        if done:
            self._accept(done, self.model.lm_head(torch.cat(last_hidden)))

    def _prefill_fresh(self, budget: int) -> dict[Request, torch.Tensor]:
        """Prefill the whole prompts at the head of the queue that have nothing computed yet and fit the
        budget together, in ONE forward pass: the prompts are packed into one row as separate segments
        (the model's segment-id mask: each attends to itself only, positions restart), so the weights are
        read once for all of them instead of once per prompt.  Their keys/values land in their own prefill
        caches; returns each one's hidden states ``[1, len, hidden]``."""
        group, total = [], 0
        for req in self.prefilling:
            # The packed row's attention is one dense [total, total] block, so packing pays only for short
            # prompts (weights read once instead of per prompt); long ones (few-shot evaluation prompts)
            # would cost (total / prompt)x the attention they need: they go one at a time.
            if req.computed or total + len(req.prompt) > min(budget, PACK_MAX_TOKENS):
                break
            group.append(req)
            total += len(req.prompt)
        if len(group) < 2:
            return {}
        device = self.model.device
        ids = torch.tensor([[t for r in group for t in r.prompt]], device=device)
        segments = torch.tensor([[i + 1 for i, r in enumerate(group) for _ in r.prompt]], device=device)
        packed = KVCache.for_model(self.model, 1, total, self.kv_groups)
        hidden = self.model.model(ids, attention_mask=segments, cache=packed)
        out, start = {}, 0
        for req in group:
            end = start + len(req.prompt)
            # views of the packed cache, not copies: the prompt is complete, so its prefill cache is only read
            # (into its slot row and the prefix cache) before it is dropped
            req.prefill.keys = [k[:, :, start:end] for k in packed.keys]
            req.prefill.values = [v[:, :, start:end] for v in packed.values]
            req.prefill.lengths = [end - start] * len(packed.keys)
            out[req] = hidden[:, start:end]
            start = end
        return out

    def _decode(self) -> None:
        n = len(self.running)
        ids = torch.tensor([[r.tokens[-1]] for r in self.running], device=self.model.device)
        self.cache.select(n)
        logits = self.model(ids, cache=self.cache, last_only=True).logits[:, -1]
        self._accept(list(self.running), logits)

    def _accept(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample one token for each of ``reqs`` (running rows ``row0..``) and retire the finished."""
        row0 = self.running.index(reqs[0])
        rows = slice(row0, row0 + len(reqs))
        greedy = [r.cfg.greedy for r in reqs]
        penalties = [r.cfg.repetition_penalty for r in reqs]
        if all(greedy) and all(p == 1.0 for p in penalties):  # the common case: no per-row tensors, no fp32 copy
            tokens = greedy_tokens(logits)
        else:
            logits = logits.float()
            if any(p != 1.0 for p in penalties):
                logits = apply_repetition_penalty(logits, self.seen[rows],
                                                  torch.tensor(penalties, device=logits.device))
            temperature = torch.tensor([0.0 if g else r.cfg.temperature for g, r in zip(greedy, reqs)],
                                       device=logits.device)
            uniforms = torch.tensor([0.0 if g else float(torch.rand((), generator=r.generator))
                                     for g, r in zip(greedy, reqs)], device=logits.device)
            top_k = torch.tensor([r.cfg.top_k for r in reqs], device=logits.device)
            top_p = torch.tensor([r.cfg.top_p for r in reqs], device=logits.device)
            tokens = sample_rows(logits, temperature, top_k, top_p, uniforms)
        self.seen[torch.arange(row0, row0 + len(reqs), device=self.seen.device), tokens] = True
        finished = []
        for row, (req, token) in enumerate(zip(reqs, tokens.tolist()), start=row0):
            self.generated_tokens += 1
            if token in req.cfg.stop_token_ids:
                req.stop_token = token
                finished.append((row, "stop"))
                continue
            req.tokens.append(token)
            if req.emit is not None:
                req.emit(token, None)
            if len(req.tokens) >= req.cfg.max_new_tokens or len(req.prompt) + len(req.tokens) >= self.max_len:
                finished.append((row, "length"))
        for row, reason in reversed(finished):  # highest row first, so moves never touch a row still to go
            req = self.running[row]
            self._retire_row(row)
            self._finish(req, reason)


@torch.inference_mode()
def batcher_for(model: Baichuan, prompts: Sequence[Sequence[int]], max_new_tokens: int, max_seqs: int) -> Batcher:
    """A `Batcher` for a known set of prompts, ``max_seqs`` of them decoded at a time.

    Few-shot prompts share their shots: that prefix is computed once here and every prompt starts from
    it (the prefix cache) instead of recomputing it (~85 % of a 4-shot GSM8K prompt)."""
    max_len = max(len(p) for p in prompts) + max_new_tokens
    shared = common_prefix_len(prompts) - 1 if len(prompts) > 1 else 0  # each prompt keeps >= 1 own token
    longest_first = sorted((len(p) for p in prompts), reverse=True)
    batcher = Batcher(model, max_seqs=max_seqs, max_len=max_len, prefill_chunk=sum(longest_first[:max_seqs]),
                      prefix_cache_tokens=shared if shared >= SHARED_PREFIX_MIN else 0)
    if batcher.prefix_cache is not None:
        n = shared // batcher.prefix_cache.block * batcher.prefix_cache.block
        kv = KVCache.for_model(model, 1, n, batcher.kv_groups)
        model.model(torch.tensor([list(prompts[0][:n])], device=model.device), cache=kv)
        batcher.prefix_cache.insert(list(prompts[0][:n]), kv)
    return batcher


def stream_tokens(model: Baichuan, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> Iterator[torch.Tensor]:
    """Yield one ``[batch]`` tensor of new token ids per step, all prompts decoded together by `Batcher`.

    Rows that have produced a stop token keep yielding ``-1`` until every row
    is done.  The stop token itself is yielded (callers decide whether to show it).
    With ``cfg.seed`` row i samples from its own generator seeded ``seed + i``.
    """
    reqs = [Request(list(p), cfg) for p in prompts]
    if not reqs or cfg.max_new_tokens == 0:
        return
    for i, req in enumerate(reqs):
        if cfg.seed is not None:
            req.generator = torch.Generator().manual_seed(cfg.seed + i)
    batcher = batcher_for(model, prompts, cfg.max_new_tokens, len(reqs))
    for req in reqs:
        batcher.add(req)
    shown = [0] * len(reqs)
    while batcher.has_work:
        batcher.step()
        step = []
        for i, req in enumerate(reqs):
            if shown[i] < len(req.tokens):
                step.append(req.tokens[shown[i]])
                shown[i] += 1
            elif req.stop_token is not None and shown[i] == len(req.tokens):
                step.append(req.stop_token)
                shown[i] += 1
            else:
                step.append(-1)
        if any(t >= 0 for t in step):
            yield torch.tensor(step)


def generate(model: Baichuan, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             include_stop: bool = False) -> list[list[int]]:
    """Generate completions for a batch of prompts (token ids); stop tokens dropped by default."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_tokens(model, prompts, cfg):
        for row, token in enumerate(step.tolist()):
            if token >= 0 and (include_stop or token not in cfg.stop_token_ids):
                out[row].append(token)
    return out


def complete(checkpoint: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.3, top_k: int = 5,
             top_p: float = 0.85, repetition_penalty: float = 1.05, greedy: bool = False, seed: int | None = None,
             dtype: str = "auto", device: str = "auto", quantize: str | None = None) -> None:
    """Complete a raw text prompt (base-model style, no chat template) and stream it to stdout.

    Args:
        checkpoint: model directory (Hugging Face layout: config.json + safetensors + tokenizer).
        prompt: text to continue, e.g. '登鹳雀楼->王之涣\\n夜雨寄北->'.
        max_new_tokens: tokens to generate at most.
        temperature: softmax temperature (0 = greedy).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1 = off).
        repetition_penalty: HF-style penalty on tokens already present (1 = off).
        greedy: always take the most likely token.
        seed: random seed for reproducible sampling.
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    from baichuan2.model.checkpoint import load_pretrained
    from baichuan2.tokenizer import Tokenizer

    model = load_pretrained(checkpoint, dtype=dtype, device=device, quantize=quantize).eval()
    tok = Tokenizer.from_pretrained(checkpoint)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, do_sample=not greedy, seed=seed,
                         stop_token_ids=[model.config.eos_token_id])
    if (Path(checkpoint) / "generation_config.json").exists():  # the checkpoint's eos ids (may be several)
        stops = SamplingConfig.from_generation_config(checkpoint).stop_token_ids
        cfg = dataclasses.replace(cfg, stop_token_ids=stops or cfg.stop_token_ids)
    ids = tok.encode(prompt)
    sys.stdout.write(prompt)
    text_so_far = ""
    generated: list[int] = []
    for step in stream_tokens(model, [ids], cfg):
        t = int(step[0])
        if t < 0 or t in cfg.stop_token_ids:
            break
        generated.append(t)
        text = tok.decode(generated)
        if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character before printing
            sys.stdout.write(text[len(text_so_far):])
            sys.stdout.flush()
            text_so_far = text
    sys.stdout.write("\n")


COMMANDS = complete
