"""The hand-written GEMM kernels (AVX-512 VNNI int8 and int4, AVX-512 fp32, AMX bf16). The int8/int4 ones: exact against a reference that quantises the
activations the same way, within 1% of the dequantised weights' exact product, the same numbers for a
row whatever else is in the batch, never under autograd, and replaced by PyTorch's kernels when they
are switched off."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from baichuan2.model import cpu_kernels
from baichuan2.model.quant import Int4Linear, Int8Linear, unpack_nibbles

AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and shutil.which("c++") is not None
CPUINFO = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
VNNI = AVX512 and "avx512_vnni" in CPUINFO
AMX = AVX512 and "amx_bf16" in CPUINFO and "avx512_bf16" in CPUINFO


def test_the_kernel_builds_where_it_can():
    # a machine with AVX-512 and a compiler (CI's) must get the fast kernel, not the quiet fallback
    for load, can in ((cpu_kernels.load_int8_gemv, VNNI), (cpu_kernels.load_int4_gemv, VNNI),
                      (cpu_kernels.load_bf16_gemm, AMX), (cpu_kernels.load_fp32_gemm, AVX512)):
        if can and cpu_kernels.enabled():
            assert load() is not None
        else:
            assert load() is None


def _quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels do to activations (as llama.cpp's Q8_0): int8 codes and one scale per 32 inputs."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return torch.round(blocks * inv[..., None]).clamp(-128, 127).double(), (amax / 127).double()


def _int8_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    xq, sx = _quantized_activations(x)
    q = layer.qweight.double().reshape(layer.out_features, -1, 32)
    return torch.einsum("mbk,nbk,mb->mn", xq, q, sx) * layer.scales.double()[None]


def _int4_reference(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    xq, sx = _quantized_activations(x)
    k, g = layer.in_features, layer.group_size
    q = unpack_nibbles(layer.qweight).double().reshape(layer.out_features, -1, 32) - 8  # centred codes
    scales = layer.scales.half().double().repeat_interleave(g // 32, dim=1)  # fp16, one per 32-input block
    main = torch.einsum("mbk,nbk,mb,nb->mn", xq, q, sx, scales)
    offsets = (layer.mins.float() + 8 * layer.scales.float()).half().double()
    return main + x.double().reshape(x.shape[0], k // g, g).sum(-1) @ offsets.t()


def _check_against_reference(layer, reference, row_counts) -> None:
    """Equal to ``reference`` (same activation quantisation) to 1e-5, within 1% of the dequantised weights'
    exact product, and every row's output the same alone as in the batch."""
    exact = layer.dequantize().double()
    for rows in row_counts:
        x = torch.randn(rows, layer.in_features)
        out = layer(x)
        ref = reference(layer, x)
        assert out.shape == (rows, layer.out_features) and out.dtype == torch.float32
        assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        full = x.double() @ exact.t()  # int8 activations cost well under 1% of the exact product
        assert (out.double() - full).norm() / full.norm() < 1e-2
        for i in range(rows):  # continuous batching relies on this: a row's output is its own
            assert torch.equal(layer(x[i:i + 1])[0], out[i])


@pytest.mark.skipif(not VNNI, reason="the int8 kernel needs an AVX-512 VNNI CPU")
@pytest.mark.parametrize("k,n", [(32, 4), (576, 192), (1216, 3648), (3264, 1216)])
def test_int8_kernel_equals_its_reference_and_rows_do_not_interact(k, n):
    torch.manual_seed(k + n)
    _check_against_reference(Int8Linear.from_weight(torch.randn(n, k)), _int8_reference, (1, 2, 3, 4, 5, 8, 9, 16))


@pytest.mark.skipif(not VNNI, reason="the int8 kernel needs an AVX-512 VNNI CPU")
def test_bad_arguments_are_refused():
    gemv = cpu_kernels.load_int8_gemv()
    q, s = torch.zeros(1, 1, 4, 32, dtype=torch.uint8), torch.ones(4)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        gemv(torch.zeros(1, 32), q, torch.ones(8))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        gemv(torch.zeros(1, 48), q, s)
    with pytest.raises(RuntimeError, match="fp32"):
        gemv(torch.zeros(1, 32, dtype=torch.bfloat16), q, s)
    with pytest.raises(RuntimeError, match="contiguous"):
        gemv(torch.zeros(32, 2).t(), q, s)


def _spy_on(monkeypatch, kernel: str) -> tuple[list, object]:
    """(the input shapes each call of ``kernel`` gets, the real kernel or None where it is not built)."""
    calls: list = []
    real = getattr(cpu_kernels, f"load_{kernel}")()
    if real is not None:
        monkeypatch.setitem(cpu_kernels._state, kernel, lambda *a: calls.append(a[0].shape) or real(*a))
    return calls, real


