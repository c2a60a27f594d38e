"""``BaichuanTokenizer`` for transformers' ``AutoTokenizer`` (no remote code).

The official checkpoints' ``tokenizer_config.json`` names ``BaichuanTokenizer``;
registering a class of that name lets ``AutoTokenizer.from_pretrained(dir)``
load both the released directories and ours.  It is SentencePiece underneath,
so ids equal ``Tokenizer.encode`` for any text that does not spell a special
token (``<s>``, ``</s>``, ``<unk>``) literally, exactly like the official class.
"""

from __future__ import annotations

from transformers import AutoTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class BaichuanTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, unk_token: str = "<unk>", bos_token: str = "<s>", eos_token: str = "</s>",
                 pad_token: str | None = "<unk>", add_bos_token: bool = False, add_eos_token: bool = False,
                 clean_up_tokenization_spaces: bool = False, **kwargs):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.setdefault("legacy", True)  # no dummy-prefix games: Baichuan 2 has none
        super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out += bos + token_ids_1 + eos
        return out

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # SentencePiece's own decoder: handles byte-fallback pieces and keeps leading spaces
        return self.sp_model.decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            token_ids = [t for t in token_ids if t not in special]
        return self.sp_model.decode(list(token_ids))


def register() -> None:
    from baichuan2.model.hf import BaichuanConfig

    try:
        AutoTokenizer.register(BaichuanConfig, slow_tokenizer_class=BaichuanTokenizer)
    except ValueError:
        pass  # already registered


register()
