"""`baichuan2 export gguf`: write a checkpoint as GGUF for llama.cpp / Ollama.

Which llama.cpp architecture (read from llama.cpp's ``convert_hf_to_gguf.py`` and its
``baichuan`` model loader):

* RoPE models (7B family) of **any size** go out as ``llama``: ``W_pack`` split into
  ``attn_q/k/v``, q/k rows permuted from the Hugging Face "rotate-half" RoPE to
  llama.cpp's interleaved-pairs RoPE (as its converter does), and the NormHead
  pre-normalised into a plain ``output`` matrix.  (llama.cpp's own ``baichuan``
  architecture would apply RoPE only to 32-layer models, and its converter does not
  normalise the head.)
* ALiBi models (13B family) go out as ``baichuan``, which llama.cpp runs with ALiBi
  (max bias 8, the Baichuan slopes for any head count) **only when the model has 40
  layers**: any other depth would be run with no position information at all, so
  those are refused with an error.

Weights: ``f16`` (norms stay f32), ``q8_0`` or ``q4_0`` via ``gguf.quants``; tensors whose
rows are not a multiple of the 32-value block fall back to f16, and under ``q4_0``
the output head is stored q8_0 (llama.cpp's quantizer likewise keeps it wider).
The tokenizer goes in the metadata, chosen as ``Tokenizer.from_pretrained`` chooses it:

* Baichuan's SentencePiece ``tokenizer.model`` as llama.cpp's ``llama`` vocabulary (pieces, scores,
  types incl. byte-fallback pieces, no dummy prefix), the chat role token ids and a Jinja template
  for the Baichuan 2 format (or the checkpoint's own template);
* a byte-level BPE ``tokenizer.json`` (Llama-family checkpoints such as a converted SmolLM2) as its
  ``gpt2`` vocabulary: byte-level token strings, merges, added tokens as control/user-defined,
  the pre-tokenizer by name, bos/eos/pad, add-bos flags and the checkpoint's chat template.
  Their head is plain (``norm_head: false``) and is exported as it is.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from baichuan2.utils.io import InputError, fsync_dir, read_json

OutType = Literal["f16", "q8_0", "q4_0"]
# Baichuan 2 chat: optional system text raw, then <reserved_106> user / <reserved_107> assistant, no separators
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<reserved_106>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<reserved_107>' + message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<reserved_107>' }}{% endif %}"
)


def permute_for_ggml(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from rotate-half RoPE order to llama.cpp's interleaved pairs (its converter's ``permute``)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_from_ggml(w: torch.Tensor, n_head: int) -> torch.Tensor:
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def gguf_tensors(state: dict[str, torch.Tensor], hidden: int, n_head: int, n_layer: int, rope: bool,
                 norm_head: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict as llama.cpp tensor names (fp32; a NormHead normalised, W_pack split).

    A plain head (``norm_head: false``, checkpoints converted from Llama-family models) goes out as it is:
    its row norms carry information."""
    head = state["lm_head.weight"].float()
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"],
           "output.weight": F.normalize(head, dim=-1) if norm_head else head}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        q, k, v = state[p + "self_attn.W_pack.weight"].float().split(hidden, dim=0)
        out.update({
            f"blk.{i}.attn_norm.weight": state[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": permute_for_ggml(q, n_head) if rope else q,
            f"blk.{i}.attn_k.weight": permute_for_ggml(k, n_head) if rope else k,
            f"blk.{i}.attn_v.weight": v,
            f"blk.{i}.attn_output.weight": state[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": state[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": state[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": state[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": state[p + "mlp.down_proj.weight"],
        })
    return {k: v.float() for k, v in out.items()}


def state_from_gguf(tensors: dict[str, np.ndarray], hidden: int, n_head: int, n_layer: int, rope: bool
                    ) -> dict[str, torch.Tensor]:
    """The inverse of ``gguf_tensors`` on dequantised arrays: an (official-layout) state dict."""
    t = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in tensors.items()}  # writable copies
    state = {"model.embed_tokens.weight": t["token_embd.weight"], "model.norm.weight": t["output_norm.weight"],
             "lm_head.weight": t["output.weight"]}
    for i in range(n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = t[b + "attn_q.weight"], t[b + "attn_k.weight"]
        if rope:
            q, k = unpermute_from_ggml(q, n_head), unpermute_from_ggml(k, n_head)
        state.update({
            p + "input_layernorm.weight": t[b + "attn_norm.weight"],
            p + "self_attn.W_pack.weight": torch.cat([q, k, t[b + "attn_v.weight"]]),
            p + "self_attn.o_proj.weight": t[b + "attn_output.weight"],
            p + "post_attention_layernorm.weight": t[b + "ffn_norm.weight"],
            p + "mlp.gate_proj.weight": t[b + "ffn_gate.weight"],
            p + "mlp.up_proj.weight": t[b + "ffn_up.weight"],
            p + "mlp.down_proj.weight": t[b + "ffn_down.weight"],
        })
    return state


def _add_sentencepiece_vocab(writer, model_file: Path, vocab_size: int) -> None:
    import sentencepiece as spm
    from gguf import TokenType

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = _model_proto(sp)
    user_defined = {i for i, piece in enumerate(proto.pieces) if piece.type == piece.USER_DEFINED}
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        elif i in user_defined:  # matched whole in raw text (<reserved_106> ...), by llama.cpp too
            types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    for i in range(sp.vocab_size(), vocab_size):  # model rows beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_pad_token_id(sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id())
    writer.add_add_bos_token(False)  # Baichuan 2: add_bos_token=false
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(proto.normalizer_spec.add_dummy_prefix))
    for role, piece in (("user", "<reserved_106>"), ("assistant", "<reserved_107>")):
        idx = sp.piece_to_id(piece)
        if idx != sp.unk_id():
            writer.add_uint32(f"baichuan2.chat.{role}_token_id", idx)


# Hugging Face byte-level pre-tokenizers, by structure, as llama.cpp's ``tokenizer.ggml.pre`` names
# (llama-vocab.cpp: "gpt-2" splits with the GPT-2 regex; "smollm" splits every digit first, then the same regex).
_BPE_PRE = {("byte_level",): "gpt-2", ("digits", "byte_level"): "smollm"}


def bpe_pre_tokenizer(tokenizer: dict, source: str) -> str:
    """llama.cpp's pre-tokenizer name for a ``tokenizer.json``; an error for splits it has no name for."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = []
    for step in steps:
        if step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space"):
            shape.append("byte_level")
        elif step.get("type") == "Digits" and step.get("individual_digits"):
            shape.append("digits")
        else:
            shape.append(json.dumps(step, sort_keys=True))
    if tuple(shape) not in _BPE_PRE:
        raise InputError(f"{source}: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent this "
                         f"export knows (byte-level GPT-2 or SmolLM digit splitting)")
    if tokenizer.get("normalizer"):
        raise InputError(f"{source}: a tokenizer.json normalizer ({tokenizer['normalizer'].get('type')}) "
                         "llama.cpp's BPE tokenizer would not apply")
    return _BPE_PRE[tuple(shape)]


def _add_bpe_vocab(writer, directory: Path, vocab_size: int, bos_id: int, eos_id: int) -> None:
    """A byte-level BPE ``tokenizer.json`` (Llama-family checkpoints, e.g. SmolLM2) as llama.cpp's ``gpt2``
    vocabulary: byte-level token strings, merges, added tokens typed control (special) or user-defined,
    bos/eos/pad, add-bos flags and the chat template from the checkpoint's tokenizer config."""
    from gguf import SpecialVocab, TokenType

    source = str(directory / "tokenizer.json")
    tokenizer = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise InputError(f"{source}: only byte-level BPE tokenizer.json files export (this is "
                         f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''})")
    pre = bpe_pre_tokenizer(tokenizer, source)
    pieces = {i: tok for tok, i in model["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    pieces.update({i: t["content"] for i, t in added.items()})
    if max(pieces) >= vocab_size:
        raise InputError(f"{source}: token id {max(pieces)} is outside the model's {vocab_size}-row embedding")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in pieces:  # model rows beyond the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(pieces[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(pieces[i])
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise InputError(f"{source}: no BPE merges")
    special.special_token_ids.setdefault("bos", bos_id)  # config.json's ids when the tokenizer names none
    special.special_token_ids.setdefault("eos", eos_id)
    for flag in ("bos", "eos"):  # llama.cpp would otherwise pick a default per pre-tokenizer
        special.add_special_token.setdefault(flag, False)
    special.add_to_gguf(writer, quiet=True)


def _model_proto(sp):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def _encode(name: str, w: torch.Tensor, outtype: str):
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    arr = w.detach().float().cpu().numpy()
    if arr.ndim == 1:
        return arr.astype(np.float32), None
    kind = outtype
    if outtype == "q4_0" and name == "output.weight":
        kind = "q8_0"
    if kind == "f16" or arr.shape[-1] % 32:
        return arr.astype(np.float16), None
    qtype = Q.Q8_0 if kind == "q8_0" else Q.Q4_0
    return quants.quantize(arr, qtype), qtype


def export_gguf(checkpoint: str, out: str, outtype: OutType = "f16", overwrite: bool = False) -> None:
    """Write a checkpoint as one GGUF file (llama.cpp, Ollama).

    Args:
        checkpoint: model directory (ours or official; RoPE models as 'llama', 40-layer ALiBi as 'baichuan').
        out: output .gguf file (written atomically).
        outtype: f16 | q8_0 | q4_0 (q4_0 keeps the output head at q8_0).
        overwrite: replace out if it exists.
    """
    import gguf

    from baichuan2.model.checkpoint import load_pretrained, read_config_json

    if outtype not in ("f16", "q8_0", "q4_0"):
        raise InputError(f"outtype must be f16, q8_0 or q4_0, got {outtype!r}")
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise InputError(f"{out}: exists (pass --overwrite to replace it)")
    if "quantization" in read_config_json(checkpoint):
        raise InputError(f"{checkpoint}: export from the full-precision checkpoint, not a quantized one")
    model = load_pretrained(checkpoint, dtype="float32")
    cfg = model.config
    rope = cfg.position_embedding == "rope"
    if not rope and cfg.num_hidden_layers != 40:
        raise InputError(f"{checkpoint}: llama.cpp runs ALiBi Baichuan models only with 40 layers (the 13B); "
                         f"this one has {cfg.num_hidden_layers}, which llama.cpp would run without positions")
    tok_dir = Path(checkpoint)
    sp_file, json_file = tok_dir / "tokenizer.model", tok_dir / "tokenizer.json"
    tok_config = read_json(tok_dir / "tokenizer_config.json") if (tok_dir / "tokenizer_config.json").exists() else {}
    # the same choice as Tokenizer.from_pretrained: SentencePiece for Baichuan, else the tokenizer.json
    sentencepiece = sp_file.is_file() and (tok_config.get("tokenizer_class") == "BaichuanTokenizer"
                                           or not json_file.is_file())
    if not sentencepiece and not json_file.is_file():
        raise InputError(f"{checkpoint}: no tokenizer.model or tokenizer.json to embed "
                         "(GGUF files carry their tokenizer)")
    arch = "llama" if rope else "baichuan"
    tensors = gguf_tensors(model.state_dict(), cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                           rope, cfg.norm_head)
    del model
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(Path(checkpoint).resolve().name)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_attention_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        if rope:
            writer.add_rope_freq_base(cfg.rope_theta)
            writer.add_rope_dimension_count(cfg.head_dim)
        else:
            writer.add_max_alibi_bias(8.0)
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if sentencepiece:
            _add_sentencepiece_vocab(writer, sp_file, cfg.vocab_size)
            writer.add_chat_template(tok_config.get("chat_template") or CHAT_TEMPLATE)
        else:
            _add_bpe_vocab(writer, tok_dir, cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
        writer.add_string("baichuan2.source", json.dumps({
            "position_embedding": cfg.position_embedding,
            "head": "NormHead pre-normalised" if cfg.norm_head else "plain"}))
        for name, w in tensors.items():
            data, qtype = _encode(name, w, outtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {arch} GGUF ({outtype}) to {out}")


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """``(metadata, dequantised float32 tensors)`` of a GGUF file, through the ``gguf`` package."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for field in reader.fields.values():
        if not field.types or field.name.startswith("tokenizer.ggml.") and field.name != "tokenizer.ggml.model":
            continue
        meta[field.name] = field.contents()
    tensors = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    return meta, tensors


COMMANDS = {"gguf": export_gguf}
