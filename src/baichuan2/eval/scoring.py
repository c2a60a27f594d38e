"""Batched scoring primitives shared by the harness, perplexity and the lm-eval adapter.

* ``letter_logprobs``: log-softmax of the next-token logits at the last prompt position, read at the
  answer letters' ids — how the official CMMLU/MMLU scripts and Baichuan score base models.
* ``continuation_logprobs``: summed log-probability of a continuation after a context (and whether it
  is the greedy choice) — how lm-evaluation-harness scores multiple choice.

Rows are sorted by length and right-padded per batch; the attention mask (1 = token, 0 = padding) keeps
padding out of every real position, and only the positions that are read get the output head. Tokens
every row of a batch starts with (a few-shot prompt's instructions and shots: ~80% of a 5-shot MMLU
prompt) are run once and their keys/values shared by the batch (``shared_prefix``): the same numbers up to
float rounding, a fraction of the work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from baichuan2.model.model import Baichuan


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int = 1 << 30) -> list[list[int]]:
    """Indices grouped longest first, at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens each."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, cur = [], []
    for i in order:
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * lengths[cur[0]] > max_batch_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: rows padded on the right with ``pad``; mask 1 = token, 0 = padding."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


MIN_SHARED_PREFIX = 16  # below this, one batched pass is as cheap as a separate prefix pass


def shared_prefix(rows: Sequence[Sequence[int]], limit: int) -> int:
    """Length of the token prefix every row starts with, at most ``limit``."""
    first, n = rows[0], min(min(len(r) for r in rows), limit)
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


class SharedPrefixCache:
    """Keys/values of a prefix run once (batch 1), read by every row of a batch that continues it: the prefix
    pass stores them, later passes see ``prefix + their own`` per layer, broadcast rather than copied, so
    memory stays that of one plain forward pass (the ``Cache`` protocol)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):  # the prefix pass
            self.keys.append(key_states)
            self.values.append(value_states)
            return key_states, value_states
        b = key_states.shape[0]
        return (torch.cat([self.keys[layer_idx].expand(b, -1, -1, -1), key_states], 2),
                torch.cat([self.values[layer_idx].expand(b, -1, -1, -1), value_states], 2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx < len(self.keys) else 0


@torch.inference_mode()
def _hidden(model: Baichuan, rows: list[list[int]], first_read: int = 0) -> tuple[torch.Tensor, int]:
    """``(hidden, offset)``: final hidden states of positions ``offset..`` of the right-padded rows.

    Positions before ``first_read`` are never read, so the prefix all rows share up to there runs once and
    only the rest runs batched on top of its keys/values: ``offset`` is the prefix length."""
    dev = model.device
    p = shared_prefix(rows, first_read) if len(rows) > 1 else 0
    if p < MIN_SHARED_PREFIX:
        p = 0
    ids, mask = right_pad([r[p:] for r in rows], model.config.pad_token_id or 0)
    if p == 0:
        out = model(ids.to(dev), attention_mask=None if bool(mask.all()) else mask.to(dev), return_logits=False,
                    return_hidden=True)
        return out.hidden_states, 0
    cache = SharedPrefixCache()
    model.model(torch.tensor([rows[0][:p]], device=dev), cache=cache)
    full = torch.cat([torch.ones(len(rows), p, dtype=torch.long), mask], 1)
    hidden = model.model(ids.to(dev), attention_mask=None if bool(mask.all()) else full.to(dev), cache=cache)
    return hidden, p


def _check(rows: Sequence[Sequence[int]], max_length: int) -> None:
    for r in rows:
        if not r:
            raise ValueError("cannot score an empty token sequence")
        if len(r) > max_length:
            raise ValueError(f"sequence of {len(r)} tokens exceeds the context length {max_length}")


@torch.inference_mode()
def letter_logprobs(model: Baichuan, prompts: Sequence[Sequence[int]], letter_ids: Sequence[int],
                    batch_size: int = 8, max_batch_tokens: int = 32768) -> torch.Tensor:
    """``[n, len(letter_ids)]`` log-probabilities (over the whole vocabulary) of each letter as the next token."""
    _check(prompts, model.config.max_position_embeddings)
    out = torch.empty(len(prompts), len(letter_ids))
    letters = torch.tensor(list(letter_ids), device=model.device)
    for batch in length_batches([len(p) for p in prompts], batch_size, max_batch_tokens):
        rows = [list(prompts[i]) for i in batch]
        hidden, offset = _hidden(model, rows, min(len(r) for r in rows) - 1)
        last = hidden[torch.arange(len(rows)), torch.tensor([len(r) - 1 - offset for r in rows])]
        logp = torch.log_softmax(model.lm_head(last).float(), dim=-1)
        out[batch] = logp[:, letters].cpu()
    return out


@torch.inference_mode()
def continuation_logprobs(model: Baichuan, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          batch_size: int = 8, max_batch_tokens: int = 32768) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p(continuation | context), is greedy).

    Over-long pairs keep the end of the context (the continuation must fit), as lm-eval does. The model
    reads ``context + continuation[:-1]``; pairs with the same input (the options of a multiple-choice
    question whose answers are single tokens) share one forward pass, like lm-eval's grouping by context."""
    limit = model.config.max_position_embeddings
    inputs: dict[tuple[int, ...], int] = {}  # distinct input row -> its index
    rows, reads = [], []  # reads[i] = (row index, first predicting position, continuation)
    for ctx, cont in pairs:
        if not cont:
            raise ValueError("empty continuation")
        if len(cont) >= limit:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds the context length {limit}")
        ctx = list(ctx)[-(limit - len(cont)):] if ctx else []
        if not ctx:
            raise ValueError("a continuation needs at least one context token (e.g. bos)")
        row = tuple(ctx + list(cont[:-1]))
        if row not in inputs:
            inputs[row] = len(rows)
            rows.append(list(row))
        reads.append((inputs[row], len(ctx) - 1, list(cont)))
    by_row: dict[int, list[int]] = {}
    for i, (r, _, _) in enumerate(reads):
        by_row.setdefault(r, []).append(i)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(reads)
    for batch in length_batches([len(r) for r in rows], batch_size, max_batch_tokens):
        hidden, offset = _hidden(model, [rows[i] for i in batch], min(reads[i][1] for r in batch for i in by_row[r]))
        for j, r in enumerate(batch):
            for i in by_row[r]:
                _, start, cont = reads[i]
                start -= offset
                logp = torch.log_softmax(model.lm_head(hidden[j, start: start + len(cont)]).float(), dim=-1)
                target = torch.tensor(cont, device=logp.device)
                results[i] = (float(logp.gather(1, target[:, None]).sum()),
                              bool((logp.argmax(-1) == target).all()))
    return results


@torch.inference_mode()
def token_nll(model: Baichuan, rows: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
    """Summed negative log-likelihood of tokens 1..n-1 of each row given the earlier ones."""
    _check(rows, model.config.max_position_embeddings)
    out = [0.0] * len(rows)
    for batch in length_batches([len(r) for r in rows], batch_size, 1 << 30):
        hidden, _ = _hidden(model, [list(rows[i]) for i in batch])  # every position is read: no shared prefix
        for j, i in enumerate(batch):
            n = len(rows[i])
            if n < 2:
                continue
            logp = torch.log_softmax(model.lm_head(hidden[j, : n - 1]).float(), dim=-1)
            target = torch.tensor(list(rows[i][1:]), device=logp.device)
            out[i] = -float(logp.gather(1, target[:, None]).sum())
    return out
