"""Weight-only quantization: int8 per-channel and int4 group-wise linear layers.

Only the weights are stored as integers. On AVX-512 VNNI CPUs the matmuls run on our own kernels
(``model/kernels/``), which quantise the activations to int8 per block of 32 on the fly, as llama.cpp
does, and multiply with integer dot products: decoding is instruction-bound on a few cores, and
converting weights to floats costs ~3x the instructions. Elsewhere they run on PyTorch's int-weight
kernels with bf16 activations (with fp32 activations those are ~10x *slower* than fp32):

* int8: ``torch._weight_int8pack_mm(x, q[out, in] int8, scale[out])``, symmetric
  per output channel, ``w = q * scale``; our own AVX-512 VNNI kernel (``cpu_kernels.int8_gemv``:
  int8 activations per block of 32, as llama.cpp's Q8_0) takes every CPU call when it builds.
* int4: ``torch._weight_int4pack_mm_for_cpu`` over a kernel-specific packing
  made at load time by ``torch._convert_weight_to_int4pack_for_cpu``; asymmetric
  groups of ``group_size`` inputs, ``w = q * scale + min`` with q in 0..15; our own AVX-512 VNNI kernel
  (``cpu_kernels.int4_gemv``, as llama.cpp's Q4_0 x Q8_0) takes every CPU call when it builds, and then
  PyTorch's packing is never made.

Other devices (CUDA) dequantise to the activation dtype and use a plain matmul:
correct everywhere, without the memory-bandwidth gain.

Checkpoint layout (safetensors, independent of any kernel's packing; the
``quantization`` block of ``config.json`` says which method and options):

=====================================  ==================================================
``<linear>.qweight``                   int8 ``[out, in]`` (int8) or uint8 ``[out, in/2]``
                                       (int4: column 2j in the low nibble, 2j+1 in the high)
``<linear>.scales``                    fp32 ``[out]`` (int8) or ``[out, in/group_size]`` (int4)
``<linear>.mins``                      fp32 ``[out, in/group_size]`` (int4 only)
``lm_head.*``                          the NormHead rows L2-normalised *before* quantizing
                                       (a plain linear head), when ``head`` is not "none"
``model.embed_tokens.qweight/scales``  int8 per-row embedding, when ``embeddings`` is "int8"
=====================================  ==================================================

Norm weights and anything not listed stay as they were (fp32/bf16).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from baichuan2.model import cpu_kernels
from baichuan2.model.model import Baichuan

Method = Literal["int8", "int4"]
FORMAT = "baichuan2-weight-only/1"
_KERNEL_DTYPE = torch.bfloat16  # what the CPU int-weight kernels are fast with
GROUP_SIZES = (32, 64, 128, 256)


@dataclass
class QuantConfig:
    """What to quantize and how; stored as ``config.json["quantization"]``."""

    method: Method = "int8"
    # int4 only: inputs per (scale, min) pair (at most: see fit_group_size).  32, not 128: on the real
    # SmolLM2-135M 64 costs +26% perplexity and 32 ~0% (llama.cpp's Q4_0/Q4_1 blocks are 32 too), for
    # ~10% slower int4 matmuls (more scales to read)
    group_size: int = 32
    head: Literal["none", "int8", "int4"] = "int8"  # the NormHead-folded output layer
    embeddings: Literal["none", "int8"] = "none"  # lookups are cheap; int8 only saves memory
    clip_search: bool = True  # int4: per-group range by least squares over shrunk ranges (quantize_int4)

    def __post_init__(self) -> None:
        problems = []
        if self.method not in ("int8", "int4"):
            problems.append(f"method must be 'int8' or 'int4', got {self.method!r}")
        if self.head not in ("none", "int8", "int4"):
            problems.append(f"head must be 'none', 'int8' or 'int4', got {self.head!r}")
        if self.embeddings not in ("none", "int8"):
            problems.append(f"embeddings must be 'none' or 'int8', got {self.embeddings!r}")
        if self.group_size not in GROUP_SIZES:
            problems.append(f"group_size must be one of {GROUP_SIZES} (what the int4 kernels take), "
                            f"got {self.group_size!r}")
        if problems:
            raise ValueError("invalid quantization settings: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any, source: str = "config.json") -> QuantConfig:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: quantization block is not {FORMAT!r} (got {data!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


# ---------------------------------------------------------------------------------------
# quantizers (pure functions on weight matrices; the checkpoint layout above)
# ---------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``(q int8 [out, in], scale fp32 [out])`` with ``w ~ q * scale``."""
    w = w.float().contiguous()  # the kernels want row-major codes; decoding weights may be column-major
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, in/2]`` from 4-bit codes ``[out, in]``: column 2j low nibble, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[out, in]`` (uint8) from ``pack_nibbles`` output."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int, search: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit: ``(packed uint8 [out, in/2], scales, mins [out, in/g])``,
    ``w ~ q * scale + min`` with q in 0..15.

    ``search``: each group's range is the one, among its [min, max] shrunk by 0..30 %, whose codes
    refitted by least squares (scale and min) reconstruct the group with the smallest squared error;
    otherwise plain [min, max].  A single outlier no longer sets the step for the 31 other weights
    (it gets clipped a little instead), which is what most of 4-bit's error is on real weights."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {in_f} inputs of a {tuple(w.shape)} "
                         f"weight; pick a group size that divides every layer's input width")
    g = w.float().contiguous().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    best = None
    for shrink in torch.linspace(0.0, 0.3, 16 if search else 1).tolist():
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * (1 - shrink)
        scale = (2 * half / 15.0).clamp(min=1e-12)
        q = torch.round((g - (mid - half)[..., None]) / scale[..., None]).clamp(0, 15)
        lo_fit = mid - half
        if search:  # least-squares (scale, min) for these codes: w ~ q * scale + min per group
            n = group_size
            sq, sw = q.sum(-1), g.sum(-1)
            denom = n * (q * q).sum(-1) - sq * sq
            fit = (n * (q * g).sum(-1) - sq * sw) / denom.clamp(min=1e-12)
            ok = (denom > 0) & (fit > 0)
            scale = torch.where(ok, fit, scale)
            lo_fit = torch.where(ok, (sw - scale * sq) / n, lo_fit)
        err = ((q * scale[..., None] + lo_fit[..., None] - g) ** 2).sum(-1)
        if best is None:
            best = [err, q, scale, lo_fit]
        else:
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better[..., None], q, best[1]),
                    torch.where(better, scale, best[2]), torch.where(better, lo_fit, best[3])]
    _, q, scale, lo = best
    return pack_nibbles(q.reshape(out_f, in_f)), scale, lo


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(packed).float()
    out_f, in_f = q.shape
    groups = scales.shape[1]
    w = q.reshape(out_f, groups, in_f // groups) * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(out_f, in_f)


# ---------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------

class _QuantModule(nn.Module):
    """Integer weights as buffers (so ``model.to(dtype)`` leaves them alone) and a per-device kernel cache."""

    def __init__(self) -> None:
        super().__init__()
        self._kernel: tuple[Any, dict[str, Any]] | None = None  # (weights key, {kernel name: its layout})

    def _weights_key(self) -> tuple:
        """Identity + version of every integer/scale buffer: prepared copies are rebuilt when it changes.
        (Read from ``_buffers`` directly: this runs on every decoding matmul, and ``nn.Module`` attribute
        lookups cost microseconds each.)"""
        # (inference tensors, made under torch.inference_mode, have no version counter and cannot change)
        return tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in self._buffers.values()
                     if t is not None)

    def _cached(self, name: str, build: Callable[[], Any]) -> Any:
        """``build()`` (the weights as one kernel wants them), made once per weight version and only when
        first asked for: a layer that only ever runs on one kernel never holds the other's layout."""
        key = self._weights_key()
        if self._kernel is None or self._kernel[0] != key:
            self._kernel = (key, {})
        cache = self._kernel[1]
        if name not in cache:
            cache[name] = build()
        return cache[name]

    def prepare(self) -> None:
        """Build the CPU kernel's weight layout now rather than on the first forward (which would then
        pay for it inside a timed or latency-sensitive call)."""

    def _apply(self, fn, recurse=True):  # .to()/.cuda(): prepared kernel tensors go stale
        self._kernel = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor with the module's compute device and dtype (the scales').

        Code that only asks a layer for its device/dtype (KV-cache allocation,
        ``model.dtype``) keeps working; code that needs the values gets a shape
        error instead of silently wrong numbers -- use ``dequantize()``."""
        return self.scales.new_empty(0)


_GEMV_CHUNK = 256  # rows per kernel call: the activations of one call stay in L2 while each weight block passes


def _rows_through(gemv: Any, flat: torch.Tensor, x: torch.Tensor, out_features: int, *weights: Any) -> torch.Tensor:
    """``flat`` [rows, in] through one of our kernels in chunks of `_GEMV_CHUNK` rows (each row's result is
    its own, so chunking changes nothing), fp32 in and out, reshaped like ``x``."""
    flat = flat if flat.dtype == torch.float32 and flat.is_contiguous() else flat.float().contiguous()
    if flat.shape[0] <= _GEMV_CHUNK:
        y = gemv(flat, *weights)
    else:
        y = torch.cat([gemv(part, *weights) for part in flat.split(_GEMV_CHUNK)])
    return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], out_features)


class _QuantLinear(_QuantModule):
    """A quantized linear layer: our CPU kernel (``_load_gemv``, ``_gemv_weights``) where it applies, else
    ``_torch_matmul`` (PyTorch's int-weight kernel, bf16 activations) on CPU, else a dequantised matmul."""

    _K_MULTIPLE: int  # the kernel's input-width granularity

    def _gemv_call(self, x: torch.Tensor) -> tuple[Any, tuple] | None:
        """(our kernel, its weight arguments) when it takes this call: shapes it handles, and no autograd
        through it (an output silently cut off from the graph would be worse than PyTorch's op, which
        says it has no derivative)."""
        if (self.out_features % 4 or self.in_features % self._K_MULTIPLE
                or (x.requires_grad and torch.is_grad_enabled())):
            return None
        gemv = self._load_gemv()
        weights = self._cached("ours", self._gemv_weights) if gemv is not None else None
        return None if weights is None else (gemv, weights)

    def prepare(self) -> None:
        if self.qweight.device.type == "cpu":
            self._gemv_call(self.qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.dequantize().to(x.dtype))
        flat = x.reshape(-1, self.in_features)
        if (call := self._gemv_call(x)) is not None:
            return _rows_through(call[0], flat, x, self.out_features, *call[1])
        y = self._torch_matmul(flat.to(_KERNEL_DTYPE).contiguous())  # PyTorch's kernels assume it
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class Int8Linear(_QuantLinear):
    def __init__(self, in_features: int, out_features: int, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> Int8Linear:
        m = cls(w.shape[1], w.shape[0], device=w.device)
        m.qweight, m.scales = quantize_int8(w)
        return m

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    _K_MULTIPLE = 32
    _load_gemv = staticmethod(cpu_kernels.load_int8_gemv)

    def _gemv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int8_gemv's layout (kernels/int8_gemv.cpp): codes + 128 as uint8, 4 rows interleaved per 32
        columns; fp32 scales."""
        n, k = self.out_features, self.in_features
        shifted = (self.qweight.to(torch.int16) + 128).to(torch.uint8)
        return shifted.reshape(n // 4, 4, k // 32, 32).transpose(1, 2).contiguous(), self.scales.float().contiguous()

    def _torch_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        if self.qweight.data_ptr() % 64:  # safetensors loads at any offset; the kernel segfaults unaligned
            self.qweight = self.qweight.clone()
        return torch._weight_int8pack_mm(flat, self.qweight,
                                         self._cached("torch", lambda: self.scales.to(_KERNEL_DTYPE).clone()))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(_QuantLinear):
    def __init__(self, in_features: int, out_features: int, group_size: int, device: Any = None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("mins", torch.empty(out_features, groups, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor, group_size: int, search: bool = True) -> Int4Linear:
        m = cls(w.shape[1], w.shape[0], group_size, device=w.device)
        m.qweight, m.scales, m.mins = quantize_int4(w, group_size, search)
        return m

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.mins)

    _K_MULTIPLE = 64
    _load_gemv = staticmethod(cpu_kernels.load_int4_gemv)

    def _gemv_weights(self) -> tuple | None:
        """int4_gemv's layout (kernels/int4_gemv.cpp): 4 rows interleaved per 64-column chunk, fp16 scales per
        32 inputs and fp16 offsets of the centred codes, the group size; None where fp16 cannot hold them."""
        n, k = self.out_features, self.in_features
        s, m = self.scales.float(), self.mins.float()
        chunks = unpack_nibbles(self.qweight).reshape(n // 4, 4, k // 64, 64).transpose(1, 2)
        packed = chunks[..., :32] | (chunks[..., 32:] << 4)
        blocks = s.repeat_interleave(self.group_size // 32, dim=1).reshape(n // 4, 4, k // 32).transpose(1, 2)
        # fp16 scales and offsets (as Q4_0's): a sixth fewer bytes to read; a layer whose values do not fit
        # fp16 (none seen in practice) keeps PyTorch's kernel
        half_blocks, offsets = blocks.to(torch.float16).contiguous(), (m + 8 * s).to(torch.float16).contiguous()
        if not (torch.isfinite(half_blocks).all() and torch.isfinite(offsets).all()):
            return None
        return packed.contiguous(), half_blocks, offsets, self.group_size

    def _torch_packing(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, m = self.scales.float(), self.mins.float()
        packed = torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.qweight).to(torch.int32), 1)
        # the kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale; layout [groups, out, 2]
        return packed, torch.stack((s, m + 8 * s), dim=-1).transpose(0, 1).contiguous().to(_KERNEL_DTYPE)

    def _torch_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        packed, scales_zeros = self._cached("torch", self._torch_packing)
        return torch._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales_zeros)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}")


class _HeadMixin:
    """The output layer after quantization: NormHead's rows were normalised before quantizing,
    so this is a plain linear map; ``targets`` give the same fused loss as NormHead."""

    def normalized_weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, z_weight: float = 0.0,
                chunk_rows: int = 0) -> Any:
        if targets is None:
            return super().forward(hidden)
        from baichuan2.model.fused_loss import fused_head_loss

        return fused_head_loss(hidden, self.dequantize().to(hidden.dtype), targets, z_weight, chunk_rows)


class Int8Head(_HeadMixin, Int8Linear):
    pass


class Int4Head(_HeadMixin, Int4Linear):
    pass


class Int8Embedding(_QuantModule):
    """Per-row int8 embedding table; looked-up rows are dequantised to the scales' dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device: Any = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> Int8Embedding:
        m = cls(*w.shape, device=w.device)
        m.qweight, m.scales = quantize_int8(w)
        return m

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids][..., None]


# ---------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------

def _make_linear(w: torch.Tensor, method: str, group_size: int, head: bool = False, search: bool = True
                 ) -> Int8Linear | Int4Linear:
    if method == "int8":
        return (Int8Head if head else Int8Linear).from_weight(w)
    return (Int4Head if head else Int4Linear).from_weight(w, group_size, search)


def _empty_linear(in_f: int, out_f: int, method: str, group_size: int, head: bool = False
                  ) -> Int8Linear | Int4Linear:
    if method == "int8":
        return (Int8Head if head else Int8Linear)(in_f, out_f)
    return (Int4Head if head else Int4Linear)(in_f, out_f, group_size)


def _body_linears(model: Baichuan) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.model.layers.modules()
            for name, child in parent.named_children() if isinstance(child, nn.Linear)]


