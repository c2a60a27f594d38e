"""Tokenizer: the real Baichuan 2 SentencePiece model or ours, chat formatting, training and token shards."""

from baichuan2.tokenizer.chat import build_chat_input, decode_chat, encode_chat
from baichuan2.tokenizer.tokenizer import ASSISTANT_TOKEN, USER_TOKEN, Tokenizer

__all__ = ["ASSISTANT_TOKEN", "USER_TOKEN", "Tokenizer", "build_chat_input", "decode_chat", "encode_chat"]
