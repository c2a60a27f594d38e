"""Incremental decoding with a preallocated KV cache, sampling and streaming.

Sampling follows Hugging Face's order so settings mean the same thing:
repetition penalty (on every token seen so far, prompt included), then
temperature, top-k and top-p.  ``temperature == 0`` or ``do_sample=False``
is greedy.  Baichuan 2's chat defaults are ``SamplingConfig.chat()``
(temperature 0.3, top_k 5, top_p 0.85, repetition_penalty 1.05).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from baichuan2.model.model import Baichuan, KVCache


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
        if not (0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
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
        """Read a Hugging Face ``generation_config.json`` (file or directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "generation_config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        stops = cfg.get("eos_token_id", 2)
        stops = list(stops) if isinstance(stops, list) else [stops]
        if "user_token_id" in cfg:
            stops.append(cfg["user_token_id"])
        values = dict(max_new_tokens=cfg.get("max_new_tokens", 256), temperature=cfg.get("temperature", 1.0),
                      top_k=cfg.get("top_k", 0) or 0, top_p=cfg.get("top_p", 1.0),
                      repetition_penalty=cfg.get("repetition_penalty", 1.0), do_sample=cfg.get("do_sample", True),
                      stop_token_ids=stops)
        values.update(overrides)
        return cls(**values)

    def to_generation_config(self, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                             user_token_id: int = 195, assistant_token_id: int = 196) -> dict:
        return {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
                "user_token_id": user_token_id, "assistant_token_id": assistant_token_id,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "repetition_penalty": self.repetition_penalty, "do_sample": self.do_sample}


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: for every token already present, divide positive logits by the
    penalty and multiply negative ones by it.  ``seen`` is a ``[batch, vocab]`` bool mask."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of ``logits`` ``[batch, vocab]`` (already penalised)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack prompts of different lengths, padded on the left; mask is None when no padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, (None if bool(mask.all()) else mask)


def column_major_weights(model: torch.nn.Module) -> None:
    """Store every plain Linear weight column-major (same values, same shape, transposed memory).

    At batch-1 decoding each matmul is a matrix-vector product; CPU BLAS reads an
    ``[in, out]``-contiguous matrix markedly faster than the ``[out, in]`` rows
    PyTorch uses by default (measured ~1.4x per matmul here), and training
    matmuls are equally fast either way.  State dicts are unaffected (checkpoints
    are written contiguous).  Sharded/DTensor weights are left alone.  Idempotent.
    """
    with torch.inference_mode(False), torch.no_grad():  # param data must stay usable by autograd
        for module in model.modules():
            w = getattr(module, "weight", None)
            if (isinstance(module, torch.nn.Linear) and type(w) is torch.nn.Parameter and w.dim() == 2
                    and w.is_contiguous() and w.device.type == "cpu"):
                w.data = w.data.t().contiguous().t()


@torch.inference_mode()
def stream_tokens(model: Baichuan, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> Iterator[torch.Tensor]:
    """Yield one ``[batch]`` tensor of new token ids per step.

    Rows that have produced a stop token keep yielding ``-1`` until every row
    is done.  The stop token itself is yielded (callers decide whether to show it).
    """
    ids, mask = left_pad(prompts, model.config.pad_token_id)
    column_major_weights(model)
    device = model.device
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    batch, width = ids.shape
    if cfg.max_new_tokens == 0:
        return
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    cache = KVCache.for_model(model, batch, width + cfg.max_new_tokens)
    vocab = model.config.vocab_size
    # tokens already present (prompt included), for the repetition penalty; pads go to a spare column
    present = ids if mask is None else ids.masked_fill(mask == 0, vocab)
    seen = torch.zeros((batch, vocab + 1), dtype=torch.bool, device=device).scatter_(1, present, True)[:, :vocab]
    stops = torch.tensor(sorted(set(cfg.stop_token_ids)), device=device, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True).logits[:, -1]
    for step in range(cfg.max_new_tokens):
        logits = apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
        nxt = sample_next(logits, cfg, generator)
        nxt = torch.where(finished, torch.full_like(nxt, -1), nxt)
        yield nxt
        finished |= torch.isin(nxt, stops)
        if bool(finished.all()) or step == cfg.max_new_tokens - 1:
            return
        token = nxt.clamp(min=0)
        seen[torch.arange(batch, device=device), token] = True
        if mask is not None:
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        logits = model(token[:, None], attention_mask=mask, cache=cache, last_only=True).logits[:, -1]


def generate(model: Baichuan, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             include_stop: bool = False) -> list[list[int]]:
    """Generate completions for a batch of prompts (token ids); stop tokens dropped by default."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops = set(cfg.stop_token_ids)
    for step_ids in stream_tokens(model, prompts, cfg):
        for row, tok in enumerate(step_ids.tolist()):
            if done[row] or tok < 0:
                continue
            if tok in stops:
                done[row] = True
                if not include_stop:
                    continue
            out[row].append(tok)
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