def test_int8_linear_runs_every_row_count_on_the_kernel_in_chunks(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    layer = Int8Linear.from_weight(w)
    calls, real = _spy_on(monkeypatch, "int8_gemv")
    exact = lambda x: F.linear(x, layer.dequantize())  # noqa: E731
    small, large = torch.randn(2, 3, 128), torch.randn(1, 600, 128)
    out_small, out_large = layer(small), layer(large)
    if real is not None:
        assert calls == [(6, 128), (256, 128), (256, 128), (88, 128)]  # a long prompt goes in 256-row chunks
        ref = _int8_reference(layer, small.reshape(6, 128)).reshape(2, 3, 96)
        assert torch.allclose(out_small.double(), ref, atol=1e-5 * ref.abs().max().item())
        assert torch.equal(out_large[0, 300], layer(large[:, 300:301])[0, 0])  # chunking changes nothing
    ref = exact(large)
    assert torch.allclose(out_large, ref, atol=ref.abs().max().item() * 2**-5, rtol=0)
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
    slow = layer(x)  # bf16 activations there, int8 blocks here: close, not equal
    assert torch.allclose(fast, slow, atol=fast.abs().max().item() * 2**-5, rtol=0)


@pytest.mark.skipif(not VNNI, reason="the int4 kernel needs an AVX-512 VNNI CPU")
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("k,n", [(256, 16), (768, 48), (1536, 80)])
def test_int4_kernel_equals_its_reference_and_rows_do_not_interact(group, k, n):
    torch.manual_seed(k + n + group)
    _check_against_reference(Int4Linear.from_weight(torch.randn(n, k), group, search=False), _int4_reference,
                             (1, 2, 3, 4, 5, 8, 16))


@pytest.mark.skipif(not VNNI, reason="the int4 kernel needs an AVX-512 VNNI CPU")
def test_int4_kernel_refuses_bad_arguments():
    gemv = cpu_kernels.load_int4_gemv()
    q, s, mins = torch.zeros(1, 1, 4, 32, dtype=torch.uint8), torch.ones(1, 2, 4).half(), torch.ones(4, 2).half()
    with pytest.raises(RuntimeError, match="shapes do not match"):
        gemv(torch.zeros(1, 64), q, s, torch.ones(4, 3).half(), 32)
    with pytest.raises(RuntimeError, match="fp16"):
        gemv(torch.zeros(1, 64), q, s.float(), mins, 32)
    with pytest.raises(RuntimeError, match="group size"):
        gemv(torch.zeros(1, 64), q, s, mins, 48)
    with pytest.raises(RuntimeError, match="fp32"):
        gemv(torch.zeros(1, 64, dtype=torch.bfloat16), q, s, mins, 32)


def test_int4_linear_runs_on_the_kernel_and_never_builds_pytorchs_packing(monkeypatch):
    torch.manual_seed(2)
    layer = Int4Linear.from_weight(torch.randn(64, 256), 32)
    calls, real = _spy_on(monkeypatch, "int4_gemv")
    exact = lambda x: F.linear(x, layer.dequantize())  # noqa: E731
    small, large = torch.randn(2, 3, 256), torch.randn(1, 40, 256)
    out_small, out_large = layer(small), layer(large)
    if real is not None:
        assert calls == [(6, 256), (40, 256)]
        assert "torch" not in layer._kernel[1]  # no second packed copy of the weights
        ref = _int4_reference(layer, small.reshape(6, 256)).reshape(2, 3, 64)
        assert torch.allclose(out_small.double(), ref, atol=1e-5 * ref.abs().max().item())
    ref = exact(large)
    assert torch.allclose(out_large, ref, atol=ref.abs().max().item() * 2**-5, rtol=0)
    # scales fp16 cannot hold: that layer keeps PyTorch's kernel, with the right numbers
    huge = Int4Linear.from_weight(torch.randn(64, 256) * 1e6, 32)
    assert huge._gemv_weights() is None
    ref = F.linear(small, huge.dequantize())
    assert torch.allclose(huge(small), ref, atol=ref.abs().max().item() * 2**-5, rtol=0)
    calls.clear()
    with torch.enable_grad():
        out = layer(small.clone().requires_grad_())
    assert calls == [] and out.requires_grad
    monkeypatch.setenv("BAICHUAN2_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    slow = layer(small)  # PyTorch's kernel: bf16 activations, so close, not equal
    assert torch.allclose(out_small, slow, atol=out_small.abs().max().item() * 2**-5, rtol=0)


@pytest.mark.skipif(not AVX512, reason="the fp32 kernel needs AVX-512 and a compiler")
@pytest.mark.parametrize("n,k", [(1, 16), (47, 33), (48, 576), (100, 64), (1536, 576)])
def test_fp32_gemm_equals_float64_and_rows_do_not_interact(n, k):
    from baichuan2.model.model import PrepackedWeight

    torch.manual_seed(n + k)
    w, bias = torch.randn(n, k), torch.randn(n)
    packed = PrepackedWeight()
    wide = torch.randn(64, k + 7)  # rows further apart than k: the kernel reads x through its row stride
    for rows in (1, 3, 8, 9, 16, 17, 64):
        x = wide[:rows, 3:3 + k]
        y = packed.linear(x, w, bias=bias)
        assert packed.gemm is cpu_kernels.load_fp32_gemm() is not None  # fp32 weights go to our kernel
        ref = x.double() @ w.double().t() + bias.double()
        assert y.shape == (rows, n) and torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * k ** 0.5)
        for i in range(rows):  # continuous batching relies on this: a row's output is its own
            assert torch.equal(packed.linear(x[i:i + 1], w, bias=bias)[0], y[i])
    y3 = packed.linear(wide[:6, :k].reshape(2, 3, k), w)  # [batch, tokens, k] as the model calls it
    assert torch.equal(y3.reshape(6, n), packed.linear(wide[:6, :k], w))
    assert packed.linear(torch.randn(2, k).bfloat16(), w.bfloat16()).shape == (2, n)
    assert packed.gemm is cpu_kernels.load_bf16_gemm()  # bf16 weights: our AMX kernel where it runs, else oneDNN


@pytest.mark.skipif(not AMX, reason="the bf16 kernel needs AMX-BF16 and a compiler")
@pytest.mark.parametrize("n,k", [(1, 16), (47, 33), (32, 576), (100, 64), (1536, 576), (576, 1536)])
def test_bf16_gemm_is_the_exact_product_rounded_once_and_rows_do_not_interact(n, k):
    from baichuan2.model.model import PrepackedWeight

    torch.manual_seed(n + k)
    w = torch.randn(n, k).bfloat16()
    packed = PrepackedWeight()
    wide = torch.randn(300, k + 7).bfloat16()  # rows further apart than k: a strided x is copied, not misread
    for rows in (1, 3, 16, 17, 32, 33, 64, 300):
        for x in (wide[:rows, 3:3 + k], wide[:rows, :k].contiguous()):
            y = packed.linear(x, w)
            assert packed.gemm is cpu_kernels.load_bf16_gemm() is not None
            # products of bf16 numbers are exact in fp32; the fp32 sums differ from float64 by far less
            # than the final rounding to bf16 (2^-8 relative)
            ref = x.double() @ w.double().t()
            assert y.shape == (rows, n) and y.dtype == torch.bfloat16
            assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-4 * k ** 0.5).all()
            for i in (0, rows // 2, rows - 1):  # a row's output is its own, whatever else is in the call
                assert torch.equal(packed.linear(x[i:i + 1], w)[0], y[i])
    big = torch.randn(600, k).bfloat16()  # over 256 rows: swept in 256-row chunks, the same numbers
    assert torch.equal(packed.linear(big, w)[300:310], packed.linear(big[300:310], w))
    assert packed.linear(torch.zeros(0, k).bfloat16(), w).shape == (0, n)


@pytest.mark.skipif(not AMX, reason="the bf16 kernel needs AMX-BF16 and a compiler")
def test_bf16_gemm_refuses_bad_arguments():
    gemm = cpu_kernels.load_bf16_gemm()
    packed = torch.zeros(1, 2, 2, 16, 16, 2, dtype=torch.bfloat16)  # N <= 32, K in 33..64
    assert gemm(torch.ones(2, 64, dtype=torch.bfloat16), packed, 5).shape == (2, 5)
    with pytest.raises(RuntimeError, match="x must be bf16"):
        gemm(torch.ones(2, 64), packed, 5)
    with pytest.raises(RuntimeError, match="does not match"):
        gemm(torch.ones(2, 96, dtype=torch.bfloat16), packed, 5)  # K too large for the packed weight
    with pytest.raises(RuntimeError, match="does not match"):
        gemm(torch.ones(2, 64, dtype=torch.bfloat16), packed, 40)  # N too large


def test_one_kernel_can_be_switched_off_by_name(monkeypatch):
    monkeypatch.setenv("BAICHUAN2_CPU_KERNELS_OFF", "bf16_gemm, fp32_gemm")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.load_bf16_gemm() is None and cpu_kernels.load_fp32_gemm() is None
    assert (cpu_kernels.load_decode_ops() is not None) == AVX512  # the others stay on
