"""The real Baichuan 2 tokenizer, trained tokenizers, round trips, HF loading."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from baichuan2.tokenizer import Tokenizer
from baichuan2.utils.io import InputError

MIXED = [
    "Hello world", "解释一下“温故而知新”", "12345.678", "  two leading spaces",
    "def f(x):\n    return x  # 4 spaces\n", "登鹳雀楼->王之涣\n夜雨寄北->", "for i in range(10):\n\tprint(i)",
    "混合 English 和中文, 2023年9月 Baichuan 2 发布。", "emoji 😀🎉 and math ∑∫√ and ℃", "<reserved_106>用户",
    "tabs\t\tand\r\nwindows line ends", "ｆｕｌｌ－ｗｉｄｔｈ　ｔｅｘｔ １２３", "", " ", "\n\n\n",
]

# reference encodings measured with sentencepiece on the official file (spec section 1.2)
REFERENCE = {
    "Hello world": [23160, 2063],
    "解释一下“温故而知新”": [5987, 2908, 92360, 92880, 93009, 26058, 92422, 92361],
    "12345.678": [92336, 92338, 92354, 92369, 92358, 72, 92373, 92383, 92370],
    "  two leading spaces": [92311, 1885, 4983, 11819],
    "def f(x):\n    return x  # 4 spaces\n": [5273, 1365, 92352, 92365, 3408, 5, 1411, 3509, 4838, 1373, 92951,
                                            92311, 92369, 11819, 5],
    "登鹳雀楼->王之涣\n夜雨寄北->": [93198, 97845, 95008, 93084, 63, 92574, 92876, 92479, 97097, 5, 93199, 93142,
                                   94115, 92683, 63, 92574],
}


@pytest.fixture(scope="module")
def real(real_tokenizer_dir):
    return Tokenizer.from_pretrained(real_tokenizer_dir)


def test_real_tokenizer_equals_sentencepiece_and_reference(real):
    sp = spm.SentencePieceProcessor(model_file=str(real.model_file))
    for text in MIXED:
        assert real.encode(text) == sp.encode(text), text
    assert real.encode_batch(MIXED) == [sp.encode(t) for t in MIXED]
    for text, ids in REFERENCE.items():
        assert real.encode(text) == ids, text
    assert (real.vocab_size, real.bos_id, real.eos_id, real.pad_id, real.user_id, real.assistant_id) == (
        125696, 1, 2, 0, 195, 196)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_unicode_real(real_tokenizer_dir, text):
    tok = _cached(real_tokenizer_dir)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab 1\t\n▁中文😀\u3000")), max_size=60))
def test_round_trip_whitespace_heavy_and_mark_characters(real_tokenizer_dir, text):
    tok = _cached(real_tokenizer_dir)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text]) == [tok.encode(text)]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_round_trip_any_unicode_trained(tiny_tokenizer_dir, text):
    tok = _cached(tiny_tokenizer_dir)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[0-9]{1,40}", fullmatch=True), st.sampled_from(["", "x", "价格", " ", "v"]))
def test_digits_always_split(real_tokenizer_dir, digits, prefix):
    tok = _cached(real_tokenizer_dir)
    pieces = [tok.id_to_piece(i) for i in tok.encode(prefix + digits)]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p.lstrip("▁")) == 1 for p in digit_pieces)
    assert "".join(p.lstrip("▁") for p in digit_pieces) == digits


def test_lone_surrogates_are_rejected_clearly(real):
    bad = b"abc\xff".decode("utf-8", errors="surrogateescape")
    with pytest.raises(InputError, match="lone surrogate"):
        real.encode(bad)
    with pytest.raises(InputError, match="lone surrogate"):
        real.encode_batch(["fine", bad])


def test_not_a_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a SentencePiece model"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(InputError, match="not found"):
        Tokenizer.from_pretrained(tmp_path / "missing")


def test_autotokenizer_loads_official_and_saved_files(real, tiny_tokenizer_dir, tmp_path):
    import baichuan2  # noqa: F401
    import transformers

    official = transformers.AutoTokenizer.from_pretrained(real.model_file.parent)
    assert type(official).__name__ == "BaichuanTokenizer"
    for text in MIXED:
        assert official(text)["input_ids"] == real.encode(text), text
        assert official.decode(real.encode(text)) == text
    tiny = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    tiny.save_pretrained(tmp_path / "saved")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in MIXED:
        assert loaded(text)["input_ids"] == tiny.encode(text)
    assert loaded.eos_token_id == tiny.eos_id and loaded.pad_token_id == tiny.pad_id


_CACHE: dict = {}


def _cached(path) -> Tokenizer:
    if path not in _CACHE:
        _CACHE[path] = Tokenizer.from_pretrained(path)
    return _CACHE[path]
