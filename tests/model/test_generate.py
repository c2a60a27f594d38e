"""Sampling semantics against transformers' logits processors; streaming and stop tokens."""

from __future__ import annotations

import json

import pytest
import torch

from baichuan2.model import Baichuan, ModelConfig
from baichuan2.model.generate import (SamplingConfig, apply_repetition_penalty, generate, sample_next,
                                      stream_tokens)

transformers = pytest.importorskip("transformers")


def test_repetition_penalty_matches_hf():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ours = apply_repetition_penalty(logits.clone(), seen, 1.3)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(ours, theirs)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.85), (5, 0.85), (1, 0.5), (0, 0.01)])
def test_top_k_top_p_keep_the_same_tokens_as_hf(top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(4, 64) * 3
    warpers = [transformers.TemperatureLogitsWarper(0.7)]
    if top_k:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    hf = logits.clone()
    for w in warpers:
        hf = w(None, hf)
    allowed_hf = torch.isfinite(hf)
    cfg = SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
    draws = torch.stack([sample_next(logits, cfg, torch.Generator().manual_seed(s)) for s in range(300)])
    # every draw is a token HF also allows, and every HF-allowed token of decent mass shows up
    assert all(allowed_hf[row, draws[:, row]].all() for row in range(4))
    probs = hf.softmax(-1)
    for row in range(4):
        frequent = (probs[row] > 0.05).nonzero().flatten().tolist()
        assert set(frequent) <= set(draws[:, row].tolist())


def test_greedy_and_validation():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert sample_next(logits, SamplingConfig(do_sample=False)).tolist() == [1]
    assert sample_next(logits, SamplingConfig(temperature=0)).tolist() == [1]
    for bad in (dict(top_p=0), dict(top_p=1.5), dict(temperature=-1), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(ValueError, match="invalid sampling"):
            SamplingConfig(**bad)


def test_chat_defaults_and_generation_config(tmp_path):
    cfg = SamplingConfig.chat()
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (0.3, 5, 0.85, 1.05)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "user_token_id": 195, "temperature": 0.5, "top_k": 7, "max_new_tokens": 9}))
    loaded = SamplingConfig.from_generation_config(tmp_path, top_p=0.9)
    assert (loaded.temperature, loaded.top_k, loaded.top_p, loaded.max_new_tokens) == (0.5, 7, 0.9, 9)
    assert loaded.stop_token_ids == [2, 195]


@torch.no_grad()
def test_stop_tokens_end_rows_independently_and_sampling_is_seeded():
    torch.manual_seed(3)
    model = Baichuan(ModelConfig.from_name("tiny-rope")).eval()
    prompts = [[5, 6, 7], [9, 10]]
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=10, do_sample=False, stop_token_ids=[]))
    stop = greedy[0][3]  # the 4th greedy token of row 0 becomes a stop token
    out = generate(model, prompts, SamplingConfig(max_new_tokens=10, do_sample=False, stop_token_ids=[stop]))
    assert out[0] == greedy[0][: greedy[0].index(stop)]
    assert stop not in out[1] and out[1] == greedy[1][: len(out[1])]
    steps = list(stream_tokens(model, prompts, SamplingConfig(max_new_tokens=10, do_sample=False,
                                                              stop_token_ids=[stop])))
    assert int(steps[3][0]) == stop and all(int(s[0]) == -1 for s in steps[4:])
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=11, stop_token_ids=[])
    assert generate(model, prompts, sampled) == generate(model, prompts, sampled)


def test_empty_prompt_is_an_error():
    model = Baichuan(ModelConfig.from_name("tiny-rope")).eval()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], SamplingConfig(max_new_tokens=2))
