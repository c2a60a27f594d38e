"""`baichuan2 convert`: move checkpoints between Baichuan 2 and plain `transformers` Llama layouts.

Baichuan 2-7B is a Llama with two storage differences: the query/key/value
projections are stacked in one ``W_pack`` ([Wq; Wk; Wv], heads contiguous in
each block, the same RoPE "rotate-half" convention, so no permutation) and the
output head is stored un-normalised (NormHead normalises rows on the fly).
Converting to Llama therefore splits ``W_pack`` and L2-normalises the head once;
converting back stacks the projections (the normalised head is a fixed point of
NormHead).  ALiBi models (13B family) have no Llama equivalent.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from baichuan2.model.checkpoint import (CheckpointError, load_pretrained, load_state_dict, read_config,
                                        save_pretrained)
from baichuan2.model.config import ModelConfig
from baichuan2.model.model import Baichuan
from baichuan2.utils.io import atomic_directory, atomic_write_json

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_W_PACK = re.compile(r"^model\.layers\.(\d+)\.self_attn\.W_pack\.weight$")
_Q_PROJ = re.compile(r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$")


def baichuan_to_llama_state(state: dict[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _W_PACK.match(key)
        if match:
            q, k, v = tensor.split(hidden_size, dim=0)
            prefix = f"model.layers.{match.group(1)}.self_attn."
            out[prefix + "q_proj.weight"] = q.clone()
            out[prefix + "k_proj.weight"] = k.clone()
            out[prefix + "v_proj.weight"] = v.clone()
        elif key == "lm_head.weight":
            out[key] = F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        else:
            out[key] = tensor
    return out


def llama_to_baichuan_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")) or key.endswith("rotary_emb.inv_freq"):
            continue
        match = _Q_PROJ.match(key)
        if match:
            prefix = f"model.layers.{match.group(1)}.self_attn."
            try:
                parts = [state[prefix + p + "_proj.weight"] for p in "qkv"]
            except KeyError as e:
                raise CheckpointError(f"Llama checkpoint lacks {e.args[0]}") from None
            out[prefix + "W_pack.weight"] = torch.cat(parts, dim=0)
        else:
            out[key] = tensor
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()  # tied Llama head
    return out


def llama_config(cfg: ModelConfig, torch_dtype: str) -> dict:
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                     num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                     hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
                     rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False, attention_bias=False,
                     mlp_bias=False, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
                     eos_token_id=cfg.eos_token_id, rope_theta=cfg.rope_theta)
    data = hf.to_dict()
    data["architectures"] = ["LlamaForCausalLM"]
    data["torch_dtype"] = torch_dtype
    return data


def tokenizer_files(src: Path) -> list[Path]:
    return [src / name for name in TOKENIZER_FILES if (src / name).exists()]


def to_llama(src: str, dst: str, dtype: str = "auto", overwrite: bool = False) -> None:
    """Convert a Baichuan 2 RoPE checkpoint (7B family) into a plain transformers Llama directory.

    Args:
        src: Baichuan model directory (official or ours; safetensors or pytorch_model.bin).
        dst: output directory (created atomically).
        dtype: auto (keep) | float32 | bfloat16 | float16.
        overwrite: replace dst if it exists.
    """
    from safetensors.torch import save_file

    src_path, cfg = Path(src), read_config(src)
    if cfg.position_embedding != "rope":
        raise CheckpointError(f"{src}: ALiBi models (13B family) have no Llama equivalent; only RoPE models convert")
    state = baichuan_to_llama_state(load_state_dict(src), cfg.hidden_size)
    if dtype != "auto":
        from baichuan2.model.checkpoint import DTYPES

        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", llama_config(cfg, dtype_name))
        if (src_path / "generation_config.json").exists():
            shutil.copyfile(src_path / "generation_config.json", tmp / "generation_config.json")
        for path in tokenizer_files(src_path):
            shutil.copyfile(path, tmp / path.name)
    print(f"wrote Llama checkpoint to {dst}")


def from_llama(src: str, dst: str, overwrite: bool = False) -> None:
    """Convert a transformers Llama directory (MHA, no biases, default RoPE) into the Baichuan 2 layout.

    Args:
        src: Llama model directory with config.json and safetensors/bin weights.
        dst: output directory (created atomically).
        overwrite: replace dst if it exists.
    """
    src_path = Path(src)
    data = json.loads((src_path / "config.json").read_text(encoding="utf-8"))
    heads = data["num_attention_heads"]
    if data.get("num_key_value_heads", heads) != heads:
        raise CheckpointError(f"{src}: grouped-query attention (num_key_value_heads != heads) is not Baichuan 2")
    if data.get("attention_bias") or data.get("mlp_bias"):
        raise CheckpointError(f"{src}: biases are not part of Baichuan 2")
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise CheckpointError(f"{src}: RoPE scaling {rope.get('rope_type')!r} is not supported")
    theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
    cfg = ModelConfig(vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
                      intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
                      num_attention_heads=heads, position_embedding="rope",
                      max_position_embeddings=data.get("max_position_embeddings", 4096), rope_theta=theta,
                      rms_norm_eps=data.get("rms_norm_eps", 1e-6),
                      pad_token_id=data.get("pad_token_id") or 0, bos_token_id=data.get("bos_token_id", 1),
                      eos_token_id=data.get("eos_token_id", 2) if isinstance(data.get("eos_token_id", 2), int) else 2)
    state = llama_to_baichuan_state(load_state_dict(src))
    with torch.device("meta"):
        model = Baichuan(cfg)
    from baichuan2.model.checkpoint import check_state_dict

    check_state_dict(state, model, src)
    model.load_state_dict(state, assign=True)
    save_pretrained(model, dst, copy_files=tokenizer_files(src_path), overwrite=overwrite)
    print(f"wrote Baichuan checkpoint to {dst}")


def to_safetensors(src: str, dst: str, dtype: str = "auto", max_shard_gb: float = 2.0,
                   overwrite: bool = False) -> None:
    """Re-save any Baichuan checkpoint (e.g. official pytorch_model.bin shards) as sharded safetensors.

    Args:
        src: model directory.
        dst: output directory (created atomically); tokenizer files are carried over.
        dtype: auto (keep) | float32 | bfloat16 | float16.
        max_shard_gb: maximum shard size in GiB.
        overwrite: replace dst if it exists.
    """
    model = load_pretrained(src, dtype=dtype)
    src_path = Path(src)
    gen = None
    if (src_path / "generation_config.json").exists():
        gen = json.loads((src_path / "generation_config.json").read_text(encoding="utf-8"))
    save_pretrained(model, dst, max_shard_size=int(max_shard_gb * 1024**3), generation_config=gen,
                    copy_files=tokenizer_files(src_path), overwrite=overwrite)
    print(f"wrote {dst}")


COMMANDS = {"to-llama": to_llama, "from-llama": from_llama, "to-safetensors": to_safetensors}
