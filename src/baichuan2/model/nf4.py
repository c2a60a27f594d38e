"""Read bitsandbytes 4-bit (NF4/FP4) checkpoints, such as Baichuan 2-*-Chat-4bits, without CUDA.

bitsandbytes serialises a 4-bit linear layer ``<name>.weight`` as (``QuantState.as_dict(packed=True)``):

=============================================  =============================================================
``<name>.weight``                              uint8 ``[numel/2, 1]``: two 4-bit codes per byte, the
                                               first element of each pair in the *high* nibble
``<name>.weight.absmax``                       one scale per ``blocksize`` elements: float32, or with
                                               double quantization uint8 codes into ``nested_quant_map``
``<name>.weight.quant_map``                    float32 ``[16]``: the code book (NF4 or FP4 values)
``<name>.weight.nested_absmax``                float32, one per ``nested_blocksize`` absmax codes
``<name>.weight.nested_quant_map``             float32 ``[256]``: the code book of the absmax codes
``<name>.weight.quant_state.bitsandbytes__nf4``  uint8 bytes of a JSON object: quant_type, blocksize,
                                               dtype, shape, and nested_blocksize/nested_dtype/nested_offset
=============================================  =============================================================

Dequantising follows bitsandbytes: ``absmax = nested_quant_map[code] * nested_absmax[block] +
nested_offset`` (float32) when nested, then ``w = quant_map[code] * absmax[block]`` in
float32, cast to the stored dtype -- the same numbers ``bitsandbytes.functional.dequantize_4bit``
returns (tested against it).  The JSON is parsed as JSON; nothing is unpickled.
"""

from __future__ import annotations

import json

import torch

_STATE_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NF4Error(ValueError):
    """A bitsandbytes 4-bit tensor whose quant state is missing or inconsistent."""


def is_bnb_4bit(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(_STATE_SUFFIXES) for k in state)


def _blockwise(codes: torch.Tensor, code_book: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    values = code_book.float()[codes.long()]
    n = values.numel()
    full = scales.float().repeat_interleave(blocksize)[:n]
    if full.numel() < n:
        raise NF4Error(f"{scales.numel()} block scales cover {full.numel()} of {n} values (blocksize {blocksize})")
    return values * full


def dequantize_weight(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The dequantised tensor of the 4-bit weight ``key`` (e.g. ``...W_pack.weight``) in its stored dtype."""
    meta_key = next((key + s for s in _STATE_SUFFIXES if key + s in state), None)
    if meta_key is None:
        raise NF4Error(f"{key}: no bitsandbytes quant state")
    try:
        meta = json.loads(bytes(state[meta_key].to(torch.uint8).tolist()).decode("utf-8"))
        shape, blocksize, dtype = list(meta["shape"]), int(meta["blocksize"]), _DTYPES[meta["dtype"]]
    except (ValueError, KeyError, TypeError) as e:
        raise NF4Error(f"{meta_key}: unreadable quant state ({e!r})") from None
    try:
        packed, absmax, code_book = state[key], state[key + ".absmax"], state[key + ".quant_map"]
    except KeyError as e:
        raise NF4Error(f"{key}: quant state lacks {e.args[0]}") from None
    if "nested_blocksize" in meta:
        try:
            absmax = _blockwise(absmax, state[key + ".nested_quant_map"], state[key + ".nested_absmax"],
                                int(meta["nested_blocksize"])) + float(meta["nested_offset"])
        except KeyError as e:
            raise NF4Error(f"{key}: double-quantized state lacks {e.args[0]}") from None
    flat = packed.reshape(-1).to(torch.uint8)
    codes = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)
    numel = 1
    for d in shape:
        numel *= d
    if codes.numel() < numel:
        raise NF4Error(f"{key}: {flat.numel()} packed bytes hold {codes.numel()} values, shape {shape} needs {numel}")
    return _blockwise(codes[:numel], code_book, absmax, blocksize).to(dtype).reshape(shape)


def dequantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every bitsandbytes 4-bit weight replaced by its dequantised tensor."""
    bases = sorted(k[: -len(s)] for k in state for s in _STATE_SUFFIXES if k.endswith(s))
    out = dict(state)
    for key in bases:
        out[key] = dequantize_weight(state, key)
        for extra in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", *_STATE_SUFFIXES):
            out.pop(key + extra, None)
    return out
