"""Train a SentencePiece BPE tokenizer with Baichuan 2's settings.

Settings from the report (section 2.3) and the real model file (spec section 1.2):
no normalisation (identity rule), no dummy prefix, extra whitespace kept,
numbers split into single digits, byte fallback for characters outside the
coverage, whitespace-only pieces (code indentation), pieces up to 32
characters, character coverage 0.9999, vocabulary 125,696 by default.

Id layout mirrors the real tokenizer: 0/1/2 = ``<unk>``/``<s>``/``</s>``, then
Baichuan's 86 user-defined symbols (``<SEP>``, newline, tab, HTML tags,
full-width digits and punctuation...), then ``<reserved_N>`` at id N + 89, so
the chat role tokens ``<reserved_106>``/``<reserved_107>`` are ids 195/196 as
in the released models; then the 256 byte pieces, then the learned pieces.
Vocabularies smaller than 1,024 cannot afford that block and use a compact
layout: newline 3, tab 4, ``<reserved_106>`` (user) 5, ``<reserved_107>``
(assistant) 6.  Everything downstream reads ``Tokenizer.user_id`` and
``assistant_id`` rather than assuming numbers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from baichuan2.tokenizer.corpus import iter_documents
from baichuan2.tokenizer.tokenizer import Tokenizer
from baichuan2.utils.io import InputError, atomic_write_json

# User-defined symbols of the released tokenizer, ids 3-88 (its trainer spec had "<LF>"/"<tab>" at
# ids 5/6, replaced by a literal newline and tab in the shipped model; we train with the final form).
BAICHUAN_USER_SYMBOLS = [
    "<SEP>", "<CLS>", "\n", "\t", "<img>", "<img/>", "</img>",
    *(t for tag in ("h2", "td", "strong", "table", "tr", "li", "b", "h3", "br", "h4", "h5", "p", "h1", "tbody")
      for t in (f"<{tag}>", f"<{tag}/>", f"</{tag}>")),
    *"０１２３４５６７８９", "+", "-", "=", "，", "。", "！", "？", "、", "：", "￥", ".", "!", "?", "...", "。。。",
    "。。。。。。", "《", "》", "【", "】", "『", "』", "```", "<!--", "-->", "---", "<!DOCTYPE>",
]
assert len(BAICHUAN_USER_SYMBOLS) == 86
FULL_LAYOUT_MIN_VOCAB = 1024
MIN_COVERAGE = 0.98  # SentencePiece's lower bound
COMPACT_USER_SYMBOLS = ["\n", "\t", "<reserved_106>", "<reserved_107>"]


def user_symbols(vocab_size: int, reserved: int | None = None) -> list[str]:
    """The user-defined symbols (in id order from 3) for a vocabulary of this size."""
    if vocab_size < FULL_LAYOUT_MIN_VOCAB:
        return list(COMPACT_USER_SYMBOLS)
    if reserved is None:
        reserved = 1000 if vocab_size >= 100_000 else 108  # 1000 as released; 108 keeps ids 195/196
    if reserved < 108:
        raise InputError("reserved must be at least 108 to place the chat tokens at ids 195/196")
    return BAICHUAN_USER_SYMBOLS + [f"<reserved_{i}>" for i in range(reserved)]


def _sample_lines(inputs: Sequence[str], text_field: str, max_sentences: int, max_sentence_bytes: int,
                  seed: int, out_path: Path) -> dict:
    """Reservoir-sample up to ``max_sentences`` non-empty lines into a training file."""
    from tqdm import tqdm

    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = docs = chars = skipped_long = 0
    for doc in tqdm(iter_documents(inputs, text_field), desc="reading corpus", unit="doc", mininterval=1.0):
        docs += 1
        chars += len(doc["text"])
        for line in doc["text"].split("\n"):
            if not line.strip():
                continue
            line = line.replace("\r", "")
            if len(line.encode("utf-8")) > max_sentence_bytes:
                skipped_long += 1
                continue
            seen += 1
            if len(reservoir) < max_sentences:
                reservoir.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_sentences:
                    reservoir[j] = line
    if not reservoir:
        raise InputError("the training corpus has no non-empty lines")
    char_counts: Counter[str] = Counter()
    with open(out_path, "w", encoding="utf-8") as fh:
        for line in reservoir:
            fh.write(line + "\n")
            char_counts.update(line)
    return {"documents": docs, "characters": chars, "lines_seen": seen, "lines_used": len(reservoir),
            "lines_skipped_too_long": skipped_long, "distinct_characters": len(char_counts)}, char_counts


def fitted_coverage(char_counts: Counter[str], coverage: float, budget: int) -> float:
    """The requested coverage, lowered only as far as needed for the covered characters to fit in
    ``budget`` pieces (small vocabularies on Chinese text); the rest falls back to UTF-8 bytes."""
    counts = sorted(char_counts.values(), reverse=True)
    total = sum(counts)
    if not total:
        return coverage
    covered, needed = 0, 0
    for c in counts:  # characters SentencePiece would keep at the requested coverage
        if covered / total >= coverage:
            break
        covered += c
        needed += 1
    if needed <= budget:
        return coverage
    return max(MIN_COVERAGE, sum(counts[:budget]) / total - 1e-6)


def prune_rare_characters(lines: Path, char_counts: Counter[str], budget: int, coverage: float) -> int:
    """Delete from the training sample the characters that would not fit ``budget`` pieces even at
    SentencePiece's lowest coverage (tiny vocabularies on Chinese text).  They still encode, through
    byte fallback.  Returns how many distinct characters were removed (0: nothing to do)."""
    ranked = [c for c, _ in char_counts.most_common()]
    total = sum(char_counts.values())
    covered = sum(char_counts[c] for c in ranked[:budget])
    if len(ranked) <= budget or covered / total >= coverage:
        return 0
    drop = {ord(c): None for c in ranked[budget:] if c != "\n"}
    text = lines.read_text(encoding="utf-8").translate(drop)
    lines.write_text(text, encoding="utf-8")
    return len(drop)


def train_tokenizer(inputs: Sequence[str], out_dir: str, vocab_size: int = 125696, text_field: str = "text",
                    character_coverage: float = 0.9999, max_sentences: int = 2_000_000,
                    max_sentence_bytes: int = 12282, max_piece_length: int = 32, reserved: int | None = None,
                    seed: int = 0, threads: int = 0, fit_coverage: bool = True, overwrite: bool = False) -> Tokenizer:
    """Train and save ``<out_dir>/tokenizer.model`` (+ HF tokenizer files and ``train_report.json``)."""
    import sentencepiece as spm

    out = Path(out_dir)
    if (out / "tokenizer.model").exists() and not overwrite:
        raise FileExistsError(f"{out / 'tokenizer.model'} exists (pass overwrite=True to replace it)")
    if vocab_size < 300:
        raise InputError(f"vocab_size {vocab_size} is too small: at least 259 (byte fallback alone needs 259 ids)")
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        lines = Path(tmp) / "sentences.txt"
        corpus_stats, char_counts = _sample_lines(inputs, text_field, max_sentences, max_sentence_bytes, seed, lines)
        symbols = user_symbols(vocab_size, reserved)
        budget = (vocab_size - 3 - len(symbols) - 256) // 2  # keep half the learnable ids for merges
        coverage = fitted_coverage(char_counts, character_coverage, budget) if fit_coverage else character_coverage
        pruned = prune_rare_characters(lines, char_counts, budget, coverage) if fit_coverage else 0
        if pruned:
            print(f"note: a {vocab_size}-piece vocabulary cannot hold this corpus's characters even at SentencePiece's "
                  f"lowest coverage ({MIN_COVERAGE}); the {pruned:,} rarest characters were left out of training "
                  "and encode as UTF-8 bytes")
            coverage = character_coverage
        elif coverage < character_coverage:
            print(f"note: character coverage lowered from {character_coverage} to {coverage:.4f} so the "
                  f"{corpus_stats['distinct_characters']:,} distinct characters fit a {vocab_size}-piece vocabulary "
                  "(rarer characters fall back to UTF-8 bytes)")
        print(f"training SentencePiece BPE (vocab {vocab_size}) on {corpus_stats['lines_used']:,} lines ...",
              flush=True)
        try:
            spm.SentencePieceTrainer.train(
                input=str(lines), model_prefix=str(Path(tmp) / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
                character_coverage=coverage, byte_fallback=True, split_digits=True,
                allow_whitespace_only_pieces=True, max_sentencepiece_length=max_piece_length,
                normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                user_defined_symbols=symbols, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                max_sentence_length=max_sentence_bytes, input_sentence_size=max_sentences,
                shuffle_input_sentence=True, hard_vocab_limit=False, seed_sentencepiece_size=1_000_000,
                num_threads=threads or os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:
            if "required_chars" in str(e) or "Vocabulary size" in str(e):
                raise InputError(f"vocabulary of {vocab_size} is too small for the {corpus_stats['distinct_characters']:,}"
                                 f" distinct characters of this corpus even at coverage {coverage:.3f}; use a larger "
                                 f"vocab_size ({e})") from None
            raise
        tmp_model = Path(tmp) / "tokenizer.model"
        os.replace(tmp_model, out / ".tokenizer.model.new")
        os.replace(out / ".tokenizer.model.new", out / "tokenizer.model")
        shutil.copyfile(Path(tmp) / "tokenizer.vocab", out / "tokenizer.vocab")
    tok = Tokenizer(out / "tokenizer.model")
    tok.save_pretrained(out)
    report = {
        "settings": {"model_type": "bpe", "vocab_size_requested": vocab_size, "character_coverage": coverage,
                     "character_coverage_requested": character_coverage, "characters_left_to_bytes": pruned,
                     "byte_fallback": True, "split_digits": True, "allow_whitespace_only_pieces": True,
                     "max_sentencepiece_length": max_piece_length, "normalization": "identity",
                     "add_dummy_prefix": False, "remove_extra_whitespaces": False,
                     "layout": "baichuan" if vocab_size >= FULL_LAYOUT_MIN_VOCAB else "compact",
                     "user_defined_symbols": len(symbols)},
        "vocab_size": tok.vocab_size, "user_id": tok.user_id, "assistant_id": tok.assistant_id,
        "corpus": corpus_stats, "seconds": round(time.time() - start, 2),
    }
    atomic_write_json(out / "train_report.json", report)
    if tok.vocab_size < vocab_size:
        print(f"note: the corpus supports only {tok.vocab_size} pieces (asked for {vocab_size})")
    print(f"tokenizer written to {out} (vocab {tok.vocab_size}, user {tok.user_id}, assistant {tok.assistant_id}, "
          f"{report['seconds']} s)")
    return tok


def load_report(out_dir: str | os.PathLike) -> dict:
    return json.loads((Path(out_dir) / "train_report.json").read_text(encoding="utf-8"))
