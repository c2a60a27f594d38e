"""Hand-written CPU kernels, compiled on first use and cached (``torch.utils.cpp_extension``).

Only where measured faster than what PyTorch ships (``benchmarks/quant_decode.py``):

* ``int8_gemv``: a weight-only int8 matrix against int8-quantised activations with VNNI dot products
  (as llama.cpp's Q8_0), in place of ``torch._weight_int8pack_mm``;
* ``int4_gemv``: a group-wise int4 matrix against int8-quantised activations with VNNI dot products
  (as llama.cpp's Q4_0), in place of ``torch._weight_int4pack_mm_for_cpu``;
* ``fp32_gemm``: fp32 activations times an fp32 weight packed in 48-column panels, in place of oneDNN's
  packed inner product (1.4-1.6x faster on one core at 16-64 rows, weights read from memory);
* ``bf16_gemm``: bf16 activations times a bf16 weight packed for Intel AMX tiles, in place of oneDNN's packed
  inner product (1.1-2.3x on one core at 1-64 rows, weights read from memory; needs AMX-BF16);
* ``decode_ops``: RMSNorm, RoPE and SiLU(gate) * up, each one pass in place of PyTorch's 4-8 operators;
* ``decode_attention``: one new token per sequence over a slot KV cache (continuous-batching decode),
  each row reading only its own keys, in the cache's dtype (fp32 or bf16), in place of SDPA.

Every kernel releases the GIL while it runs, as PyTorch's own operators do: the server's event loop (HTTP,
detokenisation) then runs on the other core meanwhile instead of queueing behind the scheduler thread.

Every kernel has a PyTorch fallback: no AVX-512 (``torch.backends.cpu.get_cpu_capability()``), no
compiler, a failed build, ``BAICHUAN2_CPU_KERNELS=0`` (all of them) or ``BAICHUAN2_CPU_KERNELS_OFF=name,...``
(those named: to compare, or to rule one out) give ``None`` from the ``load_*()`` functions and the caller
uses its PyTorch path. Each build (~30 s, once per machine and source version) goes to
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); concurrent builders wait on
its file lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import torch

_KERNELS = Path(__file__).parent / "kernels"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"]  # OpenMP: at::parallel_for threads
# checked at run time by each module's supported()
_EXTRA_FLAGS = {"int4_gemv": ["-mavx512vnni", "-mfma", "-mf16c"], "int8_gemv": ["-mavx512vnni", "-mfma"],
                "decode_ops": ["-ffp-contract=off"], "bf16_gemm": ["-mamx-tile", "-mamx-bf16", "-mavx512bf16"]}  # products rounded before sums, as PyTorch's operators
_lock = threading.Lock()
_state: dict[str, Any] = {}
log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("BAICHUAN2_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _why_not(kernel: str) -> str | None:
    if not enabled():
        return "BAICHUAN2_CPU_KERNELS=0"
    if kernel in {k.strip() for k in os.environ.get("BAICHUAN2_CPU_KERNELS_OFF", "").split(",")}:
        return "named in BAICHUAN2_CPU_KERNELS_OFF"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX512)"
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler"
    return None


def load_int8_gemv() -> Any | None:
    """The compiled ``int8_gemv(x fp32 [M,K], codes, scales fp32 [N]) -> fp32 [M,N]`` (codes in the kernel's
    own layout: see ``kernels/int8_gemv.cpp`` and ``quant.Int8Linear``), or None; needs AVX512-VNNI."""
    return _load("int8_gemv")


def load_int4_gemv() -> Any | None:
    """The compiled ``int4_gemv(x fp32 [M,K], codes, scales, mins, G) -> fp32 [M,N]`` (weights in the
    kernel's own layout: see ``kernels/int4_gemv.cpp`` and ``quant.Int4Linear``), or None; needs
    AVX512-VNNI besides AVX-512."""
    return _load("int4_gemv")


def load_fp32_gemm() -> Any | None:
    """The compiled ``fp32_gemm(x fp32 [M,K], packed fp32 [ceil(N/48),K,48], N) -> fp32 [M,N]`` (see
    ``kernels/fp32_gemm.cpp`` and ``model.PrepackedWeight``), or None."""
    return _load("fp32_gemm")


def load_bf16_gemm() -> Any | None:
    """The compiled ``bf16_gemm(x bf16 [M,K], packed bf16 [ceil(N/32),ceil(K/32),2,16,16,2], N) -> bf16 [M,N]``
    (see ``kernels/bf16_gemm.cpp`` and ``model.PrepackedWeight``), or None; needs AMX-BF16."""
    return _load("bf16_gemm")


def load_decode_ops() -> Any | None:
    """The compiled module with ``rms_norm(x, w, eps)``, ``rope(x [b,t,n,d], cos, sin [b,t,d])`` and
    ``silu_mul(gate, up)`` (see ``kernels/decode_ops.cpp``), or None."""
    return _load("decode_ops")


def load_decode_attention() -> Any | None:
    """The compiled ``decode_attention(q [b,H,1,D], k, v [b,KVH,>=L,D], lengths int64 [b], slopes fp32 [H] or
    empty, scale) -> fp32 [b,1,H,D]`` (see ``kernels/decode_attention.cpp``), or None."""
    return _load("decode_attention")


def _load(kernel: str) -> Any | None:
    if (fn := _state.get(kernel, _state)) is not _state:  # built (or refused) already: one dict lookup
        return fn
    with _lock:
        if kernel not in _state:
            _state[kernel] = _build(kernel)
    return _state[kernel]


def _build(kernel: str) -> Any | None:
    reason = _why_not(kernel)
    if reason is None:
        source = _KERNELS / f"{kernel}.cpp"
        flags = _FLAGS + _EXTRA_FLAGS.get(kernel, [])
        headers = b"".join(h.read_bytes() for h in sorted(_KERNELS.glob("*.h")))  # what the sources include
        digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode()).hexdigest()[:12]
        name = f"baichuan2_{kernel}_{digest}"
        try:
            from torch.utils import cpp_extension

            if not _built(cpp_extension, name):
                print(f"baichuan2: compiling the {kernel} CPU kernel (once per machine, ~30 s) ...", file=sys.stderr,
                      flush=True)
            module = cpp_extension.load(name, [str(source)], extra_cflags=flags, extra_include_paths=[str(_KERNELS)],
                                        verbose=False)
            if not module.supported():
                needs = " ".join(_EXTRA_FLAGS.get(kernel, ["-mavx512bw"]))
                reason = f"this CPU lacks an instruction set it needs ({needs})"
            else:
                return getattr(module, kernel, module)  # one function, or a module of several
        except Exception as exc:  # any build problem: the PyTorch kernel is correct, only slower
            reason = f"build failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
    log.info("%s CPU kernel not used (%s); using PyTorch's kernel", kernel, reason)
    return None


def _built(cpp_extension: Any, name: str) -> bool:
    root = Path(cpp_extension._get_build_directory(name, verbose=False))
    return any(root.glob(f"{name}*.so"))
