"""Read and write the official Hugging Face checkpoint layout.

A model directory holds ``config.json`` (model_type ``baichuan``, the official
keys plus ``position_embedding``/``rope_theta``/``z_loss_weight``),
``generation_config.json``, weights as ``model.safetensors`` or shards with
``model.safetensors.index.json``, and usually the tokenizer.  Official
``pytorch_model.bin`` files (single or sharded) are read with
``torch.load(weights_only=True)``: never unpickled as code.  Directories are
written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint behind; each carries ``checksums.sha256``
(utils/checksums.py), verified on load, and index entries may not point
outside the directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from baichuan2.model.config import ModelConfig
from baichuan2.model.model import Baichuan
from baichuan2.utils.checksums import ChecksumError, confined_path, verify_manifest, write_manifest
from baichuan2.utils.io import InputError, atomic_directory, atomic_write_json

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Files that make `trust_remote_code=True` loaders (and tools that read auto_map) find our classes.
_REMOTE_CODE_SHIMS = {
    "configuration_baichuan.py": "from baichuan2.model.hf import BaichuanConfig  # noqa: F401\n",
    "modeling_baichuan.py": "from baichuan2.model.hf import BaichuanForCausalLM  # noqa: F401\n",
}


class CheckpointError(InputError):
    """A checkpoint that cannot be read: missing, corrupt, truncated or inconsistent."""


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------

def config_to_hf(cfg: ModelConfig, torch_dtype: str = "bfloat16",
                 tokenizer_class: str | None = "BaichuanTokenizer") -> dict[str, Any]:
    """Our ``config.json``; ``tokenizer_class`` names the tokenizer the directory carries (None: omit)."""
    import transformers

    data = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "gradient_checkpointing": False,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": cfg.intermediate_size,
        "model_max_length": cfg.max_position_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "baichuan",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "pad_token_id": cfg.pad_token_id,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
        # not in the official files, which imply them (7B: RoPE base 10000; 13B: ALiBi)
        "position_embedding": cfg.position_embedding,
        "rope_theta": cfg.rope_theta,
        "z_loss_weight": cfg.z_loss_weight,
        "norm_head": cfg.norm_head,  # official files lack it: they are NormHead models
    }
    if tokenizer_class:
        data["tokenizer_class"] = tokenizer_class
    return data


def config_from_hf(data: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from an official or our own ``config.json`` dict."""
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in data]
    if missing:
        raise CheckpointError(f"{source}: missing keys {missing}")
    if data.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {data['hidden_act']!r} is not supported (Baichuan uses silu)")
    pos = data.get("position_embedding")
    if pos is None:  # official files: the 7B (hidden 4096) uses RoPE, the 13B ALiBi -- vLLM's rule too
        pos = "rope" if data["hidden_size"] == 4096 else "alibi"
    try:
        return ModelConfig(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=data["num_attention_heads"], position_embedding=pos,
            max_position_embeddings=data.get("model_max_length", data.get("max_position_embeddings", 4096)),
            rope_theta=data.get("rope_theta", 10000.0), rms_norm_eps=data.get("rms_norm_eps", 1e-6),
            initializer_range=data.get("initializer_range", 0.02),
            z_loss_weight=data.get("z_loss_weight", ModelConfig.z_loss_weight),
            norm_head=data.get("norm_head", True),
            pad_token_id=data.get("pad_token_id", 0), bos_token_id=data.get("bos_token_id", 1),
            eos_token_id=data.get("eos_token_id", 2))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def read_config(directory: str | os.PathLike) -> ModelConfig:
    return config_from_hf(read_config_json(directory), str(Path(directory) / "config.json"))


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory}: no config.json (not a model directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------

def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred."""
    d = Path(directory)
    for index_name, single in ((SAFE_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = d / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            try:  # never follow an index out of the directory
                paths = [confined_path(d, f, index) for f in files]
            except ChecksumError as e:
                raise CheckpointError(str(e)) from None
            absent = [f for f, p in zip(files, paths) if not p.exists()]
            if absent:
                raise CheckpointError(f"{index}: shard files missing from {d}: {absent}")
            return paths
        if (d / single).exists():
            if not (d / single).resolve().is_relative_to(d.resolve()):
                raise CheckpointError(f"{d / single}: a symlink to {(d / single).resolve()}, outside {d}")
            return [d / single]
    raise CheckpointError(f"{d}: no weights found (model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (truncated checkpoint?)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:  # zip errors, unpickling refused by weights_only, truncation
        raise CheckpointError(f"{path}: cannot read as a PyTorch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors")
    return state


_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached", "future_mask")


def load_state_dict(directory: str | os.PathLike, verify: bool | None = None) -> dict[str, torch.Tensor]:
    """Read every weight of a checkpoint directory into one CPU state dict.

    ``verify`` checks the weight files against the directory's ``checksums.sha256`` first (None: on
    unless ``BAICHUAN2_VERIFY_CHECKSUMS=0``; see utils/checksums.py).  JSON files are listed in the
    manifest but not enforced here: editing config.json by hand is a normal thing to do, and its
    mistakes are loud (check_state_dict), unlike a flipped byte inside a tensor."""
    files = weight_files(directory)
    try:
        verify_manifest(directory, verify, files=[p.relative_to(directory).as_posix() for p in files])
    except ChecksumError as e:
        raise CheckpointError(str(e)) from None
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        for key, tensor in read_weight_file(path).items():
            if key.endswith(_IGNORED_SUFFIXES):
                continue  # derived buffers some exporters store; recomputed here
            if key in state:
                raise CheckpointError(f"{path}: tensor {key} also appears in {origin[key]}")
            state[key], origin[key] = tensor, path
    return state


def check_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for key in sorted(set(expected) & set(state)):
        if tuple(state[key].shape) != tuple(expected[key]):
            problems.append(f"{key} has shape {tuple(state[key].shape)}, config expects {tuple(expected[key])}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match config.json: " + "; ".join(problems))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_pretrained(directory: str | os.PathLike, dtype: str | torch.dtype = "auto",
                    device: str | torch.device = "cpu", verify: bool | None = None, quantize: str | None = None,
                    **config_overrides: Any) -> Baichuan:
    """Load a model directory.  ``dtype='auto'`` keeps the stored dtype; ``verify``: see ``load_state_dict``.

    Weight-only quantized checkpoints (``config.json["quantization"]``, see
    ``model/quant.py``) load as they are, bitsandbytes 4-bit ones (the official
    Chat-4bits) are dequantised (``model/nf4.py``); ``quantize='int8'|'int4'``
    quantizes a full-precision checkpoint on load (defaults of ``QuantConfig``)."""
    from baichuan2.model import nf4, quant

    raw = read_config_json(directory)
    cfg = config_from_hf(raw, str(Path(directory) / "config.json"))
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    try:
        stored_quant = quant.read_quantization(raw, str(Path(directory) / "config.json"))
        online_quant = quant.QuantConfig(method=quantize) if quantize else None
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if stored_quant and online_quant:
        raise CheckpointError(f"{directory}: already quantized ({stored_quant.method}); drop quantize={quantize!r}")
    state = load_state_dict(directory, verify)
    if nf4.is_bnb_4bit(state):  # official Chat-4bits (bitsandbytes NF4): dequantise, bit-exact
        try:
            state = nf4.dequantize_state(state)
        except nf4.NF4Error as e:
            raise CheckpointError(f"{directory}: {e}") from None
    with torch.device("meta"):
        model = Baichuan(cfg)
    if stored_quant:
        quant.quantized_skeleton(model, stored_quant)
    check_state_dict(state, model, str(directory))
    model.load_state_dict(state, assign=True, strict=True)
    del state  # the model holds the tensors now; quantizing on load frees each full-precision one it replaces
    if dtype != "auto":
        model = model.to(DTYPES[dtype] if isinstance(dtype, str) else dtype)
    if online_quant:
        try:
            quant.quantize_model(model, online_quant)
        except ValueError as e:
            raise CheckpointError(f"{directory}: {e}") from None
    model = model.to(resolve_device(device))
    if stored_quant or online_quant:
        quant.prepare_kernels(model)  # the CPU kernels' weight layout now, not inside the first token
    return model


def save_pretrained(model: Baichuan, directory: str | os.PathLike, *, max_shard_size: int = 2 * 1024**3,
                    dtype: torch.dtype | None = None, generation_config: Mapping[str, Any] | None = None,
                    tokenizer: Any = None, extra_files: Mapping[str, Any] | None = None,
                    copy_files: Iterable[str | os.PathLike] = (), overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face directory (atomically).

    ``dtype`` casts floating weights on the way out (official files are bf16);
    ``tokenizer`` is anything with ``save_pretrained(dir)``; ``extra_files``
    maps file names to JSON-serialisable objects (e.g. release metadata);
    ``copy_files`` are copied in as they are (e.g. another checkpoint's tokenizer files).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    stored_dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[stored_dtype]

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes

    with atomic_directory(directory, overwrite=overwrite) as tmp:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            atomic_write_json(tmp / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if generation_config is None:
            from baichuan2.model.generate import SamplingConfig

            generation_config = SamplingConfig.chat().to_generation_config(
                model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)
        atomic_write_json(tmp / "generation_config.json", dict(generation_config))
        for name, code in _REMOTE_CODE_SHIMS.items():
            (tmp / name).write_text(code, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            atomic_write_json(tmp / name, obj)
        for path in copy_files:
            shutil.copyfile(path, tmp / Path(path).name)
        config = config_to_hf(model.config, dtype_name, tokenizer_class_of(tmp))
        if getattr(model, "quantization", None) is not None:  # weight-only quantized: see model/quant.py
            config["quantization"] = model.quantization.to_json()
        atomic_write_json(tmp / "config.json", config)
        write_manifest(tmp)  # sha256 of every file (config.json included), checked by load_state_dict
    return Path(directory)


def tokenizer_class_of(directory: Path) -> str | None:
    """The tokenizer class a model directory's ``config.json`` should name, judged by its tokenizer files:
    what ``tokenizer_config.json`` says, else Baichuan's for a bare ``tokenizer.model`` (official layout)
    or the generic fast class for a bare ``tokenizer.json``; None when there is no tokenizer."""
    config = directory / "tokenizer_config.json"
    if config.exists():
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            name = None
        if name:
            return name
    if (directory / "tokenizer.model").exists():
        return "BaichuanTokenizer"
    if (directory / "tokenizer.json").exists():
        return "PreTrainedTokenizerFast"
    return None
