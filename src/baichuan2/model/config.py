"""Model configuration: one dataclass, named presets, and FLOP/parameter counting.

Presets:
  * ``baichuan2-7b`` (RoPE) and ``baichuan2-13b`` (ALiBi): the released models.
  * ``scaling-11m`` ... ``scaling-3b``: the seven models of the paper's scaling-law
    study (Table 10; FFN = 3 x hidden there, not 8/3).
  * ``ladder-<size>``: a geometric ladder from ~0.1M to ~1B non-embedding
    parameters with one aspect ratio, for scaling-law work on any hardware.
  * ``tiny-rope`` / ``tiny-alibi``: a few hundred thousand parameters, for tests.

Parameter counts in preset names are *non-embedding* parameters, as in the
paper's Table 10 (Kaplan et al. convention); embeddings depend on the vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from baichuan2.utils.io import InputError

PositionEmbedding = Literal["rope", "alibi"]


def swiglu_hidden(hidden_size: int, multiple_of: int = 128) -> int:
    """Baichuan 2's FFN width: 8/3 x hidden, rounded up to a multiple of 128 (4096 -> 11008)."""
    return multiple_of * math.ceil(hidden_size * 8 / 3 / multiple_of)


@dataclass
class ModelConfig:
    vocab_size: int = 125696
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    position_embedding: PositionEmbedding = "rope"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    z_loss_weight: float = 2e-4  # paper: L_max-z = 2e-4 * z^2 (the HF class defaults to 0)
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Output head: Baichuan 2's NormHead (vocabulary rows L2-normalised in the forward pass) or,
    # for weights converted from a Llama-family model, a plain linear head (its row norms carry
    # information: SmolLM2's span 1.8-7.5, so normalising them would change every logit).
    norm_head: bool = True
    # "sdpa": torch scaled_dot_product_attention (flash / memory-efficient kernels where
    # the inputs allow); "flex": torch FlexAttention with ALiBi as a score_mod and packed
    # documents as a block mask (never materialises an S x S bias; needs torch.compile).
    attn_implementation: Literal["sdpa", "flex"] = "sdpa"
    # Fuse the output head with cross-entropy + max-z and run it over chunks of
    # positions, so [tokens x vocab] logits never exist at once (Baichuan 2 split the
    # large-vocabulary cross-entropy for the same reason); see model/fused_loss.py.
    fused_loss: bool = True
    loss_chunk_size: int = 0  # rows per chunk of the fused loss; 0 = auto (~8 MB of logits)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = _type_problems(self)
        if problems:  # wrongly typed values would only fail obscurely below (or deep inside the model)
            raise InputError("invalid model config: " + "; ".join(problems))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                            f"{self.num_attention_heads}")
        if not problems and self.position_embedding == "rope" and self.head_dim % 2:
            problems.append(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.position_embedding not in ("rope", "alibi"):
            problems.append(f"position_embedding must be 'rope' or 'alibi', got {self.position_embedding!r}")
        if self.attn_implementation not in ("sdpa", "flex"):
            problems.append(f"attn_implementation must be 'sdpa' or 'flex', got {self.attn_implementation!r}")
        if not isinstance(self.norm_head, bool):
            problems.append(f"norm_head must be true or false, got {self.norm_head!r}")
        if not (self.rms_norm_eps > 0):
            problems.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.z_loss_weight < 0:
            problems.append(f"z_loss_weight must be >= 0, got {self.z_loss_weight!r}")
        if self.loss_chunk_size < 0:
            problems.append(f"loss_chunk_size must be >= 0, got {self.loss_chunk_size!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < max(self.vocab_size, 1)):
                problems.append(f"{name}={value} is outside the vocabulary (size {self.vocab_size})")
        if problems:
            raise InputError("invalid model config: " + "; ".join(problems))

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_params(self, non_embedding: bool = False) -> int:
        """Exact parameter count of the model this config builds."""
        h, f, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = 4 * h * h + 3 * h * f + 2 * h  # W_pack + o_proj, gate/up/down, two norms
        body = n * per_layer + h  # + final norm
        return body if non_embedding else body + 2 * self.vocab_size * h

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM/nanoGPT convention.

        6 x (weights of every matmul, output head included, embedding lookup excluded)
        + 12 x layers x hidden x seq_len for the attention score and value matmuls
        (no causal discount; ALiBi/RoPE/norms are elementwise and not counted).
        The trainer's MFU and the scaling-law compute axis both use this number.
        """
        t = self.max_position_embeddings if seq_len is None else seq_len
        h, f, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        matmul_params = n * (4 * h * h + 3 * h * f) + self.vocab_size * h
        return 6.0 * matmul_params + 12.0 * n * h * t

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise InputError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name].replace(**overrides)

    def replace(self, **overrides: Any) -> ModelConfig:
        _check_keys(overrides, "model.overrides")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        _check_keys(data, "model config")
        return cls(**data)


def _check_keys(data: dict[str, Any], what: str) -> None:
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"unknown {what} key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(names)}")


def _type_problems(cfg: ModelConfig) -> list[str]:
    """Fields whose value does not have the declared type (ints may stand for floats; bools are not ints)."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), f.type if not isinstance(f.type, str) else eval(f.type, globals())
        if get_origin(kind) is Literal:
            ok = value in get_args(kind)
            expected = " or ".join(map(repr, get_args(kind)))
        else:
            allowed = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}[kind]
            ok = isinstance(value, allowed) and (kind is bool or not isinstance(value, bool))
            expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
        if not ok and not (value is None and f.name.endswith("_token_id")):  # HF configs may say null
            problems.append(f"{f.name} must be {expected}, got {value!r}")
    return problems


def _ladder(hidden: int, layers: int, heads: int, ffn_multiple: int = 32, vocab: int = 32000,
            pos: PositionEmbedding = "rope", max_pos: int = 2048) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=swiglu_hidden(hidden, ffn_multiple),
                       num_hidden_layers=layers, num_attention_heads=heads, position_embedding=pos,
                       max_position_embeddings=max_pos)


