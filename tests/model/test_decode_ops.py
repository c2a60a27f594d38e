"""The fused CPU inference operators (RMSNorm, RoPE, SiLU(gate) * up, greedy argmax): the numbers of the modules' PyTorch
code (bit for bit where no sum or exp is involved), used only without grad, and a model running them
gives PyTorch's logits."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from baichuan2.model import Baichuan, ModelConfig, cpu_kernels
from baichuan2.model import model as model_module
from baichuan2.model.model import RMSNorm, RotaryEmbedding, apply_rope

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and shutil.which("c++") is not None
pytestmark = pytest.mark.skipif(not AVX512, reason="the fused operators need AVX-512 and a compiler")
DTYPES = [torch.float32, torch.bfloat16]


def test_the_kernel_builds_where_it_can():
    assert (cpu_kernels.load_decode_ops() is not None) == cpu_kernels.enabled()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_the_modules_computation(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(576).to(dtype)
    norm.weight.data = torch.randn(576).to(dtype)
    x = torch.randn(7, 3, 576).to(dtype) * 4
    with torch.no_grad():
        fused = norm(x)
    reference = norm(x)  # with grad: PyTorch's operators
    assert reference.requires_grad and not fused.requires_grad
    if dtype == torch.bfloat16:  # the mean of squares may differ in its last fp32 bit: invisible in bf16
        assert torch.equal(fused, reference)
    else:
        torch.testing.assert_close(fused, reference, rtol=2e-6, atol=2e-6)
    for i in range(7):  # rows alone give their own numbers
        with torch.no_grad():
            assert torch.equal(norm(x[i:i + 1]), fused[i:i + 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["qk", "grouped", "broadcast"])
def test_rope_is_apply_rope_bit_for_bit(dtype, layout):
    torch.manual_seed(1)
    rope = RotaryEmbedding(64, 256)
    if layout == "qk":  # [b, t, q|k, heads, d] with [b, t, 1, 1, d] tables (the 7B path)
        x, pos = torch.randn(2, 5, 2, 9, 64), torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
        cos, sin = rope(pos, 256, torch.device("cpu"))
    else:  # [b, t, heads, d] with [b|1, t, 1, d] tables (grouped heads; one position row for every sequence)
        x = torch.randn(3, 4, 9, 64)
        pos = torch.tensor([[5, 6, 7, 8], [0, 1, 2, 3], [200, 201, 202, 203]]) if layout == "grouped" else \
            torch.arange(4)[None]
        cos, sin = (c.squeeze(2) for c in rope(pos, 256, torch.device("cpu")))
    x = (x * 3).to(dtype)
    with torch.no_grad():
        fused = apply_rope(x, cos, sin)
    reference = apply_rope(x.requires_grad_(), cos, sin)
    assert torch.equal(fused, reference.detach())


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_silu_times_up(dtype):
    torch.manual_seed(2)
    ops = cpu_kernels.load_decode_ops()
    gate, up = (torch.randn(9, 1536) * 4).to(dtype), torch.randn(9, 1536).to(dtype)
    fused, reference = ops.silu_mul(gate, up), F.silu(gate) * up
    if dtype == torch.bfloat16:  # exp may differ in the last fp32 bit: at most one bf16 step, rarely
        diff = (fused.float() - reference.float()).abs()
        assert (diff <= reference.float().abs() * 2**-7 + 1e-30).all() and (fused != reference).float().mean() < 0.01
    else:
        torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="silu_mul"):
        ops.silu_mul(gate, up[:, :16])


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_is_torch_max_indices(dtype):
    from baichuan2.model.generate import greedy_tokens

    ops = cpu_kernels.load_decode_ops()
    torch.manual_seed(0)
    for width in (1, 5, 16, 17, 33, 49152, 125696):  # whole vectors, tails, a vocabulary
        x = torch.randn(9, width).to(dtype)
        assert torch.equal(ops.argmax_rows(x), x.max(-1).indices)
    x = torch.randn(4, 100).to(dtype)
    x[0] = float("-inf")  # nothing above -inf: the first index
    x[1, [10, 70]] = 50.0  # ties: the first of them, across and within vector lanes
    x[2, [3, 19]] = 50.0
    x[3, [20, 90]] = float("nan")  # NaN counts as the maximum (torch.max): the first NaN
    assert ops.argmax_rows(x).tolist() == x.max(-1).indices.tolist() == [0, 10, 3, 20]
    wide = torch.randn(6, 300).to(dtype)
    assert torch.equal(ops.argmax_rows(wide[:, 7:207]), wide[:, 7:207].max(-1).indices)  # row stride > width
    with torch.no_grad():
        assert torch.equal(greedy_tokens(wide[:, :250]), wide[:, :250].argmax(-1))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.argmax_rows(wide.t())
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ops.argmax_rows(torch.zeros(2, 0))


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_model_gives_pytorchs_logits_through_the_fused_operators(monkeypatch, position, dtype):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, position_embedding=position)
    model = Baichuan(cfg).to(dtype).eval()
    ids = torch.randint(3, 300, (3, 11))
    with torch.no_grad():
        fused = model(ids).logits.float()
        monkeypatch.setattr(model_module, "fused_cpu_ops", lambda x: None)
        plain = model(ids).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused, plain, atol=tol * plain.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,rotate", [(9, True), (3, True), (9, False)])
def test_rope_append_rotates_q_and_writes_k_v_at_each_rows_position(dtype, kv_heads, rotate):
    ops = cpu_kernels.load_decode_ops()
    torch.manual_seed(3)
    rows, heads, d, length = 5, 9, 64, 40
    wide = (torch.randn(rows, (heads + 2 * kv_heads) * d + 10) * 3).to(dtype)
    qkv = wide[:, 3:3 + (heads + 2 * kv_heads) * d]  # rows strided, as a view of a wider buffer
    keys, values = torch.randn(rows + 2, kv_heads, length, d).to(dtype), torch.randn(rows + 2, kv_heads, length, d).to(dtype)
    before_k, before_v = keys.clone(), values.clone()
    starts = torch.tensor([0, 7, 39, 12, 3])
    cos, sin = RotaryEmbedding(d, 64)(starts[:, None], 64, torch.device("cpu"))
    cos, sin = (c.reshape(rows, d) for c in (cos, sin)) if rotate else (torch.empty(0), torch.empty(0))
    q = ops.rope_append(qkv, cos, sin, keys, values, starts, heads)
    split = qkv.unflatten(-1, (-1, d)).split((heads, kv_heads, kv_heads), dim=1)  # [rows, n, d] each
    if rotate:  # the same numbers as apply_rope (bit for bit)
        want_q, want_k = (apply_rope(x[:, None], cos[:, None, None], sin[:, None, None])[:, 0] for x in split[:2])
    else:
        want_q, want_k = split[0], split[1]
    assert torch.equal(q, want_q)
    for r, s in enumerate(starts.tolist()):
        assert torch.equal(keys[r, :, s], want_k[r]) and torch.equal(values[r, :, s], split[2][r])
        keys[r, :, s], values[r, :, s] = before_k[r, :, s], before_v[r, :, s]
    assert torch.equal(keys, before_k) and torch.equal(values, before_v)  # nothing else was touched
    with pytest.raises(RuntimeError, match="position out of range"):
        ops.rope_append(qkv, cos, sin, keys, values, torch.tensor([0, 0, 40, 0, 0]), heads)
    with pytest.raises(RuntimeError, match="qkv must be"):
        ops.rope_append(qkv[:, :-64], cos, sin, keys, values, starts, heads)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.rope_append(qkv, cos, sin, keys.transpose(1, 2), values, starts, heads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_adds_in_place_then_normalises(dtype):
    ops = cpu_kernels.load_decode_ops()
    torch.manual_seed(4)
    norm = RMSNorm(576).to(dtype)
    norm.weight.data = torch.randn(576).to(dtype)
    x, y = (torch.randn(7, 576) * 4).to(dtype), torch.randn(7, 600).to(dtype)[:, 10:586]
    want_sum = x + y
    out = ops.add_rms_norm(x, y, norm.weight, norm.eps)
    assert torch.equal(x, want_sum)  # x + y, rounded as PyTorch rounds it, written into x
    with torch.no_grad():
        assert torch.equal(out, norm(want_sum))  # the fused RMSNorm's numbers
    with pytest.raises(RuntimeError, match="add_rms_norm"):
        ops.add_rms_norm(x, y[:, :560], norm.weight, norm.eps)


@pytest.mark.parametrize("position,groups", [("rope", 1), ("rope", 2), ("alibi", 1), ("alibi", 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fused_decoding_step_is_the_layers_step_bit_for_bit(monkeypatch, position, groups, dtype):
    """`BaichuanModel._decode_step` (one kernel call between the matmuls) against the modules' own forward:
    the same logits and the same keys/values in the cache, for RoPE and ALiBi, repeated K/V heads
    (a grouped cache), fp32 and bf16, rows of different lengths."""
    from baichuan2.model.model import SlotKVCache, kv_head_groups, prepack_for_inference

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, position_embedding=position)
    model = Baichuan(cfg).to(dtype).eval()
    h, d = cfg.hidden_size, cfg.head_dim
    for layer in model.model.layers:  # heads 2j and 2j+1 share their key/value projections
        kv = layer.self_attn.W_pack.weight.data[h:].view(2, cfg.num_attention_heads // groups, groups, d, h)
        kv[:, :, 1:] = kv[:, :, :1]
    assert kv_head_groups(model) == groups
    prepack_for_inference(model)
    prompts = [[5, 9, 13], list(range(20, 37)), [7] * 9]
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(model_module.BaichuanModel, "_fused_decode_ops", lambda self, x, cache: None)
        calls = []
        monkeypatch.setattr(model_module.BaichuanModel, "_decode_step",
                            lambda self, *a, _f=model_module.BaichuanModel._decode_step: calls.append(1) or _f(self, *a))
        cache = SlotKVCache.for_model(model, 3, 64, kv_groups=groups)
        assert cache.dtype == dtype
        with torch.no_grad():
            for row, p in enumerate(prompts):
                cache.select(row + 1)
                cache.lengths[row] = 0
                single = SlotKVCache.for_model(model, 1, 64, kv_groups=groups)
                single.select(1)
                model(torch.tensor([p]), cache=single)
                cache.load(row, [k[0, :, :len(p)] for k in single.keys], [v[0, :, :len(p)] for v in single.values])
            cache.select(3)
            ids, logits = torch.tensor([[p[-1]] for p in prompts]), []
            for _ in range(4):
                logits.append(model(ids, cache=cache).logits[:, -1])
                ids = logits[-1].argmax(-1, keepdim=True)
        assert bool(calls) == fused
        runs.append((torch.stack(logits), [k[:, :, :25] for k in cache.keys], [v[:, :, :25] for v in cache.values]))
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1] + runs[0][2], runs[1][1] + runs[1][2]):
        assert torch.equal(a, b)
