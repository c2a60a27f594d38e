"""Perplexity and bits per byte of a checkpoint on text / JSONL / parquet files.

Documents are tokenized (with BOS only if the tokenizer config's ``add_bos_token`` says so, as in
pretraining, which separates documents with EOS), concatenated with eos between them, and cut into disjoint windows of
the context length (the first token of each window is context only), so every token after the first of
each window is predicted exactly once. Bits per byte (NLL in bits / UTF-8 bytes) compares tokenizers fairly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from baichuan2.eval.scoring import token_nll


def perplexity(model, tok, texts: Sequence[str], window: int = 0, batch_size: int = 8,
               max_tokens: int = 0, bos: str = "auto") -> dict:
    from baichuan2.eval.harness import bos_prefix

    prefix = bos_prefix(tok, bos)
    window = min(window or model.config.max_position_embeddings, model.config.max_position_embeddings)
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    stream: list[int] = []
    nbytes = 0
    for t in texts:  # whole documents only, so the byte count matches the scored tokens
        ids = prefix + tok.encode(t) + [tok.eos_id]
        if max_tokens and stream and len(stream) + len(ids) > max_tokens:
            if len(stream) >= 0.9 * max_tokens:
                break
            continue  # this one does not fit; a shorter one may
        stream += ids
        nbytes += len(t.encode("utf-8"))
    if len(stream) < 2:
        raise ValueError("no text to score")
    rows = [stream[i: i + window] for i in range(0, len(stream), window)]
    rows = [r for r in rows if len(r) >= 2]
    start = time.time()
    nll = sum(token_nll(model, rows, batch_size))
    predicted = sum(len(r) - 1 for r in rows)
    return {"tokens": predicted, "bytes": nbytes, "nll_per_token": nll / predicted,
            "perplexity": math.exp(nll / predicted), "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
            "window": window, "seconds": round(time.time() - start, 2)}
