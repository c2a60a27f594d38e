"""`baichuan2 convert`: move checkpoints between Baichuan 2 and plain `transformers` Llama layouts.

Baichuan 2-7B is a Llama with two storage differences: the query/key/value
projections are stacked in one ``W_pack`` ([Wq; Wk; Wv], heads contiguous in
each block, the same RoPE "rotate-half" convention, so no permutation) and the
output head is stored un-normalised (NormHead normalises rows on the fly).
Converting to Llama therefore splits ``W_pack`` and L2-normalises the head once.
ALiBi models (13B family) have no Llama equivalent.

Converting *from* Llama-family models (``from-llama``, ``from-gguf``):

* The head stays a plain linear head (``norm_head: false`` in config.json): a
  Llama head's row norms carry information, NormHead would rescale every logit.
* Grouped-query attention is converted exactly by repeating each key/value head
  over its group of query heads inside ``W_pack`` (what ``repeat_kv`` does at run
  time in transformers).  We chose this over a ``num_key_value_heads`` option in
  the model because it keeps the official ``W_pack`` layout, the attention,
  KV-cache, FlexAttention and tensor-parallel code unchanged (one code path,
  already tested); the cost is a KV cache and K/V projections ``heads/kv_heads``
  times larger (3x for SmolLM2-135M), which matters only for large GQA models.
* Tied embeddings are untied by copying the embedding into ``lm_head`` (Baichuan
  never ties; logits are identical, a later fine-tune may move them apart).
* The tokenizer files, chat template and ``generation_config.json`` are carried
  over unchanged, and before anything is written the result's fp32 logits are
  compared with the source model's in ``transformers`` on a fixed prompt: a
  mismatch above ``atol`` is an error and no directory is written.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from baichuan2.model.checkpoint import (CheckpointError, check_state_dict, load_pretrained, load_state_dict,
                                        read_config, save_pretrained)
from baichuan2.model.config import ModelConfig
from baichuan2.model.model import Baichuan
from baichuan2.utils.io import atomic_directory, atomic_write_json, read_json

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
_W_PACK = re.compile(r"^model\.layers\.(\d+)\.self_attn\.W_pack\.weight$")
_Q_PROJ = re.compile(r"^model\.layers\.(\d+)\.self_attn\.q_proj\.weight$")


def baichuan_to_llama_state(state: dict[str, torch.Tensor], hidden_size: int,
                            norm_head: bool = True) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _W_PACK.match(key)
        if match:
            q, k, v = tensor.split(hidden_size, dim=0)
            prefix = f"model.layers.{match.group(1)}.self_attn."
            out[prefix + "q_proj.weight"] = q.clone()
            out[prefix + "k_proj.weight"] = k.clone()
            out[prefix + "v_proj.weight"] = v.clone()
        elif key == "lm_head.weight" and norm_head:
            out[key] = F.normalize(tensor.float(), dim=-1).to(tensor.dtype)
        else:
            out[key] = tensor
    return out


def repeat_kv_heads(weight: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """``[kv_heads * d, hidden]`` -> ``[heads * d, hidden]``: query head j reads key/value head
    ``j // (heads / kv_heads)``, exactly transformers' ``repeat_kv``."""
    if num_kv_heads == num_heads:
        return weight
    head_dim = weight.shape[0] // num_kv_heads
    return weight.unflatten(0, (num_kv_heads, head_dim)).repeat_interleave(num_heads // num_kv_heads, dim=0
                                                                          ).flatten(0, 1)


