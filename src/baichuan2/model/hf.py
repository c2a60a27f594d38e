"""`transformers` integration: ``BaichuanConfig`` / ``BaichuanForCausalLM`` registered with the Auto classes.

After ``import baichuan2.model.hf`` (``import baichuan2`` does it),
``AutoModelForCausalLM.from_pretrained(dir)`` loads our checkpoints and the
official Baichuan 2 ones without ``trust_remote_code``, and ``generate()``
works.  The HF class reuses the very same modules as ``baichuan2.model.Baichuan``
(parameter names, maths, masks), so nothing is implemented twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from baichuan2.model.config import ModelConfig
from baichuan2.model.model import IGNORE_INDEX, BaichuanModel, NormHead, RMSNorm, causal_lm_loss


class BaichuanConfig(PretrainedConfig):
    """The official ``config.json`` keys, plus ``position_embedding``/``rope_theta``/``z_loss_weight``/``norm_head``."""

    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 125696, hidden_size: int = 4096, intermediate_size: int = 11008,
                 num_hidden_layers: int = 32, num_attention_heads: int = 32, hidden_act: str = "silu",
                 model_max_length: int = 4096, max_position_embeddings: int | None = None,
                 initializer_range: float = 0.02, rms_norm_eps: float = 1e-6, use_cache: bool = True,
                 pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                 tie_word_embeddings: bool = False, position_embedding: str | None = None,
                 rope_theta: float = 10000.0, z_loss_weight: float = 0.0, gradient_checkpointing: bool = False,
                 norm_head: bool = True,
                 **kwargs: Any):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.model_max_length = model_max_length
        self.max_position_embeddings = max_position_embeddings or model_max_length
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        # official files imply the scheme: RoPE for the 7B (hidden 4096), ALiBi for the 13B
        self.position_embedding = position_embedding or ("rope" if hidden_size == 4096 else "alibi")
        self.rope_theta = rope_theta
        self.z_loss_weight = z_loss_weight
        self.norm_head = bool(norm_head)  # False: plain linear head (weights converted from Llama models)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_model_config(self) -> ModelConfig:
        from baichuan2.model.checkpoint import config_from_hf

        return config_from_hf(self.to_dict(), "BaichuanConfig")

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> BaichuanConfig:
        from baichuan2.model.checkpoint import config_to_hf

        data = config_to_hf(cfg)
        for key in ("architectures", "auto_map", "model_type", "transformers_version", "torch_dtype"):
            data.pop(key)
        return cls(**data)


class BaichuanForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True

    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.core_config: ModelConfig = config.to_model_config()
        self.model = BaichuanModel(self.core_config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size, normalize=self.core_config.norm_head)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, NormHead):
            nn.init.kaiming_uniform_(module.weight, a=5**0.5)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> NormHead:
        return self.lm_head

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = None) -> None:
        self.model.gradient_checkpointing = enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Any = None, past_key_values: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """HF semantics: ``labels`` are *not* shifted (the model shifts them); -100 is ignored."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        if cache is not None and not hasattr(cache, "update"):
            raise TypeError("legacy tuple caches are not supported; pass a transformers Cache (e.g. DynamicCache)")
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                            inputs_embeds=inputs_embeds)
        loss = None
        if labels is not None:
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
            loss, _, _, logits = causal_lm_loss(self.lm_head, hidden, targets, self.config.z_loss_weight,
                                                return_logits=True)
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        else:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
        cache_field = "cache" if "cache" in fields else "past_key_values"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{cache_field: cache if use_cache else None})


def register() -> None:
    """Make the Auto classes know model_type ``baichuan`` (idempotent)."""
    try:
        AutoConfig.register("baichuan", BaichuanConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM)
    except ValueError:
        pass


register()
