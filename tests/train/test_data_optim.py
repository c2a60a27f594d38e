"""Loader determinism, weighting, packing; optimizer groups and schedule."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from baichuan2.model import Baichuan, ModelConfig
from baichuan2.train.data import PackedDataset, permute_index, step_rows
from baichuan2.train.optim import OptimArgs, lr_at, param_groups


def test_rows_are_a_pure_function_of_seed_and_index(shard_dir):
    a = PackedDataset(shard_dir, seq_len=64, seed=3)
    b = PackedDataset(shard_dir, seq_len=64, seed=3)
    late_first = b.row(500)  # random access in any order gives the same rows
    for i in (0, 1, 7, 500, 2000):
        ta, sa = a.row(i)
        tb, sb = b.row(i)
        assert np.array_equal(ta, tb) and np.array_equal(sa, sb)
    assert np.array_equal(late_first[0], a.row(500)[0])
    c = PackedDataset(shard_dir, seq_len=64, seed=4)
    assert not np.array_equal(a.row(0)[0], c.row(0)[0])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 255, 1000, 4097])
def test_permute_index_is_a_keyed_bijection(n):
    perm = [permute_index(i, n, key=7) for i in range(n)]
    assert sorted(perm) == list(range(n))
    if n >= 255:
        assert perm != list(range(n))
        assert perm != [permute_index(i, n, key=8) for i in range(n)]
        # shuffled, not shifted: neighbours land far apart on average (uniform: n / 3)
        assert np.mean(np.abs(np.diff(perm))) > n / 5
    with pytest.raises(IndexError):
        permute_index(n, n, key=7)


def test_rows_of_an_epoch_are_shuffled(shard_dir):
    stream = PackedDataset(shard_dir, seq_len=64, seed=0, shuffle_rows=False)
    shuffled = PackedDataset(shard_dir, seq_len=64, seed=0)
    n = stream.rows_in_epoch(0)
    rows = Counter(stream.row(i)[0].tobytes() for i in range(n))
    picked = [shuffled.row(i)[0].tobytes() for i in range(n)]
    assert Counter(picked) == rows  # the same rows, each once
    assert picked[:20] != [stream.row(i)[0].tobytes() for i in range(20)]
    # rows overlap by one token (the last target), so in stream order each row starts where the last ended
    def continues(ds, i):
        return ds.row(i)[0][0] == ds.row(i - 1)[0][-1]
    assert sum(continues(stream, i) for i in range(1, 40)) > 30
    assert sum(continues(shuffled, i) for i in range(1, 40)) < 10


def test_packing_segments_and_targets(shard_dir):
    ds = PackedDataset(shard_dir, seq_len=64, seed=0)
    batch = ds.batch([0, 1, 2, 3])
    ids, targets, seg = batch["input_ids"], batch["targets"], batch["attention_mask"]
    assert ids.shape == targets.shape == seg.shape == (4, 64)
    assert (seg >= 1).all()
    # inside a document the target is the next token; across a boundary it is ignored
    same = seg[:, 1:] == seg[:, :-1]
    assert torch.equal(targets[:, :-1][same], ids[:, 1:][same])
    assert (targets[:, :-1][~same] == -100).all()
    # every document piece ends with EOS (2) except when a row cuts it
    boundaries = (~same).nonzero()
    for r, c in boundaries.tolist():
        assert ids[r, c] == 2


def test_document_weights_drive_sampling(shard_dir):
    ds = PackedDataset(shard_dir, seq_len=64, seed=0)
    counts = Counter()
    for epoch in range(20):
        counts.update(ds.plan(epoch).docs.tolist())
    weights = ds.weights
    heavy = np.mean([counts[i] for i in range(len(weights)) if weights[i] == 2.0])
    light = np.mean([counts[i] for i in range(len(weights)) if weights[i] == 1.0])
    assert heavy / light == pytest.approx(2.0, rel=0.05)
    ds2 = PackedDataset(shard_dir, seq_len=64, seed=0, source_weights={"code": 0.5})
    per_source = Counter()
    for epoch in range(20):
        per_source.update(ds2.shards.sources[d] for d in ds2.plan(epoch).docs)
    assert per_source["code"] < 0.6 * per_source["web"]
    with pytest.raises(ValueError, match="not in the shards"):
        PackedDataset(shard_dir, seq_len=64, source_weights={"books": 2.0})


def test_global_batches_do_not_depend_on_world_size():
    for world in (1, 2, 4):
        rows = sorted(r for rank in range(world) for r in step_rows(40, 8, rank, world))
        assert rows == list(range(40, 48))


def test_param_groups_exclude_norms_and_embeddings():
    model = Baichuan(ModelConfig.from_name("tiny-rope"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_warmup_then_cosine():
    args = OptimArgs(lr=2e-4, warmup_steps=2000, min_lr_ratio=0.1)
    assert lr_at(0, args, 10000) == pytest.approx(2e-4 / 2000)
    assert lr_at(999, args, 10000) == pytest.approx(2e-4 * 1000 / 2000)
    assert lr_at(2000, args, 10000) == pytest.approx(2e-4)
    assert lr_at(6000, args, 10000) == pytest.approx(2e-5 + 0.5 * 1.8e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10000, args, 10000) == pytest.approx(2e-5)
    lrs = [lr_at(s, args, 10000) for s in range(2000, 10001, 500)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