def llama_to_baichuan_state(state: dict[str, torch.Tensor], num_heads: int | None = None,
                            num_kv_heads: int | None = None) -> dict[str, torch.Tensor]:
    """Llama tensors -> Baichuan names; K/V heads repeated into ``W_pack`` for grouped-query attention."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")) or key.endswith("rotary_emb.inv_freq"):
            continue
        match = _Q_PROJ.match(key)
        if match:
            prefix = f"model.layers.{match.group(1)}.self_attn."
            try:
                q, k, v = (state[prefix + p + "_proj.weight"] for p in "qkv")
            except KeyError as e:
                raise CheckpointError(f"Llama checkpoint lacks {e.args[0]}") from None
            if num_heads and num_kv_heads:
                k, v = repeat_kv_heads(k, num_heads, num_kv_heads), repeat_kv_heads(v, num_heads, num_kv_heads)
            out[prefix + "W_pack.weight"] = torch.cat([q, k, v], dim=0)
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
    state = baichuan_to_llama_state(load_state_dict(src), cfg.hidden_size, cfg.norm_head)
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


def _refuse_existing(dst: str, overwrite: bool) -> None:
    """Say so before minutes of work, not after (atomic_directory would refuse at the end)."""
    if Path(dst).exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists (pass --overwrite true to replace it)")


def _first_id(value, default: int) -> int:
    """An id field that may be a list (``eos_token_id: [2, 0]``) -> its first entry."""
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


def llama_model_config(data: dict, source: str) -> tuple[ModelConfig, int]:
    """``(ModelConfig, num_key_value_heads)`` for a transformers Llama ``config.json``; anything that
    would not compute the same function is refused with the reason."""
    model_type = data.get("model_type", "llama")
    if model_type not in ("llama", "mistral") or (model_type == "mistral" and data.get("sliding_window")):
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a plain Llama architecture")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in data]
    if missing:
        raise CheckpointError(f"{source}: config.json lacks {missing}")
    heads, hidden = data["num_attention_heads"], data["hidden_size"]
    kv_heads = data.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise CheckpointError(f"{source}: {heads} query heads do not split into {kv_heads} key/value groups")
    if hidden % heads or (data.get("head_dim") or hidden // heads) != hidden // heads:
        raise CheckpointError(f"{source}: head_dim {data.get('head_dim')} != hidden_size / heads "
                              f"({hidden} / {heads}); Baichuan 2 needs that")
    if data.get("attention_bias") or data.get("mlp_bias"):
        raise CheckpointError(f"{source}: biases are not part of Baichuan 2")
    if data.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {data['hidden_act']!r} is not supported (needs silu)")
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise CheckpointError(f"{source}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
    eos = _first_id(data.get("eos_token_id"), 2)
    pad = data.get("pad_token_id")
    try:
        cfg = ModelConfig(vocab_size=data["vocab_size"], hidden_size=hidden,
                          intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
                          num_attention_heads=heads, position_embedding="rope",
                          max_position_embeddings=data.get("max_position_embeddings", 4096), rope_theta=float(theta),
                          rms_norm_eps=data.get("rms_norm_eps", 1e-6), norm_head=False,
                          pad_token_id=eos if pad is None else _first_id(pad, 0),
                          bos_token_id=_first_id(data.get("bos_token_id"), 1), eos_token_id=eos)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return cfg, kv_heads


VERIFY_TOKENS = 64


@torch.no_grad()
def max_logit_difference(model: Baichuan, reference: torch.nn.Module, vocab_size: int, length: int = VERIFY_TOKENS,
                         seed: int = 0) -> float:
    """Largest |logit difference| of two causal LMs on a fixed pseudo-random prompt (both as given, no casts)."""
    ids = torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    ours = model(ids).logits.float()
    theirs = reference(input_ids=ids).logits.float()
    return (ours - theirs).abs().max().item()


def from_llama(src: str, dst: str, overwrite: bool = False, verify: bool = True, atol: float = 1e-3) -> None:
    """Convert a transformers Llama directory (MHA or grouped-query attention, no biases, default RoPE)
    into the Baichuan 2 layout with a plain (non-NormHead) output head; checks its own result.

    Args:
        src: Llama model directory with config.json and safetensors/bin weights.
        dst: output directory (created atomically; nothing is written when the check fails).
        overwrite: replace dst if it exists.
        verify: compare fp32 logits with the source model in transformers on a fixed prompt before writing.
        atol: largest logit difference the check accepts.
    """
    started = time.perf_counter()
    _refuse_existing(dst, overwrite)
    src_path = Path(src)
    if not (src_path / "config.json").exists():
        raise CheckpointError(f"{src}: no config.json (not a model directory)")
    data = read_json(src_path / "config.json")
    cfg, kv_heads = llama_model_config(data, src)
    source_state = load_state_dict(src)
    stored_dtype = next(iter(source_state.values())).dtype
    state = llama_to_baichuan_state({k: v.float() for k, v in source_state.items()}, cfg.num_attention_heads,
                                    kv_heads)
    del source_state
    with torch.device("meta"):
        model = Baichuan(cfg)
    check_state_dict(state, model, src)
    model.load_state_dict(state, assign=True)
    model.eval()
    if verify:
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        diff = max_logit_difference(model, reference, cfg.vocab_size)
        del reference
        if not diff <= atol:
            raise CheckpointError(f"{src}: converted model's logits differ from the source's by {diff:.3g} "
                                  f"(> atol {atol:g}); nothing written")
        print(f"verified: max |logit difference| vs transformers {diff:.2e} (fp32, {VERIFY_TOKENS} tokens)")
    gen = None
    if (src_path / "generation_config.json").exists():
        gen = read_json(src_path / "generation_config.json")
    else:  # the source's ids, not Baichuan-Chat's sampling defaults
        gen = {k: data[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if data.get(k) is not None}
    save_pretrained(model, dst, dtype=stored_dtype, generation_config=gen, copy_files=tokenizer_files(src_path),
                    overwrite=overwrite)
    print(f"wrote Baichuan checkpoint to {dst} ({time.perf_counter() - started:.1f} s)")


def gguf_to_llama(src: str, dst: str, overwrite: bool = False) -> None:
    """Turn a GGUF file (Llama architecture, any quantisation) into a plain transformers Llama directory:
    weights dequantised to fp32, the tokenizer (tokenizer.json + chat template) and generation_config.json.

    Args:
        src: path of the .gguf file.
        dst: output directory (created atomically).
        overwrite: replace dst if it exists.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(src)
    if not path.is_file():
        raise CheckpointError(f"{src}: GGUF file not found")
    _refuse_existing(dst, overwrite)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{src}: transformers cannot read this GGUF file ({type(e).__name__}: {e})") from None
    # A GGUF-loaded model keeps a quantization_config and refuses save_pretrained: rebuild a plain one.
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    config = type(loaded.config).from_dict(config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"wrote transformers checkpoint to {dst}")


def from_gguf(src: str, dst: str, overwrite: bool = False, verify: bool = True, atol: float = 1e-3) -> None:
    """Convert a Llama-architecture GGUF file (e.g. SmolLM2's) straight into the Baichuan 2 layout:
    ``gguf-to-llama`` into a temporary directory, then ``from-llama`` (verified against transformers).

    Args:
        src: path of the .gguf file.
        dst: output directory (created atomically).
        overwrite: replace dst if it exists.
        verify: compare fp32 logits with the dequantised source in transformers before writing.
        atol: largest logit difference the check accepts.
    """
    _refuse_existing(dst, overwrite)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=Path(dst).parent) as tmp:
        gguf_to_llama(src, str(Path(tmp) / "llama"))
        from_llama(str(Path(tmp) / "llama"), dst, overwrite=overwrite, verify=verify, atol=atol)


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


COMMANDS = {"to-llama": to_llama, "from-llama": from_llama, "gguf-to-llama": gguf_to_llama, "from-gguf": from_gguf,
            "to-safetensors": to_safetensors}