def fit_group_size(model: Baichuan, cfg: QuantConfig) -> QuantConfig:
    """``cfg`` with the largest int4 group size <= the requested one that divides every
    quantized layer's input width (e.g. 64 for SmolLM2's 576-wide layers), checking the
    kernel's other constraint (output widths divisible by 16)."""
    int4 = [m for _, _, m in _body_linears(model)] if cfg.method == "int4" else []
    if cfg.head == "int4":
        int4.append(model.lm_head)
    if not int4:
        return cfg
    widths = {m.weight.shape[1] for m in int4}
    bad_out = sorted({m.weight.shape[0] for m in int4 if m.weight.shape[0] % 16})
    if bad_out:
        raise ValueError(f"int4 kernels need output widths divisible by 16; this model has {bad_out}")
    for g in sorted(GROUP_SIZES, reverse=True):
        if g <= cfg.group_size and all(w % g == 0 for w in widths):
            return dataclasses.replace(cfg, group_size=g)
    raise ValueError(f"no int4 group size in {GROUP_SIZES} up to {cfg.group_size} divides the input widths "
                     f"{sorted(widths)}; use int8")


@torch.no_grad()
def quantize_model(model: Baichuan, cfg: QuantConfig) -> Baichuan:
    """Replace the linear layers (and optionally head/embeddings) of ``model`` in place; returns it.

    Norm weights keep their dtype; the quantized layers compute in the dtype
    of their input (through bf16 kernels on CPU)."""
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"model is already quantized ({model.quantization.method})")
    cfg = fit_group_size(model, cfg)
    dtype = model.dtype
    for parent, name, linear in _body_linears(model):
        setattr(parent, name, _make_linear(linear.weight, cfg.method, cfg.group_size, search=cfg.clip_search))
    if cfg.head != "none":
        w = model.lm_head.normalized_weight().float()  # NormHead folded in (plain heads as they are)
        model.lm_head = _make_linear(w, cfg.head, cfg.group_size, head=True, search=cfg.clip_search)
    if cfg.embeddings == "int8":
        model.model.embed_tokens = Int8Embedding.from_weight(model.model.embed_tokens.weight)
    if dtype != torch.float32:  # scales follow the model's dtype, as after model.to(dtype)
        for m in model.modules():
            if isinstance(m, _QuantModule):
                m.scales.data = m.scales.data.to(dtype)
                if isinstance(m, Int4Linear):
                    m.mins.data = m.mins.data.to(dtype)
    model.quantization = cfg
    return model


