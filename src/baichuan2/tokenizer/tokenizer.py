"""One tokenizer class for the real Baichuan 2 ``tokenizer.model`` and for models we train.

A thin, fast wrapper around SentencePiece: ``encode`` returns ids with no BOS
(Baichuan 2 sets ``add_bos_token=false``), ``decode`` inverts it exactly.
``save_pretrained`` writes the files the official checkpoints carry
(``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from baichuan2.utils.io import InputError, atomic_write_json

USER_TOKEN = "<reserved_106>"  # id 195 in the real vocabulary
ASSISTANT_TOKEN = "<reserved_107>"  # id 196
WHITESPACE_MARK = "\u2581"  # SentencePiece's escaped space


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise InputError(f"{self.model_file}: tokenizer model not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as e:
            raise InputError(f"{self.model_file}: not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.vocab_size()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # SentencePiece has no pad (-1); Baichuan pads with <unk> (id 0)
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
        self.user_id = self._special_id(USER_TOKEN)
        self.assistant_id = self._special_id(ASSISTANT_TOKEN)
        self._mark_ids: list[int] | None = None

    def _special_id(self, piece: str) -> int:
        idx = self.sp.piece_to_id(piece)
        if idx == self.unk_id and piece != self.sp.id_to_piece(self.unk_id):
            raise InputError(f"{self.model_file}: vocabulary lacks the chat role token {piece}")
        return idx

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a ``tokenizer.model`` file or a directory containing one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        return cls(path)

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        text = _check_text(text)
        if WHITESPACE_MARK in text:
            return self._encode_with_marks(text)
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once in SentencePiece's C++ thread pool."""
        texts = [_check_text(t) for t in texts]
        out = self.sp.encode(texts, out_type=int, num_threads=num_threads)
        for i, t in enumerate(texts):
            if WHITESPACE_MARK in t:
                out[i] = self._encode_with_marks(t)
        return out

    def _encode_with_marks(self, text: str) -> list[int]:
        # SentencePiece writes spaces as U+2581, so a literal U+2581 would decode as a space.
        # Spell it with its three UTF-8 byte pieces instead: decode(encode(text)) == text always.
        if self._mark_ids is None:
            self._mark_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in WHITESPACE_MARK.encode("utf-8")]
        ids: list[int] = []
        for i, part in enumerate(text.split(WHITESPACE_MARK)):
            if i:
                ids += self._mark_ids
            if part:
                ids += self.sp.encode(part, out_type=int)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, idx: int) -> str:
        return self.sp.id_to_piece(idx)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- files --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        target = d / "tokenizer.model"
        if target.resolve() != self.model_file.resolve():
            tmp = d / ".tokenizer.model.tmp"
            shutil.copyfile(self.model_file, tmp)
            os.replace(tmp, target)

        def token(content: str) -> dict:
            return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": True}

        special = {"bos_token": token(self.sp.id_to_piece(self.bos_id)),
                   "eos_token": token(self.sp.id_to_piece(self.eos_id)),
                   "unk_token": token(self.sp.id_to_piece(self.unk_id)),
                   "pad_token": token(self.sp.id_to_piece(self.pad_id))}
        atomic_write_json(d / "special_tokens_map.json", special)
        config = {"add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": 4096, "sp_model_kwargs": {}, "tokenizer_class": "BaichuanTokenizer",
                  **{k: {"__type": "AddedToken", **v} for k, v in special.items()}}
        atomic_write_json(d / "tokenizer_config.json", config)


def _check_text(text: str) -> str:
    """SentencePiece cannot take lone surrogates (e.g. from ``errors='surrogateescape'``):
    say so plainly instead of pybind11's cryptic cast error."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"text contains a lone surrogate {text[e.start]!r} at index {e.start}; "
                         "it is not valid Unicode text (decode the source with errors='replace')") from None
    return text
