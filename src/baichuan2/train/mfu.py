"""Model FLOPs utilisation: FLOPs the model needs / FLOPs the hardware could do.

Model FLOPs per token come from ``ModelConfig.flops_per_token`` (6 x matmul
weights + 12 x layers x hidden x seq_len; recomputation from activation
checkpointing is not counted, as in PaLM).  The peak is the dense datasheet
number for known GPUs and, on CPUs (which publish none), a measured matrix
multiply at the training precision, cached per machine.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

# dense (non-sparse) tensor-core peaks, FLOP/s
GPU_PEAK = {
    "H200": {"bf16": 989e12, "fp32": 67e12}, "H100": {"bf16": 989e12, "fp32": 67e12},
    "H800": {"bf16": 989e12, "fp32": 67e12}, "H20": {"bf16": 148e12, "fp32": 44e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12}, "A800": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12}, "L4": {"bf16": 121e12, "fp32": 30e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12}, "4090": {"bf16": 165e12, "fp32": 82.6e12},
    "3090": {"bf16": 71e12, "fp32": 35.6e12}, "V100": {"bf16": 125e12, "fp32": 15.7e12},
}


def _cache_path() -> Path:
    return Path(os.environ.get("BAICHUAN2_CACHE", Path.home() / ".cache" / "baichuan2")) / "cpu_peak.json"


def measure_cpu_peak(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0) -> float:
    """Best sustained FLOP/s of a square matmul on this CPU with the current thread count."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up (oneDNN/MKL kernel selection)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def cpu_peak(dtype: torch.dtype = torch.float32, refresh: bool = False) -> float:
    """The measured peak, cached per machine, thread count and dtype.

    A measurement taken while other jobs share the cores comes out low and would make every later
    MFU figure too high (above 100 %). So the cache keeps the best value ever measured, and
    ``refresh`` measures again (the engine asks for it when a step beats the cached "peak").
    """
    key = f"{platform.processor() or platform.machine()}|{torch.get_num_threads()}|{dtype}|torch{torch.__version__}"
    path = _cache_path()
    cache = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            cache = {}
    if key not in cache or refresh:
        cache[key] = max(measure_cpu_peak(dtype), float(cache.get(key, 0.0)))
        try:
            from baichuan2.utils.io import atomic_write_json

            atomic_write_json(path, cache)
        except OSError:
            pass  # a read-only home must not stop training
    return float(cache[key])


def peak_flops(device: torch.device, precision: str, refresh: bool = False) -> tuple[float, str]:
    """``(FLOP/s, where the number comes from)`` for one device at ``precision`` ('bf16' or 'fp32')."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK.items():
            if key in name:
                return peaks["bf16" if precision == "bf16" else "fp32"], f"datasheet {key}"
        return float("nan"), f"unknown GPU {name}"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return cpu_peak(dtype, refresh), "measured CPU matmul"
