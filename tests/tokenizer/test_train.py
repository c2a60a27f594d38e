"""A trained tokenizer has Baichuan 2's settings."""

from __future__ import annotations

import json

import pytest
from sentencepiece import sentencepiece_model_pb2 as pb

from baichuan2.tokenizer import Tokenizer
from baichuan2.tokenizer.train import BAICHUAN_USER_SYMBOLS, train_tokenizer


def proto(path):
    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())
    return m


def test_trained_tokenizer_settings(tiny_tokenizer_dir):
    m = proto(tiny_tokenizer_dir / "tokenizer.model")
    spec, norm = m.trainer_spec, m.normalizer_spec
    assert spec.model_type == pb.TrainerSpec.BPE
    assert (spec.byte_fallback, spec.split_digits, spec.allow_whitespace_only_pieces) == (True, True, True)
    assert spec.max_sentencepiece_length == 32
    assert norm.name == "identity" and not norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    assert len(m.pieces) == 2048
    tok = Tokenizer.from_pretrained(tiny_tokenizer_dir)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert (tok.user_id, tok.assistant_id) == (195, 196)  # as in the released vocabulary
    assert [tok.id_to_piece(i) for i in range(3, 3 + len(BAICHUAN_USER_SYMBOLS))] == BAICHUAN_USER_SYMBOLS
    pieces = [p.piece for p in m.pieces]
    assert sum(p.startswith("<0x") for p in pieces) == 256  # byte fallback
    assert any(set(p) == {"▁"} and len(p) >= 2 for p in pieces)  # whitespace-only pieces (indentation)
    assert max(len(p.piece) for p in m.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL) <= 32
    assert not any(p.type == pb.ModelProto.SentencePiece.NORMAL and sum(c.isdigit() for c in p.piece) > 1
                   for p in m.pieces)
    report = json.loads((tiny_tokenizer_dir / "train_report.json").read_text())
    assert report["vocab_size"] == 2048 and report["settings"]["layout"] == "baichuan"
    # indentation and rare characters
    ids = tok.encode("def f():\n        return '𝔘'")
    assert tok.decode(ids) == "def f():\n        return '𝔘'"
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)  # byte fallback for a character never seen


def test_compact_layout_for_small_vocabularies(small_corpus, tmp_path):
    english = tmp_path / "en.jsonl"
    english.write_text("".join(line for line in small_corpus.read_text(encoding="utf-8").splitlines(True)
                               if '"source": "docs"' in line), encoding="utf-8")
    tok = train_tokenizer([str(english)], str(tmp_path / "t"), vocab_size=600, max_sentences=20_000)
    assert (tok.user_id, tok.assistant_id) == (5, 6)
    assert tok.id_to_piece(3) == "\n" and tok.id_to_piece(4) == "\t"
    assert tok.vocab_size == 600


def test_refuses_to_overwrite(tiny_tokenizer_dir, small_corpus):
    with pytest.raises(FileExistsError):
        train_tokenizer([str(small_corpus)], str(tiny_tokenizer_dir), vocab_size=2048)


def test_bad_corpus_is_a_clear_error(tmp_path):
    from baichuan2.utils.io import InputError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        train_tokenizer([str(bad)], str(tmp_path / "t"), vocab_size=400)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(InputError, match="no non-empty lines"):
        train_tokenizer([str(empty)], str(tmp_path / "t2"), vocab_size=400)


def test_vocabulary_too_small_for_chinese_is_explained(small_corpus, tmp_path):
    from baichuan2.utils.io import InputError

    zh = tmp_path / "zh.jsonl"
    zh.write_text("".join(json.dumps({"text": "".join(chr(0x4E00 + (i * 7 + j) % 3000) for j in range(30))},
                                     ensure_ascii=False) + "\n" for i in range(400)), encoding="utf-8")
    with pytest.raises(InputError, match="too small"):
        train_tokenizer([str(zh)], str(tmp_path / "t"), vocab_size=400, fit_coverage=False)


def test_tiny_vocabulary_on_chinese_leaves_rare_characters_to_bytes(tmp_path):
    """Even SentencePiece's lowest coverage (0.98) needs more pieces than a 400 vocabulary has: the rarest
    characters are left out of training and still round-trip through byte fallback."""
    zh = tmp_path / "zh.jsonl"
    text = ["".join(chr(0x4E00 + (i * 7 + j) % 3000) for j in range(30)) for i in range(400)]
    zh.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in text), encoding="utf-8")
    tok = train_tokenizer([str(zh)], str(tmp_path / "t"), vocab_size=400)
    report = json.loads((tmp_path / "t" / "train_report.json").read_text())
    assert report["settings"]["characters_left_to_bytes"] > 2000
    assert all(tok.decode(tok.encode(t)) == t for t in text)