PRESETS: dict[str, ModelConfig] = {
    # released models (paper Table 3; official config.json)
    "baichuan2-7b": ModelConfig(),
    "baichuan2-13b": ModelConfig(hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                                 num_attention_heads=40, position_embedding="alibi"),
    # tiny configs for tests and CPU smoke runs
    "tiny-rope": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256),
    "tiny-alibi": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                              num_attention_heads=4, position_embedding="alibi", max_position_embeddings=256),
}

# The paper's scaling-law ladder, Table 10 (hidden, FFN, layers, heads; non-embedding params).
for _name, (_h, _f, _l, _n) in {
    "scaling-11m": (384, 1152, 6, 6),
    "scaling-52m": (704, 2112, 8, 8),
    "scaling-108m": (832, 2496, 12, 8),
    "scaling-308m": (1216, 3648, 16, 8),
    "scaling-835m": (1792, 5376, 20, 14),
    "scaling-1.6b": (2240, 6720, 24, 14),
    "scaling-3b": (2880, 8640, 28, 20),
}.items():
    PRESETS[_name] = ModelConfig(hidden_size=_h, intermediate_size=_f, num_hidden_layers=_l, num_attention_heads=_n)

# A geometric ladder (~x2-4 per rung) with depth growing slowly, head_dim 12-128 (the smallest rungs
# are for CPU scaling demos, where a ~1M-token budget keeps only models this small capacity-limited).
# Names give rounded non-embedding parameter counts (see test_ladder_names_match_their_size).
for _name, _args in {
    "ladder-10k": (16, 3, 1),
    "ladder-20k": (24, 3, 2),
    "ladder-50k": (32, 4, 2),
    "ladder-100k": (48, 3, 3),
    "ladder-200k": (64, 4, 4),
    "ladder-500k": (96, 4, 4),
    "ladder-1m": (128, 5, 4),
    "ladder-2m": (160, 6, 5),
    "ladder-5m": (224, 8, 7),
    "ladder-10m": (288, 10, 9),
    "ladder-20m": (384, 11, 6),
    "ladder-50m": (512, 16, 8),
    "ladder-100m": (704, 17, 11),
    "ladder-200m": (896, 20, 14),
    "ladder-500m": (1216, 28, 19),
    "ladder-1b": (1536, 35, 24),
}.items():
    PRESETS[_name] = _ladder(*_args)
