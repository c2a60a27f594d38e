"""Fixtures for the reliability suite: a tiny model and a training checkpoint written the normal way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baichuan2.model import Baichuan, ModelConfig
from baichuan2.tokenizer.shards import write_shard
from baichuan2.utils.io import atomic_write_json

VOCAB = 512


def tiny_model(seed: int = 1) -> Baichuan:
    torch.manual_seed(seed)
    return Baichuan(ModelConfig.from_name("tiny-rope"))


@pytest.fixture
def train_checkpoint(tmp_path):
    """``(step dir, saved parameters)`` of a real training-state checkpoint (model + AdamW) of a tiny model."""
    from baichuan2.train.checkpoint import save_training_state

    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, VOCAB, (2, 16))
    model(ids, ids).loss.backward()
    opt.step()
    path = save_training_state(tmp_path / "run", 1, model, opt, {"step": 1, "tokens": 32,
                               "loader": {"next_row": 2}, "bad_streak": 0}, rank=0, distributed=False)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh_model_and_optimizer():
    model = tiny_model(seed=2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


@pytest.fixture(scope="session")
def token_shards(tmp_path_factory):
    """Two small token shards (ids counting upwards, vocab 512) with a manifest, for pretraining runs."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for k in range(2):
        docs = [[(int(rng.integers(3, 500)) + j) % 509 + 3 for j in range(int(rng.integers(20, 120)))]
                for _ in range(60)]
        write_shard(d / f"shard-{k:05d}", docs, eos_id=2)
    atomic_write_json(d / "manifest.json", {"tokenizer": {"vocab_size": VOCAB}})
    return d


def pretrain_argv(shards, out, steps=2, *extra):
    return ["pretrain", "--out_dir", str(out), "--data.shards", str(shards), "--data.seq_len", "32",
            "--model.preset", "tiny-rope", "--train.global_batch_tokens", "128", "--train.micro_batch_size", "2",
            "--train.max_steps", str(steps), "--train.precision", "fp32", "--checkpoint.release_final", "false",
            *extra]