def quantized_skeleton(model: Baichuan, cfg: QuantConfig) -> Baichuan:
    """Swap in empty quantized modules (on the model's device, usually meta) so a quantized
    checkpoint's state dict loads with ``load_state_dict(assign=True)``."""
    device = model.model.norm.weight.device
    with torch.device(device):
        for parent, name, linear in _body_linears(model):
            setattr(parent, name, _empty_linear(linear.in_features, linear.out_features, cfg.method, cfg.group_size))
        if cfg.head != "none":
            h = model.lm_head.weight
            model.lm_head = _empty_linear(h.shape[1], h.shape[0], cfg.head, cfg.group_size, head=True)
        if cfg.embeddings == "int8":
            e = model.model.embed_tokens.weight
            model.model.embed_tokens = Int8Embedding(*e.shape)
    model.quantization = cfg
    return model


def quantized_state_dict(model: Baichuan) -> dict[str, torch.Tensor]:
    """The state dict of a quantized model in the checkpoint layout (scales/mins in fp32)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.detach().float().cpu().contiguous() if k.endswith((".scales", ".mins")) else \
            v.detach().cpu().contiguous()
    return out


def prepare_kernels(model: nn.Module) -> None:
    """Build every quantized layer's CPU kernel layout now (`load_pretrained` calls this), so the first
    generated token does not pay for it."""
    for module in model.modules():
        if isinstance(module, _QuantModule):
            module.prepare()


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None


def read_quantization(config_json: dict[str, Any], source: str = "config.json") -> QuantConfig | None:
    """The ``quantization`` block of a parsed ``config.json`` (None for a full-precision checkpoint)."""
    block = config_json.get("quantization")
    return None if block is None else QuantConfig.from_json(block, source)


__all__ = ["QuantConfig", "Int8Linear", "Int4Linear", "Int8Embedding", "Int8Head", "Int4Head", "quantize_model",
           "quantized_skeleton", "quantized_state_dict", "quantize_int8", "quantize_int4", "dequantize_int8",
           "dequantize_int4", "pack_nibbles", "unpack_nibbles", "is_quantized", "read_quantization"]


# ---------------------------------------------------------------------------------------
# `baichuan2 quantize`
# ---------------------------------------------------------------------------------------

def quantize_checkpoint(checkpoint: str, out: str, method: Method = "int8", group_size: int = 32,
                        head: Literal["none", "int8", "int4"] = "int8",
                        embeddings: Literal["none", "int8"] = "none", clip_search: bool = True,
                        overwrite: bool = False) -> None:
    """Write a weight-only quantized copy of a checkpoint (loads directly in generate/chat/serve/eval).

    Args:
        checkpoint: model directory (ours, official, or an official Chat-4bits NF4 one).
        out: output directory (created atomically); tokenizer and generation config are carried over.
        method: int8 (per-channel, symmetric) | int4 (group-wise, asymmetric).
        group_size: int4 inputs per scale/min pair (must divide every layer's input width).
        head: how to store the NormHead-folded output layer: none (keep full precision) | int8 | int4.
        embeddings: none | int8 (per-row; saves memory, not time).
        clip_search: int4: pick each group's range by least squares (false: plain min/max).
        overwrite: replace out if it exists.
    """
    import json
    from pathlib import Path

    from baichuan2.model.checkpoint import CheckpointError, load_pretrained, save_pretrained
    from baichuan2.model.convert import tokenizer_files

    try:
        cfg = QuantConfig(method=method, group_size=group_size, head=head, embeddings=embeddings,
                          clip_search=clip_search)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = load_pretrained(checkpoint, dtype="float32")
    try:
        quantize_model(model, cfg)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint}: {e}") from None
    src = Path(checkpoint)
    gen = None
    if (src / "generation_config.json").exists():
        gen = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))
    save_pretrained(model, out, generation_config=gen, copy_files=tokenizer_files(src), overwrite=overwrite)
    used = model.quantization.group_size
    note = f" (group size {used}: the largest <= {group_size} dividing every layer)" if used != group_size else ""
    print(f"wrote {method} checkpoint to {out}{note}")


COMMANDS = quantize_checkpoint
