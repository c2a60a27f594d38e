"""A tiny but complete Llama-family checkpoint built offline, shaped like SmolLM2: grouped-query
attention, tied embeddings, rope_theta 100000, a byte-level BPE ``tokenizer.json`` trained with the
``tokenizers`` library (ChatML special tokens, bos <|im_start|>, eos <|im_end|>), the ChatML Jinja
template in ``tokenizer_config.json`` and a ``generation_config.json`` whose eos is a list."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, how are you today?",
         "User: what is two plus two? Assistant: four.", "def add(a, b):\n    return a + b\n",
         "Byte-level BPE keeps every byte: café, 北京, emoji 🙂.", "Numbers 12345 and symbols #@!"] * 20


def train_bpe(directory: Path, vocab_size: int = 400) -> None:
    """tokenizer.json + tokenizer_config.json (with the ChatML template) in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
              "model_max_length": 256, "clean_up_tokenization_spaces": False, "chat_template": CHATML}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama (GQA 4 query / 2 key-value heads, tied embeddings)."""
    import transformers

    train_bpe(directory)
    vocab = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, rope_theta=100000.0, rms_norm_eps=1e-5,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a trained model's head rows have very different norms: make them so here
        model.model.embed_tokens.weight.mul_(torch.rand(config.vocab_size, 1) * 20 + 1)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=2)
    model.save_pretrained(directory)
    return directory
