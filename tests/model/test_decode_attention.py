"""The CPU decode-attention kernel (one new token per row over a slot KV cache): equal to softmax attention
computed in float64 over each row's own keys, for fp32 and bf16 caches, grouped heads and ALiBi; blind to
whatever lies past a row's length; a row's output its own whatever else is in the batch; and a model
decoding through it gives what SDPA gives."""

import math
import shutil

import pytest
import torch

from baichuan2.model import Baichuan, ModelConfig, cpu_kernels
from baichuan2.model import model as model_module
from baichuan2.model.model import SlotKVCache, alibi_slopes

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and shutil.which("c++") is not None
needs_kernel = pytest.mark.skipif(not AVX512, reason="the decode-attention kernel needs AVX-512 and a compiler")


def test_the_kernel_builds_where_it_can():
    if AVX512 and cpu_kernels.enabled():
        assert cpu_kernels.load_decode_attention() is not None
    else:
        assert cpu_kernels.load_decode_attention() is None


def _reference(q, k, v, lengths, slopes):
    """float64 softmax(q k^T / sqrt(d) + alibi) v per row over its own first lengths[r] keys."""
    b, heads, _, d = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros(b, heads, 1, d, dtype=torch.float64)
    for r in range(b):
        n = int(lengths[r])
        for h in range(heads):
            keys, values = k[r, h // groups, :n].double(), v[r, h // groups, :n].double()
            s = keys @ q[r, h, 0].double() / math.sqrt(d)
            if slopes is not None:
                s = s + slopes[h].double() * (torch.arange(n, dtype=torch.float64) - (n - 1))
            out[r, h, 0] = torch.softmax(s, 0) @ values
    return out


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,heads,kv_heads", [(64, 9, 3), (128, 4, 4), (80, 6, 2), (64, 40, 40), (64, 8, 1), (128, 10, 2),
                                               (256, 4, 2), (16, 6, 1)])
@pytest.mark.parametrize("alibi", [False, True])
def test_equals_float64_softmax_over_each_rows_own_keys(dtype, d, heads, kv_heads, alibi):
    kernel = cpu_kernels.load_decode_attention()
    torch.manual_seed(d + heads + alibi)
    lengths = torch.tensor([1, 17, 33, 150, 299, 300])
    b, max_len = len(lengths), 320
    cache_k = torch.randn(b, kv_heads, max_len, d).to(dtype)
    cache_v = torch.randn(b, kv_heads, max_len, d).to(dtype)
    for r, n in enumerate(lengths):  # garbage past each row's end must never be read
        cache_k[r, :, n:] = float("nan")
        cache_v[r, :, n:] = float("inf")
    k, v = cache_k[:, :, :300], cache_v[:, :, :300]  # views with the cache's strides, as SlotKVCache hands over
    q = (torch.randn(b, 1, heads, d) * 3).to(dtype).transpose(1, 2)  # [b, heads, 1, d], non-contiguous
    slopes = torch.tensor(alibi_slopes(heads)) if alibi else None
    out = kernel(q, k, v, lengths, slopes if alibi else torch.empty(0), 1 / math.sqrt(d)).transpose(1, 2)
    assert out.shape == (b, heads, 1, d) and out.dtype == torch.float32
    ref = _reference(q, k, v, lengths, slopes)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    for r in range(b):  # a row's output is its own: alone it gets the same numbers, bit for bit
        alone = kernel(q[r:r + 1], k[r:r + 1], v[r:r + 1], lengths[r:r + 1], slopes if alibi else torch.empty(0),
                       1 / math.sqrt(d))
        assert torch.equal(alone.transpose(1, 2)[0], out[r])


@needs_kernel
def test_bad_arguments_are_refused_not_read_out_of_bounds():
    kernel = cpu_kernels.load_decode_attention()
    q, k = torch.randn(2, 4, 1, 64), torch.randn(2, 4, 10, 64)
    with pytest.raises(RuntimeError, match="row length"):
        kernel(q, k, k, torch.tensor([3, 11]), torch.empty(0), 0.125)
    with pytest.raises(RuntimeError, match="head_dim"):
        kernel(torch.randn(2, 4, 1, 40), torch.randn(2, 4, 10, 40), torch.randn(2, 4, 10, 40), torch.tensor([3, 4]),
               torch.empty(0), 0.125)
    with pytest.raises(RuntimeError, match="groups"):
        kernel(torch.randn(2, 5, 1, 64), k, k, torch.tensor([3, 4]), torch.empty(0), 0.125)


def _decode(model: Baichuan, prompts: list[list[int]], steps: int) -> torch.Tensor:
    """Greedy steps of all prompts together over a SlotKVCache; returns the last step's logits."""
    cache = SlotKVCache.for_model(model, len(prompts), 64)
    for row, p in enumerate(prompts):  # each prompt prefilled alone into its own row
        cache.select(row + 1)
        cache.lengths[row] = 0
        single = SlotKVCache.for_model(model, 1, 64)
        single.select(1)
        model(torch.tensor([p]), cache=single)
        cache.load(row, [k[0, :, :len(p)] for k in single.keys], [v[0, :, :len(p)] for v in single.values])
    cache.select(len(prompts))
    ids = torch.tensor([[p[-1]] for p in prompts])
    for _ in range(steps):
        logits = model(ids, cache=cache, last_only=True).logits[:, -1]
        ids = logits.argmax(-1, keepdim=True)
    return logits


@needs_kernel
@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_decodes_through_the_kernel_as_through_sdpa(monkeypatch, position, dtype):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, position_embedding=position)
    model = Baichuan(cfg).to(dtype).eval()
    prompts = [[5, 9, 13], list(range(20, 37)), [7] * 9]
    with torch.inference_mode():
        fast = _decode(model, prompts, 4)
        if dtype == torch.bfloat16:  # the kernel reads bf16 keys/values: the cache keeps the model's dtype
            assert SlotKVCache.for_model(model, 1, 8).dtype == torch.bfloat16
        monkeypatch.setattr(model_module, "_decode_kernel", lambda head_dim: None)
        assert SlotKVCache.for_model(model, 1, 8).dtype == torch.float32
        slow = _decode(model, prompts, 4)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(fast.float(), slow.float(), atol=tol * slow.abs().max().item(), rtol=0)
