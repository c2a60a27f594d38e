"""Baichuan 2 model: config and presets, the transformer, checkpoints, generation."""

from baichuan2.model.config import PRESETS, ModelConfig
from baichuan2.model.model import IGNORE_INDEX, Baichuan, KVCache, ModelOutput, alibi_slopes

__all__ = ["PRESETS", "IGNORE_INDEX", "Baichuan", "KVCache", "ModelConfig", "ModelOutput", "alibi_slopes",
           "load_pretrained", "save_pretrained"]


def __getattr__(name):  # checkpoint I/O pulls in safetensors/transformers only when used
    if name in ("load_pretrained", "save_pretrained"):
        from baichuan2.model import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
