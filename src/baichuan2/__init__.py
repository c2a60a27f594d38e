"""Baichuan 2, end to end: data, tokenizer, model, pretraining, scaling laws, alignment, evaluation, serving."""

__version__ = "0.1.0"
