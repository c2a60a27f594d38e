"""Hand-written CPU kernels, compiled on first use and cached (``torch.utils.cpp_extension``).

Only where measured faster than what PyTorch ships: ``int8_gemv`` multiplies a weight-only int8
matrix by up to ``INT8_GEMV_MAX_ROWS`` fp32 activation rows (batch-1..16 decoding) -- on the
2-core AVX-512 machine the whole ``ladder-500m`` int8 batch-1 decode runs ~1.4x faster with it than with
``torch._weight_int8pack_mm`` (1.63x -> 2.27x fp32's speed, ``benchmarks/quant_decode.py``). Every kernel has a PyTorch
fallback: no AVX-512 (``torch.backends.cpu.get_cpu_capability()``), no compiler, a failed build,
or ``BAICHUAN2_CPU_KERNELS=0`` give ``None`` from ``load_int8_gemv()`` and the caller uses its
PyTorch path. The build (~30 s, once per machine and source version) goes to
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

INT8_GEMV_MAX_ROWS = 16  # above this the weights are re-read per 4 rows; PyTorch's kernel is as good
_SOURCE = Path(__file__).parent / "kernels" / "int8_gemv.cpp"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-fopenmp"]  # OpenMP: at::parallel_for threads
_lock = threading.Lock()
_state: dict[str, Any] = {}
log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("BAICHUAN2_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _why_not() -> str | None:
    if not enabled():
        return "BAICHUAN2_CPU_KERNELS=0"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"CPU capability {torch.backends.cpu.get_cpu_capability()} (needs AVX512)"
    if not (shutil.which("c++") or shutil.which("g++")):
        return "no C++ compiler"
    return None


def load_int8_gemv() -> Any | None:
    """The compiled ``int8_gemv(x fp32 [M,K], q int8 [N,K], s fp32 [N]) -> fp32 [M,N]``, or None."""
    if "int8_gemv" in _state:
        return _state["int8_gemv"]
    with _lock:
        if "int8_gemv" not in _state:
            _state["int8_gemv"] = _build()
    return _state["int8_gemv"]


def _build() -> Any | None:
    reason = _why_not()
    if reason is None:
        digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:12]
        name = f"baichuan2_int8_gemv_{digest}"
        try:
            from torch.utils import cpp_extension

            if not _built(cpp_extension, name):
                print("baichuan2: compiling the int8 CPU kernel (once per machine, ~30 s) ...", file=sys.stderr,
                      flush=True)
            return cpp_extension.load(name, [str(_SOURCE)], extra_cflags=_FLAGS, verbose=False).int8_gemv
        except Exception as exc:  # any build problem: the PyTorch kernel is correct, only slower
            reason = f"build failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
    log.info("int8 CPU kernel not used (%s); using torch._weight_int8pack_mm", reason)
    return None


def _built(cpp_extension: Any, name: str) -> bool:
    root = Path(cpp_extension._get_build_directory(name, verbose=False))
    return any(root.glob(f"{name}*.so"))
