"""Batched, resumable generation for the generative benchmarks (GSM8K, MATH, HumanEval, MBPP).

Prompts go through the serving engine's continuous batcher (``baichuan2.model.generate.Batcher``),
longest first, ``batch_size`` decoding at a time: a row that produces its end-of-sequence token or
meets the benchmark's stop condition (a stop string such as "Question:", or a pattern such as "a new
top-level statement") leaves the batch at once and the next prompt takes its place, so no row waits
for another. A prefix every prompt shares (few-shot shots) is computed once. Each item's record goes
to the per-item cache (``eval.cache``) as soon as its chunk is scored, so an interrupted run resumes
where it stopped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from baichuan2.eval.cache import ItemCache

Stop = Callable[[str], int | None]  # text -> index where the completion ends, or None


@dataclass
class GenArgs:
    """Args:
        max_new_tokens: Longest completion (capped at half the context for short-context models).
        batch_size: Prompts decoded together.
        limit: Items evaluated (0 = all); for quick checks.
        n: Samples per item (1 = greedy; more for pass@k with sampling).
        temperature: Sampling temperature when n > 1.
        top_p: Nucleus mass when n > 1.
        seed: Sampling seed.
        bos: "auto" (the tokenizer config's add_bos_token), "true" or "false".
    """

    max_new_tokens: int = 512
    batch_size: int = 16
    limit: int = 0
    n: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 1234
    bos: str = "auto"

    @property
    def greedy(self) -> bool:
        return self.n == 1


def stop_at(strings: Sequence[str] = (), pattern: str | None = None) -> Stop:
    """The earliest of the stop strings / the regex match, as a cut index."""
    regex = re.compile(pattern) if pattern else None

    def find(text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in strings if s) if i >= 0]
        if regex is not None and (m := regex.search(text)):
            hits.append(m.start())
        return min(hits) if hits else None

    return find


def decode_continuation(tok, prompt: Sequence[int], generated: Sequence[int]) -> str:
    """Text of ``generated`` as it reads after the prompt (SentencePiece drops a leading space when a
    piece is decoded on its own, which would break indentation in code)."""
    head = list(prompt[-8:])
    before = tok.decode(head)
    full = tok.decode(head + list(generated))
    return full[len(before):] if full.startswith(before) else tok.decode(list(generated))


def generate_until(model, tok, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Stop | None = None,
                   batch_size: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None) -> list[str]:
    """Completions (text, cut at ``stop``) of token-id prompts; greedy when ``temperature == 0``.

    Continuous batching: ``batch_size`` prompts decode together and a row that reaches its stop string
    is cancelled at once, its place taken by the next prompt -- a batch never waits for its longest row
    (HumanEval's completions end after ~26 tokens of 128 allowed). With ``seed``, item i samples from
    its own generator seeded ``seed + i``, whatever else shares its batch."""
    from baichuan2.model.generate import Request, SamplingConfig, batcher_for

    if not prompts:
        return []
    eos = tok.eos_id
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                         top_p=top_p, stop_token_ids=[eos], seed=seed)
    if max_new_tokens == 0:
        return [""] * len(prompts)
    batcher = batcher_for(model, prompts, max_new_tokens, max(1, min(batch_size, len(prompts))))

    def watch(req: Request):
        def emit(token: int | None, finish: str | None) -> None:
            # only the last few tokens can complete a stop string that was not there a step ago
            if token is not None and stop is not None and not req.cancelled and \
                    stop(decode_continuation(tok, req.prompt + req.tokens[:-8], req.tokens[-8:])) is not None:
                req.cancelled = True  # leaves the batch at the next step
        return emit

    reqs = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):  # longest first: admission fits
        req = Request(list(prompts[i]), cfg)
        req.emit = watch(req)
        if seed is not None:
            req.generator = torch.Generator().manual_seed(seed + i)
        reqs.append((i, req))
        batcher.add(req)
    while batcher.has_work:
        batcher.step()
    out = [""] * len(prompts)
    for i, req in reqs:
        text = decode_continuation(tok, req.prompt, req.tokens)
        cut = stop(text) if stop is not None else None
        out[i] = text if cut is None else text[:cut]
    return out


def run_generation(model, tok, items: list[dict], args: GenArgs, stop: Stop | None,
                   score: Callable[[list[dict], list[list[str]]], list[dict]], cache: ItemCache,
                   desc: str, progress: bool = True) -> dict:
    """Generate ``args.n`` completions for each item (``{"key", "ids", ...}``) not yet in ``cache``, score
    them chunk by chunk with ``score(items, completions) -> records`` (each record carries ``key``) and
    cache them. Returns timing; the records are in ``cache``."""
    from tqdm import tqdm

    max_new = effective_max_new_tokens(model, args.max_new_tokens)
    pending = sorted((it for it in items if (it["key"],) not in cache), key=lambda it: -len(it["ids"]))
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc=desc, unit="item", disable=not progress)
    start = time.time()
    chunk_size = max(1, args.batch_size * 4 // args.n)
    for c, k in enumerate(range(0, len(pending), chunk_size)):
        chunk = pending[k: k + chunk_size]
        prompts = [it["ids"] for it in chunk for _ in range(args.n)]
        texts = generate_until(model, tok, prompts, max_new, stop, args.batch_size,
                               0.0 if args.greedy else args.temperature, 1.0 if args.greedy else args.top_p,
                               None if args.greedy else args.seed + c)
        completions = [texts[j * args.n: (j + 1) * args.n] for j in range(len(chunk))]
        cache.add(score(chunk, completions))
        bar.update(len(chunk))
    bar.close()
    seconds = time.time() - start
    return {"seconds": round(seconds, 2), "generated": len(pending), "max_new_tokens": max_new,
            "items_per_second": round(len(pending) / seconds, 3) if pending and seconds > 0 else None}


def effective_max_new_tokens(model, max_new_tokens: int) -> int:
    """``max_new_tokens``, capped at half the context so a short-context model still sees its prompt."""
    return max(1, min(max_new_tokens, model.config.max_position_embeddings // 2))


def prompt_budget(model, max_new_tokens: int) -> int:
    """Prompt tokens that fit together with the completion."""
    return model.config.max_position_embeddings - effective_max_new_tokens(model, max_new_tokens)
