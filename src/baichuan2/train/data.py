"""Pretraining data: weighted document mixing and packing, as a pure function of (seed, row index).

Each epoch is a *plan*: every document of the token shards appears
``floor(w) + Bernoulli(frac(w))`` times (w = its sampling weight from the data
pipeline times its source's weight), and the copies are shuffled, all from
``(seed, epoch)``.  The plan's documents, each already ending in EOS, form one
token stream that is cut into rows of ``seq_len`` inputs (+1 target), and the
rows of an epoch are read in a seeded random order (as Megatron's shuffle index
does): read in stream order, the rows of a small batch would all come from one
long document, and its gradient would swing between sources from step to step.
The order is a Feistel-network bijection of the row index, so it costs no memory
however large the epoch.  Row ``i`` of the run is therefore fixed no matter how
many processes read it or when:
resuming needs only the number of rows consumed, and a run resumed on a
different number of GPUs reads exactly the same global batches.

A row carries segment ids (1, 2, 3... per document piece) so the model's
attention never crosses documents; the target of a document's last token
(the first token of the next document) is ignored.  Every batch's ids are
checked against the vocabulary (one vectorised max), so a corrupt shard is
reported by name and offset instead of as an IndexError inside the embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from baichuan2.tokenizer.shards import TokenShards
from baichuan2.utils.io import InputError

IGNORE_INDEX = -100
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a cheap 64-bit hash with full avalanche."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def permute_index(index: int, n: int, key: int, rounds: int = 6) -> int:
    """A keyed pseudo-random bijection of ``range(n)``, O(1) time and memory per index.

    A balanced Feistel network permutes the smallest power-of-four domain holding n
    (any round function gives a bijection); indices landing >= n are encrypted
    again ("cycle walking"), which stays inside range(n) after < 4 tries on average.
    """
    if not 0 <= index < n:
        raise IndexError(f"index {index} outside range({n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    round_keys = [_mix64((key + (r + 1) * _GOLDEN) & _M64) for r in range(rounds)]
    while True:
        left, right = index >> half, index & mask
        for k in round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        index = (left << half) | right
        if index < n:
            return index


@dataclass
class EpochPlan:
    docs: np.ndarray  # global document index, in stream order
    starts: np.ndarray  # token offset of each document in the stream (len(docs) + 1 entries)

    @property
    def tokens(self) -> int:
        return int(self.starts[-1])


class PackedDataset:
    """Rows of packed, weighted, shuffled documents; ``batch(rows)`` builds model inputs."""

    def __init__(self, shard_dirs: str | Sequence[str], seq_len: int, seed: int = 0,
                 source_weights: Mapping[str, float] | None = None, use_doc_weights: bool = True,
                 shuffle_rows: bool = True, vocab_size: int | None = None):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise InputError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.shards = TokenShards(shard_dirs)
        # ids must be below this (default: the shards' tokenizer vocabulary from their manifest.json)
        self.vocab_size = vocab_size or self.shards.vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle_rows = shuffle_rows
        lengths = self.shards.lengths.astype(np.int64)
        weights = self.shards.weights if use_doc_weights else np.ones(len(lengths))
        if source_weights:
            unknown = set(source_weights) - set(self.shards.sources)
            if unknown:
                raise ValueError(f"source_weights names sources not in the shards: {sorted(unknown)} "
                                 f"(present: {sorted(set(self.shards.sources))})")
            factor = np.array([source_weights.get(s, 1.0) for s in self.shards.sources])
            weights = weights * factor
        if np.any(weights < 0) or not np.all(np.isfinite(weights)):
            raise ValueError("sampling weights must be finite and >= 0")
        self.lengths = lengths
        self.weights = weights
        expected = float((weights * lengths).sum())
        if expected < seq_len + 1:
            raise ValueError(f"the weighted corpus has ~{expected:.0f} tokens per epoch, fewer than one row "
                             f"({seq_len + 1}); add data or lower seq_len")
        self._plans: dict[int, EpochPlan] = {}
        self._epoch_rows: list[int] = []  # cumulative rows at the end of each planned epoch

    # ---- epochs ------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch])
            base = np.floor(self.weights).astype(np.int64)
            copies = base + (rng.random(len(self.weights)) < (self.weights - base))
            docs = np.repeat(np.arange(len(self.weights)), copies)
            rng.shuffle(docs)
            starts = np.zeros(len(docs) + 1, dtype=np.int64)
            np.cumsum(self.lengths[docs], out=starts[1:])
            if len(self._plans) > 2:  # keep memory bounded: only a few recent epochs
                self._plans.pop(min(self._plans))
            self._plans[epoch] = EpochPlan(docs, starts)
        return self._plans[epoch]

    def rows_in_epoch(self, epoch: int) -> int:
        return max(0, (self.plan(epoch).tokens - 1) // self.seq_len)

    def locate(self, row: int) -> tuple[int, int]:
        """Global row index -> (epoch, row within the epoch)."""
        while not self._epoch_rows or self._epoch_rows[-1] <= row:
            epoch = len(self._epoch_rows)
            n = self.rows_in_epoch(epoch)
            if n == 0 and epoch > 1000:
                raise RuntimeError("sampling weights produce empty epochs")
            self._epoch_rows.append((self._epoch_rows[-1] if self._epoch_rows else 0) + n)
        epoch = int(np.searchsorted(self._epoch_rows, row, side="right"))
        first = self._epoch_rows[epoch - 1] if epoch else 0
        return epoch, row - first

    # ---- rows ----------------------------------------------------------------------------
    def _pieces(self, index: int):
        """``(doc, first token in doc, count, position in row)`` of each document piece of global row ``index``."""
        epoch, r = self.locate(index)
        if self.shuffle_rows:
            r = permute_index(r, self.rows_in_epoch(epoch), _mix64((self.seed & _M64) ^ _mix64(epoch + _GOLDEN)))
        plan = self.plan(epoch)
        lo, hi = r * self.seq_len, r * self.seq_len + self.seq_len + 1
        pos, k = lo, int(np.searchsorted(plan.starts, lo, side="right")) - 1
        while pos < hi:
            doc = int(plan.docs[k])
            take_from = pos - int(plan.starts[k])
            take = min(int(self.lengths[doc]) - take_from, hi - pos)
            yield doc, take_from, take, pos - lo
            pos += take
            k += 1

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens[seq_len + 1], segments[seq_len + 1])`` of global row ``index``."""
        tokens = np.empty(self.seq_len + 1, dtype=np.int64)
        segments = np.empty(self.seq_len + 1, dtype=np.int64)
        for seg, (doc, take_from, take, at) in enumerate(self._pieces(index), start=1):
            tokens[at:at + take] = self.shards.doc(doc)[take_from:take_from + take]
            segments[at:at + take] = seg
        return tokens, segments

    def _bad_token_error(self, row: int, position: int, value: int) -> InputError:
        for doc, take_from, take, at in self._pieces(row):
            if at <= position < at + take:
                shard, j = self.shards.locate(doc)
                offset = int(shard.offsets[j]) + take_from + position - at
                return InputError(f"{shard.bin_path}: token id {value} at token offset {offset} (byte "
                                  f"{offset * shard.tokens.itemsize}, document {shard.doc_ids[j]!r}) is outside "
                                  f"the vocabulary of {self.vocab_size}: corrupt shard or wrong tokenizer")
        raise AssertionError("position outside the row")

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Model inputs for the given global rows: input_ids, targets (shifted), attention_mask (segments)."""
        toks, segs = zip(*(self.row(i) for i in rows))
        stacked = np.stack(toks)
        if self.vocab_size and stacked.size and stacked.max() >= self.vocab_size:
            r, p = np.argwhere(stacked >= self.vocab_size)[0]
            raise self._bad_token_error(rows[int(r)], int(p), int(stacked[r, p]))
        tokens = torch.from_numpy(stacked)
        segments = torch.from_numpy(np.stack(segs))
        targets = tokens[:, 1:].clone()
        targets[segments[:, 1:] != segments[:, :-1]] = IGNORE_INDEX  # never predict across documents
        return {"input_ids": tokens[:, :-1].contiguous(), "targets": targets,
                "attention_mask": segments[:, :-1].contiguous()}


@dataclass
class LoaderState:
    """Everything needed to continue reading exactly where a run stopped."""

    next_row: int = 0

    def state_dict(self) -> dict:
        return {"next_row": self.next_row}

    def load_state_dict(self, state: Mapping) -> None:
        self.next_row = int(state["next_row"])


def step_rows(first_row: int, rows_per_step: int, rank: int, world: int) -> list[int]:
    """The global rows this data-parallel rank reads in a step starting at ``first_row``.

    The union over ranks is the same for any world size, so a resumed run on a
    different number of processes trains on exactly the same global batches."""
    return list(range(first_row + rank, first_row + rows_per_step, world))
