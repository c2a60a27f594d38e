"""Exact dedup of documents, paragraphs and sentences by 64-bit hashes of a normalised key.

The key is NFKC + case-folded + whitespace-collapsed text, so full-/half-width and spacing variants of
the same Chinese or English text collide.  The first occurrence in corpus order (input file order, then
line) is kept; later ones are removed (documents) or cut out (paragraph/sentence spans).  Resolution is
one vectorised sort over (hash, global position), so it is linear-logarithmic in the number of items
whatever the number of shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xxhash

from baichuan2.data.text import dedup_key, paragraph_spans, sentence_spans


@dataclass
class ExactArgs:
    """Args:
        documents: Remove exact duplicate documents (after normalisation).
        paragraphs: Cut repeated paragraphs (lines) out of later documents.
        sentences: Cut repeated sentences out of later documents.
        min_paragraph_chars: Shorter lines are never span-deduplicated (headings, "Thanks!").
        min_sentence_chars: Shorter sentences are never span-deduplicated.
        span_skip_sources: Sources whose spans are kept (code repeats lines legitimately).
        min_chars_after: A document left shorter than this after span removal is rejected.
    """

    documents: bool = True
    paragraphs: bool = True
    sentences: bool = True
    min_paragraph_chars: int = 40
    min_sentence_chars: int = 30
    span_skip_sources: list[str] = field(default_factory=lambda: ["code"])
    min_chars_after: int = 20


def hash_key(text: str) -> int:
    # xxh64 of the key; 0 is reserved for "no hash" (span too short to dedup).
    return xxhash.xxh64_intdigest(dedup_key(text).encode("utf-8", "surrogatepass")) or 1


def span_hashes(text: str, spans: list[tuple[int, int]], min_chars: int) -> list[int]:
    return [hash_key(text[a:b]) if b - a >= min_chars else 0 for a, b in spans]


def document_hashes(text: str, source: str, args: ExactArgs) -> tuple[int, list[int], list[int]]:
    skip = source in args.span_skip_sources
    paras = span_hashes(text, paragraph_spans(text), args.min_paragraph_chars) if args.paragraphs and not skip else []
    sents = span_hashes(text, sentence_spans(text), args.min_sentence_chars) if args.sentences and not skip else []
    return hash_key(text), paras, sents


def first_occurrence(hashes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each item, the position (in the given arrays) of the first item with the same hash, by ``order``.
    Items with hash 0 are their own first occurrence."""
    n = len(hashes)
    if n == 0:
        return np.zeros(0, np.int64)
    idx = np.lexsort((order, hashes))
    h = hashes[idx]
    new = np.concatenate([[True], h[1:] != h[:-1]])
    first_pos = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    first = np.empty(n, np.int64)
    first[idx] = idx[first_pos]
    zero = hashes == 0
    first[zero] = np.flatnonzero(zero)
    return first
