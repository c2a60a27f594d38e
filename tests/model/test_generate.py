"""Sampling semantics against transformers' logits processors; streaming and stop tokens."""

from __future__ import annotations

import json

import pytest
import torch

from baichuan2.model import Baichuan, ModelConfig
from baichuan2.model.generate import (SamplingConfig, apply_repetition_penalty, common_prefix_len, generate,
                                      sample_next, stream_tokens)

transformers = pytest.importorskip("transformers")


def test_repetition_penalty_matches_hf():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ids = torch.randint(0, 50, (3, 12))
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    ours = apply_repetition_penalty(logits.clone(), seen, 1.3)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(ours, theirs)
    # one penalty per row (the batcher's case); the input is left as it was
    before = logits.clone()
    ours = apply_repetition_penalty(logits, seen, torch.tensor([1.3, 1.0, 0.7]))
    assert torch.equal(logits, before)
    for row, p in enumerate((1.3, 1.0, 0.7)):
        theirs = transformers.RepetitionPenaltyLogitsProcessor(p)(ids[row:row + 1], logits[row:row + 1].clone())
        assert torch.allclose(ours[row:row + 1], theirs)


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


# ---------------------------------------------------------------------------------------
# continuous batching
# ---------------------------------------------------------------------------------------

def _reference_greedy(model, prompt, n, stops=()):
    """Greedy decoding by recomputing the whole sequence every step (no cache, no batching)."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def _tiny_and_prompts(name, context, seed, lengths, prefix=0):
    """A tiny model (torch seed 0) and random prompts of ``lengths`` tokens, each after one shared random
    ``prefix`` (also returned): the set-up of the batching tests."""
    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name(name, max_position_embeddings=context)).eval()
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 500, (prefix,), generator=g).tolist() if prefix else []
    return model, shared, [shared + torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


def _run(batcher, reqs, late=()):
    """Step until done; ``late`` requests join after the first two steps (mid-flight admission)."""
    for r in reqs:
        batcher.add(r)
    steps = 0
    while batcher.has_work or late:
        batcher.step()
        steps += 1
        if steps == 2:
            for r in late:
                batcher.add(r)
            late = ()
    return steps


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@torch.no_grad()
def test_mixed_batch_greedy_equals_unbatched_and_seeded_rows_are_independent(pos):
    from baichuan2.model.generate import Batcher, Request

    model, _, prompts = _tiny_and_prompts(f"tiny-{pos}", 64, 1, (3, 17, 9, 30, 1, 12))
    greedy = [SamplingConfig(max_new_tokens=n, do_sample=False, stop_token_ids=[]) for n in (12, 5, 12, 9, 12, 7)]
    ref = [_reference_greedy(model, p, c.max_new_tokens) for p, c in zip(prompts, greedy)]
    stop = ref[2][4]  # row 2 stops on its 5th token; the others must not notice
    greedy[2] = SamplingConfig(max_new_tokens=12, do_sample=False, stop_token_ids=[stop])
    ref[2] = ref[2][: ref[2].index(stop)]
    sampled = [SamplingConfig(max_new_tokens=10, temperature=t, top_k=k, top_p=p, repetition_penalty=rp, seed=s,
                              stop_token_ids=[])
               for t, k, p, rp, s in ((1.0, 0, 1.0, 1.0, 5), (0.7, 20, 0.9, 1.3, 6))]
    solo = []
    for cfg in sampled:
        req = Request(prompts[1], cfg)
        _run(Batcher(model, max_seqs=1), [req])
        solo.append(req.tokens)
    # 8 requests, 3 rows at most (so some wait for a free row), prompts prefilled 4 tokens per step
    batcher = Batcher(model, max_seqs=3, prefill_chunk=4)
    reqs = [Request(p, c) for p, c in zip(prompts, greedy)]
    extra = [Request(prompts[1], c) for c in sampled]
    _run(batcher, reqs[:4] + extra[:1], late=reqs[4:] + extra[1:])
    assert [r.tokens for r in reqs] == ref
    assert reqs[2].finish_reason == "stop" and reqs[0].finish_reason == "length"
    assert [r.tokens for r in extra] == solo
    assert batcher.reserved == 0 and batcher.kv_tokens_used == 0 and not batcher.running


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@torch.no_grad()
def test_repeated_kv_heads_are_cached_once_and_decoding_is_unchanged(pos):
    """Weights whose key/value heads repeat in groups (as GQA conversions write them) get a slot cache with
    one head per group; mixed-length batched greedy decoding still equals recomputation from scratch."""
    from baichuan2.model.generate import Batcher, Request
    from baichuan2.model.model import grouped_attention, kv_head_groups

    model, _, prompts = _tiny_and_prompts(f"tiny-{pos}", 64, 3, (3, 17, 9, 30))
    cfg = model.config
    assert kv_head_groups(model) == 1  # random weights: nothing repeats
    h, d, groups = cfg.hidden_size, cfg.head_dim, 2
    for layer in model.model.layers:  # make heads 2j and 2j+1 share their key and value projections
        kv = layer.self_attn.W_pack.weight.data[h:].view(2, cfg.num_attention_heads // groups, groups, d, h)
        kv[:, :, 1:] = kv[:, :, :1]
    assert kv_head_groups(model) == groups
    ref = [_reference_greedy(model, p, 10) for p in prompts]
    for prepack in (False, True):  # full W_pack then every other K/V head; only the needed rows (prepacked)
        batcher = Batcher(model, max_seqs=3, prefill_chunk=7, prepack=prepack)
        assert batcher.cache.keys[0].shape[1] == cfg.num_attention_heads // groups
        reqs = [Request(p, SamplingConfig(max_new_tokens=10, do_sample=False, stop_token_ids=[])) for p in prompts]
        _run(batcher, reqs[:2], late=reqs[2:])
        assert [r.tokens for r in reqs] == ref
    assert "_packed_rows" in model.model.layers[0].self_attn.W_pack.__dict__
    # grouped attention = SDPA over the repeated heads, for one query row (ALiBi-style per-head bias or a
    # shared boolean mask) and for several
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 9, 8, generator=g), torch.randn(3, 2, 9, 8, generator=g)
    for t, mask in ((1, torch.randn(3, 4, 1, 9, generator=g)), (1, torch.rand(3, 1, 1, 9, generator=g) > 0.3),
                    (1, None), (4, torch.randn(3, 4, 4, 9, generator=g))):
        q = torch.randn(3, 4, t, 8, generator=g)
        want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                v.repeat_interleave(2, 1), attn_mask=mask)
        assert torch.allclose(grouped_attention(q, k, v, mask), want, atol=1e-6)
    q = torch.randn(3, 4, 9, 8, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True)
    assert torch.allclose(grouped_attention(q, k, v, None, is_causal=True), want, atol=1e-6)


@torch.no_grad()
def test_prefix_cache_hits_and_leaves_outputs_unchanged():
    from baichuan2.model.generate import Batcher, Request

    model, _, prompts = _tiny_and_prompts("tiny-alibi", 96, 2, (5, 11, 3), prefix=40)  # a shared "system prompt"
    cfg = SamplingConfig(max_new_tokens=8, do_sample=False, stop_token_ids=[])
    plain = Batcher(model, max_seqs=2)
    cached = Batcher(model, max_seqs=2, prefix_cache_tokens=1000)
    want, got = [Request(p, cfg) for p in prompts], [Request(p, cfg) for p in prompts]
    for b, reqs in ((plain, want), (cached, got)):
        for r in reqs:  # one after another, so later prompts can reuse the first one's prefix
            _run(b, [r])
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [r.cached_tokens for r in got] == [0, 32, 32]  # 40 shared tokens -> two 16-token blocks
    assert cached.prefix_cache.hits == 2
    again = Request(prompts[0], cfg)  # the whole (block-aligned) prompt is cached now
    _run(cached, [again])
    assert again.cached_tokens == 32 and again.tokens == want[0].tokens


@torch.no_grad()
def test_cancel_budget_and_context_limit():
    from baichuan2.model.generate import Batcher, Request

    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name("tiny-rope", max_position_embeddings=32)).eval()
    events = []
    long = Request([5] * 10, SamplingConfig(max_new_tokens=100, do_sample=False, stop_token_ids=[]),
                   emit=lambda t, f: events.append((t, f)))
    # budget of 40 tokens: the 2nd request (10 + 30) must wait for the first (10 + 22 capped at 32) to leave
    batcher = Batcher(model, max_seqs=4, kv_budget_tokens=40)
    other = Request([6] * 10, SamplingConfig(max_new_tokens=30, do_sample=False, stop_token_ids=[]))
    batcher.add(long)
    batcher.add(other)
    batcher.step()
    assert len(batcher.waiting) == 1 and batcher.reserved == 32
    for _ in range(3):
        batcher.step()
    long.cancelled = True
    batcher.step()
    assert long.finish_reason == "cancelled" and events[-1] == (None, "cancelled")
    assert 1 <= len(long.tokens) <= 4 and not batcher.waiting
    while batcher.has_work:
        batcher.step()
    assert other.finish_reason == "length" and len(other.tokens) == 32 - 10  # stopped at the context length
    with pytest.raises(ValueError, match="context length"):
        batcher.add(Request([1] * 32, SamplingConfig(max_new_tokens=1)))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is part of every CPU build of torch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_inference_weights_match_and_follow_weight_changes(dtype):
    import copy

    from baichuan2.model.model import prepack_for_inference

    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name("tiny-rope", max_position_embeddings=64)).to(dtype).eval()
    ids = torch.randint(3, 500, (3, 7))
    keys = list(model.state_dict())
    with torch.no_grad():
        plain = model(ids).logits.float()
    assert prepack_for_inference(model) == 5 * model.config.num_hidden_layers + 1
    with torch.no_grad():
        packed = model(ids).logits.float()
    assert model.lm_head._packed.packed is not None and model.model.layers[0].mlp.up_proj._packed.packed is not None
    tol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(packed, plain, atol=tol, rtol=tol)
    # a weight changed in place (version counter) is repacked; the packed copies never reach a state dict
    with torch.no_grad():
        model.lm_head.weight[:10].mul_(-1)
        flipped = model(ids).logits.float()
    assert torch.allclose(flipped[..., :10], -packed[..., :10], atol=tol, rtol=tol)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)  # (an oneDNN tensor cannot be deep-copied: the cache is left behind)
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits.float(), flipped)
    # with grad the plain path runs and gradients flow; train() drops the copies
    model.train()
    assert model.lm_head._packed.packed is None
    model(ids, ids).loss.backward()
    assert model.model.layers[0].self_attn.W_pack.weight.grad is not None
    prepack_for_inference(model, enable=False)
    assert not model.lm_head.prepack


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@torch.no_grad()
def test_prompts_prefilled_together_in_one_packed_pass_decode_as_alone(pos):
    from baichuan2.model.generate import Batcher, Request

    model, _, prompts = _tiny_and_prompts(f"tiny-{pos}", 64, 2, (5, 1, 11, 8, 20))
    cfg = SamplingConfig(max_new_tokens=6, do_sample=False, stop_token_ids=[])
    ref = [_reference_greedy(model, p, 6) for p in prompts]
    batcher = Batcher(model, max_seqs=8, prefill_chunk=26)  # the first four fit one packed pass, the 5th waits
    packed = []
    fresh = batcher._prefill_fresh
    batcher._prefill_fresh = lambda budget: packed.append(len(out := fresh(budget))) or out
    reqs = [Request(p, cfg) for p in prompts]
    _run(batcher, reqs)
    assert packed[0] == 4
    assert [r.tokens for r in reqs] == ref


@torch.no_grad()
def test_a_prompt_cut_by_the_chunk_does_not_stop_the_next_ones_being_packed():
    """Prefill passes cost a read of every weight: short prompts go together, never one by one behind a
    prompt the previous step's budget cut, and no pass is a sliver left over at the end of a budget."""
    from baichuan2.model.generate import Batcher, Request

    model, _, prompts = _tiny_and_prompts("tiny-rope", 64, 4, (30, 10, 10, 10, 10, 10))
    cfg = SamplingConfig(max_new_tokens=3, do_sample=False, stop_token_ids=[])
    ref = [_reference_greedy(model, p, 3) for p in prompts]
    batcher = Batcher(model, max_seqs=8, prefill_chunk=25)
    passes = []
    trunk = model.model.forward
    model.model.forward = lambda ids, **kw: (passes.append(ids.shape[1]) if kw.get("attention_mask") is not None
                                             or type(kw.get("cache")).__name__ == "KVCache" else None) or trunk(ids, **kw)
    reqs = [Request(p, cfg) for p in prompts]
    _run(batcher, reqs)
    # 25 of the long prompt, then its last 5 + two packed prompts (20), then two steps of two packed prompts
    assert passes == [25, 5, 20, 20, 10], passes
    assert [r.tokens for r in reqs] == ref


