"""One tokenizer class for every checkpoint: Baichuan 2's SentencePiece model and any Hugging Face tokenizer.

Two backends behind one interface (``encode``/``decode``/special ids/``save_pretrained``):

* SentencePiece ``tokenizer.model`` -- the real Baichuan 2 tokenizer and the ones we train.
  ``encode`` returns ids with no BOS (Baichuan 2 sets ``add_bos_token=false``), ``decode``
  inverts it exactly; the chat role tokens are ``<reserved_106>``/``<reserved_107>`` (195/196).
* ``tokenizer.json`` read with the ``tokenizers`` library (byte-level BPE of Llama 3, SmolLM2,
  Qwen ...), or whatever fast tokenizer ``transformers.AutoTokenizer`` builds from other files.
  Special tokens written in the text are parsed as such (as transformers does), bos/eos/pad/unk
  and ``add_bos_token`` come from ``tokenizer_config.json``/``special_tokens_map.json``.

Both keep the checkpoint's Jinja ``chat_template`` (``tokenizer_config.json`` or
``chat_template.jinja``): ``tokenizer.chat`` uses it when present and Baichuan 2's 195/196 format
otherwise.  ``encode`` never adds special tokens; callers that want BOS add ``bos_id``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from baichuan2.utils.io import InputError, atomic_write_json, atomic_write_text

USER_TOKEN = "<reserved_106>"  # id 195 in the real vocabulary
ASSISTANT_TOKEN = "<reserved_107>"  # id 196
WHITESPACE_MARK = "\u2581"  # SentencePiece's escaped space
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike, config: dict[str, Any] | None = None,
                 chat_template: str | None = None, backend: Any = None):
        """``model_file``: a SentencePiece ``tokenizer.model`` or a ``tokenizer.json``; ``config`` is the
        ``tokenizer_config.json`` dict (read from beside ``model_file`` when not given); ``backend`` an
        already built ``tokenizers.Tokenizer`` (the AutoTokenizer route)."""
        self.model_file = Path(model_file)
        if config is None:
            config = _read_tokenizer_config(self.model_file.parent) if self.model_file.is_file() else {}
        self.config = config
        self.chat_template = chat_template if chat_template is not None else _read_chat_template(
            self.model_file.parent, config)
        self.sp = self.hf = None
        if backend is not None:
            self.hf = backend
        elif not self.model_file.is_file():
            raise InputError(f"{self.model_file}: tokenizer model not found")
        elif self.model_file.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self.hf = HFTokenizer.from_file(str(self.model_file))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise InputError(f"{self.model_file}: not a tokenizers tokenizer.json ({e})") from None
        else:
            import sentencepiece as spm

            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
            except (RuntimeError, OSError) as e:
                raise InputError(f"{self.model_file}: not a SentencePiece model ({e})") from None
        if self.sp is not None:
            self.vocab_size = self.sp.vocab_size()
            self.unk_id = self.sp.unk_id()
            self.bos_id = self.sp.bos_id()
            self.eos_id = self.sp.eos_id()
            # SentencePiece has no pad (-1); Baichuan pads with <unk> (id 0)
            self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
            self.add_bos_token = bool(config.get("add_bos_token", False))
            self.special_ids = {i for i in (self.unk_id, self.bos_id, self.eos_id) if i >= 0}
        else:
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            self.special_ids = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
            ids = {key: self._config_token_id(key) for key in _SPECIAL_KEYS}
            if ids["eos_token"] is None:
                raise InputError(f"{self.model_file}: the tokenizer names no eos_token (tokenizer_config.json)")
            self.eos_id = ids["eos_token"]
            self.bos_id = ids["bos_token"] if ids["bos_token"] is not None else self.eos_id  # GPT-2 style
            self.unk_id = ids["unk_token"] if ids["unk_token"] is not None else self.eos_id
            self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
            self.add_bos_token = bool(config.get("add_bos_token", False))
        self._user_id: int | None = None
        self._assistant_id: int | None = None
        self._mark_ids: list[int] | None = None

    def _config_token_id(self, key: str) -> int | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # {"__type": "AddedToken", "content": ...}
            value = value.get("content")
        if not value:
            return None
        idx = self.hf.token_to_id(value)
        if idx is None:
            raise InputError(f"{self.model_file}: {key} {value!r} is not in the vocabulary")
        return idx

    # ---- chat roles ---------------------------------------------------------------------
    @property
    def user_id(self) -> int:
        """Token that opens a user turn: Baichuan's 195; with a chat template, the special token
        opening each turn (ChatML's <|im_start|>), so stop lists that hold it end a runaway turn."""
        if self._user_id is None:
            self._user_id, self._assistant_id = self._role_ids()
        return self._user_id

    @property
    def assistant_id(self) -> int:
        """Token that opens an assistant turn: Baichuan's 196, or the templated format's turn opener."""
        if self._assistant_id is None:
            self._user_id, self._assistant_id = self._role_ids()
        return self._assistant_id

    def _role_ids(self) -> tuple[int, int]:
        if self.chat_template is None:
            return self._special_id(USER_TOKEN), self._special_id(ASSISTANT_TOKEN)
        from baichuan2.tokenizer.template import render_chat

        turn = [{"role": "user", "content": "x"}]
        try:
            text = render_chat(self.chat_template, turn, True, self.special_tokens())
            header = text[len(render_chat(self.chat_template, turn, False, self.special_tokens())):]
        except InputError:
            header = ""
        opener = next((i for i in self.encode(header) if i in self.special_ids), self.eos_id)
        return opener, opener

    def _special_id(self, piece: str) -> int:
        idx = self.piece_to_id(piece)
        if idx == self.unk_id and piece != self.id_to_piece(self.unk_id):
            raise InputError(f"{self.model_file}: vocabulary lacks the chat role token {piece} "
                             "(and the tokenizer has no chat_template)")
        return idx

    def special_tokens(self) -> dict[str, str]:
        """``bos_token``/``eos_token``/``unk_token``/``pad_token`` as text (what chat templates read)."""
        return {key: self.id_to_piece(getattr(self, key.replace("_token", "_id"))) for key in _SPECIAL_KEYS}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load from a ``tokenizer.model``/``tokenizer.json`` file or a checkpoint directory.

        In a directory: Baichuan's SentencePiece model when ``tokenizer_config.json`` names
        ``BaichuanTokenizer`` (or nothing else is there), else ``tokenizer.json``, else what
        ``transformers.AutoTokenizer`` can build (e.g. ``vocab.json`` + ``merges.txt``)."""
        path = Path(path)
        if not path.is_dir():
            return cls(path)
        config = _read_tokenizer_config(path)
        sp_file, json_file = path / "tokenizer.model", path / "tokenizer.json"
        if sp_file.is_file() and (config.get("tokenizer_class") == "BaichuanTokenizer" or not json_file.is_file()):
            return cls(sp_file, config)
        if json_file.is_file():
            return cls(json_file, config)
        return cls._from_auto_tokenizer(path, config)

    @classmethod
    def _from_auto_tokenizer(cls, path: Path, config: dict[str, Any]) -> Tokenizer:
        try:
            from transformers import AutoTokenizer

            auto = AutoTokenizer.from_pretrained(str(path))
        except Exception:  # noqa: BLE001  (anything AutoTokenizer cannot read means "no tokenizer here")
            raise InputError(f"{path}: no tokenizer found (tokenizer.model, tokenizer.json or files "
                             "transformers.AutoTokenizer reads)") from None
        backend = getattr(auto, "backend_tokenizer", None)
        if backend is None:
            raise InputError(f"{path}: {type(auto).__name__} has no fast (tokenizers) backend to load")
        config = {**config, **{k: str(getattr(auto, k)) for k in _SPECIAL_KEYS if getattr(auto, k, None)}}
        return cls(path / "tokenizer.json", config, getattr(auto, "chat_template", None), backend=backend)

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        text = _check_text(text)
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=False).ids
        if WHITESPACE_MARK in text:
            return self._encode_with_marks(text)
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once (SentencePiece's C++ thread pool / tokenizers' Rust one)."""
        texts = [_check_text(t) for t in texts]
        if self.hf is not None:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
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
        if self.hf is not None:
            return self.hf.decode(list(ids), skip_special_tokens=False)
        return self.sp.decode(list(ids))

    def id_to_piece(self, idx: int) -> str:
        if self.hf is not None:
            piece = self.hf.id_to_token(idx)
            if piece is None:
                raise InputError(f"token id {idx} is outside the vocabulary (size {self.vocab_size})")
            return piece
        return self.sp.id_to_piece(idx)

    def piece_to_id(self, piece: str) -> int:
        if self.hf is not None:
            idx = self.hf.token_to_id(piece)
            return self.unk_id if idx is None else idx
        return self.sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- files --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.hf is not None:
            return self._save_hf(d)
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
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_json(d / "tokenizer_config.json", config)

    def _save_hf(self, d: Path) -> None:
        """``tokenizer.json`` + ``tokenizer_config.json`` (the loaded one, template and ids included):
        ``transformers.AutoTokenizer`` and this class read the directory back identically."""
        atomic_write_text(d / "tokenizer.json", self.hf.to_str())
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(self.special_tokens())
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_json(d / "tokenizer_config.json", config)


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` merged over ``special_tokens_map.json`` ({} when neither exists)."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            from baichuan2.utils.io import read_json

            data = read_json(path)
            if not isinstance(data, dict):
                raise InputError(f"{path}: expected a JSON object")
            config.update(data)
    return config


def _read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The checkpoint's Jinja chat template: ``chat_template.jinja`` (transformers >= 4.43 writes it),
    ``chat_template.json`` or the ``chat_template`` key of ``tokenizer_config.json`` (a string, or a
    list of named templates of which the ``default`` one is used)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if (directory / "chat_template.json").is_file() and template is None:
        template = json.loads((directory / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


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
