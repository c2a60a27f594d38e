from __future__ import annotations

import numpy as np
import pytest

from baichuan2.tokenizer.shards import write_shard
from baichuan2.utils.io import atomic_write_json


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """Token shards with learnable structure: each document counts upwards from a random start
    (mod vocab), so a tiny model's loss falls quickly. Two sources with different weights."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for k in range(2):
        docs, weights, sources = [], [], []
        for i in range(150):
            n = int(rng.integers(20, 200))
            start = int(rng.integers(3, 500))
            docs.append([(start + j) % 509 + 3 for j in range(n)])
            weights.append(1.0 if i % 3 else 2.0)
            sources.append("web" if i % 2 else "code")
        write_shard(d / f"shard-{k:05d}", docs, eos_id=2, weights=weights, sources=sources)
    atomic_write_json(d / "manifest.json", {"tokenizer": {"vocab_size": 512}})
    return d


def run_args(shards, out, steps=8, extra=()):
    return ["pretrain", "--out_dir", str(out), "--data.shards", str(shards), "--data.seq_len", "64",
            "--model.preset", "tiny-alibi", "--train.global_batch_tokens", "512", "--train.micro_batch_size", "4",
            "--train.max_steps", str(steps), "--optim.warmup_steps", "2", "--optim.lr", "3e-3",
            "--train.precision", "fp32", "--train.log_every", "1", *extra]
