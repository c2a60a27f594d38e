"""The hand-written AVX-512 int8 kernel: exact against a float reference, used for decoding-sized
inputs only, never under autograd, and replaced by PyTorch's kernel when it is switched off."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from baichuan2.model import cpu_kernels
from baichuan2.model.quant import Int8Linear

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and shutil.which("c++") is not None


def test_the_kernel_builds_where_it_can():
    # a machine with AVX-512 and a compiler (CI's) must get the fast kernel, not the quiet fallback
    if AVX512 and cpu_kernels.enabled():
        assert cpu_kernels.load_int8_gemv() is not None
    else:
        assert cpu_kernels.load_int8_gemv() is None


@pytest.mark.skipif(not AVX512, reason="the int8 kernel needs an AVX-512 CPU")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("k,n", [(16, 8), (17, 1), (130, 9), (1216, 131), (3264, 64)])
def test_kernel_equals_the_float_reference(rows, k, n):
    gemv = cpu_kernels.load_int8_gemv()
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) + 0.01
    x = torch.randn(rows, k, generator=g)
    ref = (x.double() @ q.double().t()) * s.double()
    out = gemv(x, q, s)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.skipif(not AVX512, reason="the int8 kernel needs an AVX-512 CPU")
def test_bad_arguments_are_refused():
    gemv = cpu_kernels.load_int8_gemv()
    q, s = torch.zeros(4, 16, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        gemv(torch.zeros(1, 15), torch.zeros(4, 15, dtype=torch.int8), torch.ones(5))
    with pytest.raises(RuntimeError, match="fp32"):
        gemv(torch.zeros(1, 16, dtype=torch.bfloat16), q, s)
    with pytest.raises(RuntimeError, match="contiguous"):
        gemv(torch.zeros(16, 2).t(), q, s)


def test_int8_linear_decodes_with_the_kernel_and_prefills_with_pytorchs(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    layer = Int8Linear.from_weight(w)
    calls = []
    real = cpu_kernels.load_int8_gemv()
    if real is not None:
        monkeypatch.setitem(cpu_kernels._state, "int8_gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    exact = lambda x: F.linear(x, layer.dequantize())  # noqa: E731
    small, large = torch.randn(2, 3, 128), torch.randn(1, 40, 128)
    out_small, out_large = layer(small), layer(large)
    if real is not None:
        assert calls == [(6, 128)]  # 6 rows: the kernel; 40 rows: torch._weight_int8pack_mm
        assert torch.allclose(out_small, exact(small), atol=1e-5)  # fp32 activations: no bf16 rounding
    ref = exact(large.bfloat16().float())
    assert torch.allclose(out_large, ref, atol=ref.abs().max().item() * 2**-7, rtol=0)
    calls.clear()
    with torch.enable_grad():
        # under autograd the kernel is not used: an output silently cut off from the graph would be
        # worse than PyTorch's own op, which autograd records (and says it has no derivative)
        out = layer(small.clone().requires_grad_())
    assert calls == [] and out.requires_grad


def test_switched_off_gives_the_pytorch_kernel_and_the_same_numbers(monkeypatch):
    torch.manual_seed(1)
    layer = Int8Linear.from_weight(torch.randn(64, 256))
    x = torch.randn(1, 1, 256)
    fast = layer(x)
    monkeypatch.setenv("BAICHUAN2_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.load_int8_gemv() is None
    slow = layer(x)
    assert torch.allclose(fast, slow, atol=fast.abs().max().item() * 2**-7, rtol=0)
