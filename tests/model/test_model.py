"""Forward-pass invariances and Baichuan-specific maths (ALiBi, NormHead, max-z, RoPE precision)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baichuan2.model import Baichuan, KVCache, ModelConfig, alibi_slopes
from baichuan2.model.model import positions_from_mask

POSITIONS = ["rope", "alibi"]


def make(pos: str, **overrides) -> Baichuan:
    torch.manual_seed(0)
    return Baichuan(ModelConfig.from_name(f"tiny-{pos}", **overrides)).eval()


# ---- ALiBi slopes: Baichuan 2's _get_interleave, transcribed from the official modeling code ----

def official_get_interleave(n):
    def _get_interleave_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return _get_interleave_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return _get_interleave_power_of_2(closest_power_of_2) + official_get_interleave(2 * closest_power_of_2)[0::2][
        : n - closest_power_of_2]


@pytest.mark.parametrize("heads", [8, 32, 40])
def test_alibi_slopes_match_baichuan_formula(heads):
    assert alibi_slopes(heads) == pytest.approx(official_get_interleave(heads), rel=0, abs=0)


def test_alibi_slopes_40_heads_values():
    s = alibi_slopes(40)
    assert len(s) == 40
    # 32-head geometric sequence 2^(-8k/32), then the 64-head sequence at odd k (spec section 3.6)
    assert s[:32] == pytest.approx([2 ** (-k / 4) for k in range(1, 33)], rel=1e-12)
    assert s[32:] == pytest.approx([2 ** (-k / 8) for k in range(1, 16, 2)], rel=1e-12)
    assert s[0] == pytest.approx(0.840896, abs=1e-6) and s[32] == pytest.approx(0.917004, abs=1e-6)
    assert s[31] == pytest.approx(0.00390625) and s[39] == pytest.approx(0.272627, abs=1e-6)


def official_alibi_logits(model: Baichuan, ids: torch.Tensor) -> torch.Tensor:
    """The official 13B eval path, written out: bias = slope * j (absolute key index) + future mask,
    explicit softmax(q k^T / sqrt(d) + mask) — not SDPA, not relative distances."""
    cfg = model.config
    t = ids.shape[1]
    slopes = torch.tensor(official_get_interleave(cfg.num_attention_heads))
    future = torch.triu(torch.full((t, t), float("-inf")), 1)
    mask = slopes[:, None, None] * torch.arange(t)[None, None, :] + future[None]
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = a.W_pack(h).unflatten(-1, (3, cfg.num_attention_heads, cfg.head_dim)).permute(2, 0, 3, 1, 4)
        w = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim) + mask[None]
        y = (w.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = x + a.o_proj(y)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = model.model.norm(x)
    return h @ F.normalize(model.lm_head.weight, dim=-1).T


@torch.no_grad()
def test_alibi_matches_official_eval_computation():
    model = make("alibi")
    ids = torch.randint(3, 512, (2, 40))
    assert torch.allclose(model(ids).logits, official_alibi_logits(model, ids), atol=1e-5)


# ---- invariances -------------------------------------------------------------------------

@pytest.mark.parametrize("pos", POSITIONS)
@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(pos):
    model = make(pos)
    ids = torch.randint(3, 512, (2, 24))
    full = model(ids).logits
    cache = KVCache.for_model(model, batch=2, max_len=24)
    steps = [model(ids[:, :10], cache=cache).logits]  # prefill, then one token at a time
    steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(10, 24)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("pos", POSITIONS)
@torch.no_grad()
def test_chunked_prefill_with_cache(pos):
    model = make(pos)
    ids = torch.randint(3, 512, (1, 30))
    cache = KVCache.for_model(model, batch=1, max_len=30)
    parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 7), (7, 19), (19, 30))]
    assert torch.allclose(torch.cat(parts, 1), model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@torch.no_grad()
def test_packed_batch_equals_documents_alone(pos, impl):
    model = make(pos, attn_implementation=impl)
    docs = [torch.randint(3, 512, (n,)) for n in (7, 12, 5)]
    packed = torch.cat(docs)[None]
    segments = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)])[None]
    out = model(packed, attention_mask=segments).logits[0]
    start = 0
    for d in docs:
        alone = model(d[None]).logits[0]
        assert torch.allclose(out[start:start + len(d)], alone, atol=1e-5)
        start += len(d)


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 2])
@torch.no_grad()
def test_packed_segments_attend_per_segment_as_the_dense_mask_says(monkeypatch, pos, dtype, groups):
    """Inference over packed segments (no cache before them, CPU) runs one SDPA per segment length instead of
    one dense segment mask: the same outputs as the mask, for equal and unequal lengths, padding (id 0),
    two rows, and a grouped key/value cache."""
    from baichuan2.model import model as model_module
    from baichuan2.model.model import kv_head_groups, segment_runs

    model = make(pos).to(dtype)
    cfg = model.config
    h, d = cfg.hidden_size, cfg.head_dim
    for layer in model.model.layers:  # heads 2j and 2j+1 share their key/value projections
        kv = layer.self_attn.W_pack.weight.data[h:].view(2, cfg.num_attention_heads // groups, groups, d, h)
        kv[:, :, 1:] = kv[:, :, :1]
    assert kv_head_groups(model) == groups
    ids = torch.randint(3, 512, (2, 24))
    segments = torch.tensor([[1] * 5 + [2] * 7 + [3] * 5 + [4] * 7,  # lengths 5, 7, 5, 7: stacked in pairs
                             [0] * 3 + [1] * 9 + [2] * 5 + [3] * 4 + [0] * 3])  # padding on both sides
    assert segment_runs(segments)[1] == [(0, 3, 0), (3, 12, 1), (12, 17, 2), (17, 21, 3), (21, 24, 0)]
    assert segment_runs(torch.tensor([[1, 1, 2, 1]])) is None  # an id back after a gap: only the mask is right
    calls = []
    monkeypatch.setattr(model_module, "segmented_attention",
                        lambda *a, _f=model_module.segmented_attention: calls.append(1) or _f(*a))

    def run():
        cache = KVCache.for_model(model, 2, 24, kv_groups=groups)
        return model(ids, attention_mask=segments, cache=cache).logits.float(), cache.keys[0].float()

    (fast, fast_keys), used = run(), bool(calls)
    monkeypatch.setattr(model_module, "segment_runs", lambda mask: None)
    dense, dense_keys = run()
    assert used and len(calls) == 1
    real = segments != 0  # padding positions' outputs are never used (and see only themselves either way)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast[real], dense[real], atol=tol * dense.abs().max().item(), rtol=0)
    assert torch.equal(fast_keys, dense_keys)


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padded_batch_equals_single_sequences(pos, side):
    model = make(pos)
    seqs = [torch.randint(3, 512, (n,)) for n in (9, 16, 4)]
    width = 16
    ids = torch.zeros((3, width), dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    out = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        assert torch.allclose(out[i, sl], model(s[None]).logits[0], atol=1e-5)


@pytest.mark.parametrize("pos", POSITIONS)
@torch.no_grad()
def test_left_padded_decoding_with_cache(pos):
    model = make(pos)
    short, long = torch.randint(3, 512, (5,)), torch.randint(3, 512, (9,))
    ids = torch.zeros((2, 9), dtype=torch.long)
    ids[0, 4:], ids[1] = short, long
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    cache = KVCache.for_model(model, 2, 12)
    model(ids, attention_mask=mask, cache=cache)
    nxt = torch.randint(3, 512, (2, 1))
    mask = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], 1)
    step = model(nxt, attention_mask=mask, cache=cache).logits[:, -1]
    assert torch.allclose(step[0], model(torch.cat([short, nxt[0]])[None]).logits[0, -1], atol=1e-5)
    assert torch.allclose(step[1], model(torch.cat([long, nxt[1]])[None]).logits[0, -1], atol=1e-5)


def test_positions_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 2, 2, 2], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]


# ---- NormHead, losses, precision ------------------------------------------------------------

def test_normhead_normalises_rows_and_keeps_stored_weight():
    model = make("rope")
    with torch.no_grad():
        model.lm_head.weight.mul_(7.0)  # un-normalised rows, as in official checkpoints
    raw = model.lm_head.weight.detach().clone()
    ids = torch.randint(3, 512, (1, 6))
    out = model(ids, return_hidden=True)
    expected = out.hidden_states @ (raw / raw.norm(dim=-1, keepdim=True)).T
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.equal(model.lm_head.weight, raw)  # never overwritten (unlike the official eval path)


def test_normhead_eval_cache_follows_weight_updates():
    model = make("rope")
    ids = torch.randint(3, 512, (1, 4))
    with torch.no_grad():
        before = model(ids).logits
        model.lm_head.weight[:10].mul_(-1.0)  # in-place update bumps the version counter
        after = model(ids).logits
    assert not torch.allclose(before[..., :10], after[..., :10])
    assert torch.allclose(before[..., :10], -after[..., :10], atol=1e-6)


def test_normhead_eval_cache_survives_fused_optimizer_steps():
    """Fused AdamW updates weights without bumping their version: evaluation between training steps
    (the trainer's periodic val loss, SFT's before/after loss) must still see the new head."""
    model = make("rope")
    ids = torch.randint(3, 512, (2, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        model(ids)  # fills the cache
    model.train()
    model(ids, ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        out = model(ids, return_hidden=True)
    w = model.lm_head.weight
    assert torch.allclose(out.logits, out.hidden_states @ (w / w.norm(dim=-1, keepdim=True)).T, atol=1e-5)


def test_normhead_gradient_flows_through_normalisation():
    model = make("rope").train()
    ids = torch.randint(3, 512, (2, 8))
    model(ids, ids).loss.backward()
    w, g = model.lm_head.weight, model.lm_head.weight.grad
    # d/dW of a function of W/|W| is orthogonal to W row by row
    assert torch.allclose((w * g).sum(-1), torch.zeros(w.shape[0]), atol=1e-6)


def test_max_z_loss_by_hand():
    model = make("alibi", z_loss_weight=2e-4)
    ids = torch.randint(3, 512, (2, 9))
    targets = ids.roll(-1, 1)
    targets[0, -1] = -100
    out = model(ids, targets)
    logits = out.logits.float()
    valid = targets != -100
    z = (logits.max(-1).values[valid] ** 2).mean()
    ce = F.cross_entropy(logits[valid], targets[valid])
    assert torch.allclose(out.z_loss, z) and torch.allclose(out.ce_loss, ce)
    assert torch.allclose(out.loss, ce + 2e-4 * z)


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("chunk", [0, 7])
def test_fused_loss_equals_plain_loss_and_grads(pos, chunk):
    plain, fused = make(pos, fused_loss=False), make(pos, fused_loss=True, loss_chunk_size=chunk)
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for m in (plain, fused):
            m.lm_head.weight.mul_(torch.linspace(0.5, 3.0, 512)[:, None])  # un-normalised rows
    ids = torch.randint(3, 512, (2, 20))
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    targets[1, :4] = -100
    a, b = plain.train()(ids, targets, return_logits=False), fused.train()(ids, targets, return_logits=False)
    assert b.logits is None
    (3.0 * a.loss).backward()  # a non-unit upstream gradient must scale the fused grads too
    (3.0 * b.loss).backward()
    assert torch.allclose(a.loss, b.loss, atol=1e-6)
    assert torch.allclose(a.ce_loss, b.ce_loss, atol=1e-6) and torch.allclose(a.z_loss, b.z_loss, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        # Relative to the gradient's own scale: the two paths sum in different orders, and thread counts
        # differ between machines, so elementwise atol on near-zero entries is flaky.
        rel = (p.grad - q.grad).norm() / p.grad.norm().clamp_min(1e-12)
        assert rel < 1e-4, (name, rel.item())


def test_fused_loss_under_bf16_autocast_matches_plain():
    plain, fused = make("rope", fused_loss=False), make("rope")
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 512, (2, 16))
    targets = ids.roll(-1, 1)
    losses = []
    for m in (plain.train(), fused.train()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(ids, targets, return_logits=False)
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)
    for p, q in zip(plain.parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=2e-3, rtol=5e-2)


def test_rope_tables_stay_fp32_in_bf16_model():
    model = make("rope").to(torch.bfloat16)
    ids = torch.randint(3, 512, (1, 300))
    model(ids)
    rope = model.model.rope
    assert rope._cos.dtype == torch.float32
    # positions 256 and 257 collide in bf16; in fp32 their angles differ
    assert not torch.equal(rope._cos[256], rope._cos[257])


def test_padding_row_of_embedding_is_zero_and_gets_no_grad():
    model = make("rope").train()
    assert torch.count_nonzero(model.model.embed_tokens.weight[0]) == 0
    ids = torch.tensor([[0, 5, 6, 0, 7]])
    model(ids, ids).loss.backward()
    assert torch.count_nonzero(model.model.embed_tokens.weight.grad[0]) == 0


def test_gradient_checkpointing_same_grads():
    a, b = make("rope").train(), make("rope").train()
    b.model.gradient_checkpointing = True
    ids = torch.randint(3, 512, (2, 12))
    a(ids, ids).loss.backward()
    b(ids, ids).loss.backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_attention_mask_length_mismatch_is_a_clear_error():
    model = make("rope")
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(3, 512, (1, 5)), attention_mask=torch.ones((1, 4), dtype=torch.long))


def test_ladder_names_match_their_size():
    """A preset called ladder-<N> has about N non-embedding parameters (the scaling ladder reads its names)."""
    from baichuan2.model.config import PRESETS

    units = {"k": 1e3, "m": 1e6, "b": 1e9}
    ladder = [name for name in PRESETS if name.startswith("ladder-")]
    assert len(ladder) >= 16
    for name in ladder:
        size = name.removeprefix("ladder-")
        nominal = float(size[:-1]) * units[size[-1]]
        assert 0.75 < PRESETS[name].num_params(non_embedding=True) / nominal < 1.3, name