@pytest.mark.parametrize("kernel", [True, False])
@torch.no_grad()
def test_bf16_model_decodes_on_a_bf16_cache_with_the_kernel_and_an_fp32_one_without(kernel, monkeypatch):
    from baichuan2.model import model as model_module
    from baichuan2.model.generate import Batcher, Request

    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name("tiny-alibi", max_position_embeddings=64)).to(torch.bfloat16).eval()
    if not kernel:
        monkeypatch.setattr(model_module, "_decode_kernel", lambda head_dim: None)
    batcher = Batcher(model, max_seqs=2)
    # our decode kernel reads bf16 keys/values (exactly the model's numbers); PyTorch's bf16 one-query
    # attention is slow on CPU, so without the kernel the cache is fp32
    with_kernel = model_module._decode_kernel(model.config.head_dim) is not None
    assert batcher.cache.dtype == (torch.bfloat16 if with_kernel else torch.float32)
    assert with_kernel == (kernel and torch.backends.cpu.get_cpu_capability() == "AVX512")
    cfg = SamplingConfig(max_new_tokens=5, do_sample=False, stop_token_ids=[])
    reqs = [Request([5, 6, 7], cfg), Request([9] * 11, cfg)]
    _run(batcher, reqs)
    assert [len(r.tokens) for r in reqs] == [5, 5]
    # the first token comes from the prefill (bf16 cache, bf16 attention) and agrees with a plain forward
    assert reqs[0].tokens[0] == int(model(torch.tensor([[5, 6, 7]])).logits[0, -1].float().argmax())


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@torch.no_grad()
def test_a_prefix_all_prompts_share_is_computed_once_and_outputs_are_unchanged(pos, monkeypatch):
    """Few-shot prompts: `stream_tokens` computes the shared shots once (prefix cache); each prompt then
    computes only its own tail, and greedy output equals each prompt decoded alone."""
    import baichuan2.model.generate as gen

    model, shots, prompts = _tiny_and_prompts(f"tiny-{pos}", 256, 3, (7, 1, 30), prefix=100)
    prompts.append(shots[:90])
    ref = [_reference_greedy(model, p, 5) for p in prompts]
    caches = []
    real = gen.Batcher.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        caches.append(self.prefix_cache)

    monkeypatch.setattr(gen.Batcher, "__init__", spy)
    cfg = SamplingConfig(max_new_tokens=5, do_sample=False, stop_token_ids=[])
    steps = torch.stack(list(stream_tokens(model, prompts, cfg)))
    assert [steps[:, i].tolist() for i in range(len(prompts))] == ref
    (cache,) = caches
    assert cache is not None and cache.hits == len(prompts)  # 89 shared tokens -> 80 (5 blocks) reused by all
    assert common_prefix_len(prompts) == 90
