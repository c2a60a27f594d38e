"""Text utilities shared by the data steps: normalisation, language id, paragraph/sentence splitting.

Chinese has no spaces between words and ends sentences with full-width marks (。！？；…), so every
"word" statistic and sentence split below handles CJK explicitly: a CJK character counts as a word,
and sentence boundaries include the full-width marks (optionally followed by a closing quote).
"""

from __future__ import annotations

import re
import unicodedata

# CJK Unified Ideographs (+ Extension A, compatibility ideographs); kana/hangul count as CJK script too.
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
# Control characters except tab/newline; they break downstream tools and carry no text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")
# A sentence ends after ASCII .!? followed by whitespace, or after a full-width mark plus an optional
# closing quote/bracket (Chinese writes no space after a sentence).
_SENTENCE_END = re.compile(r"[.!?](?=\s)|[。！？；…]+[”’」』）)]?")
_WORD = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]|[^\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Canonical form kept in the output: NFC, LF line ends, no control characters or trailing spaces.

    Deliberately *not* NFKC: full-width punctuation and digits are real Chinese text, and the
    tokenizer was trained without normalisation (Baichuan 2 keeps the raw characters).
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    text = _TRAILING_WS.sub("\n", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def dedup_key(text: str) -> str:
    """Key for exact dedup: case-folded, whitespace-collapsed, NFKC (so full/half-width copies match)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def detect_language(text: str, zh_threshold: float = 0.3) -> str:
    """'zh' when CJK characters are at least ``zh_threshold`` of the letters, 'en' when Latin letters
    dominate, else 'other'.  A script-ratio rule is exact for the Chinese/English split Baichuan 2 needs
    and has no model to download; a fastText/GlotLID hook can replace it for more languages."""
    sample = text[:20000]
    cjk = len(_CJK.findall(sample))
    letters = len(_LETTER.findall(sample))
    if letters == 0:
        return "other"
    if cjk / letters >= zh_threshold:
        return "zh"
    ascii_letters = sum(1 for c in sample if "a" <= c.lower() <= "z")
    return "en" if ascii_letters / letters >= 0.6 else "other"


def words(text: str) -> list[str]:
    """Latin words and single CJK characters (Chinese 'words' for statistics and shingles)."""
    return _WORD.findall(text)


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each non-empty line: the paragraph unit for exact span dedup (as Dolma)."""
    spans, pos = [], 0
    for line in text.split("\n"):
        if line.strip():
            spans.append((pos, pos + len(line)))
        pos += len(line) + 1
    return spans


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, never crossing a line; leading/trailing spaces excluded."""
    spans = []
    for p_start, p_end in paragraph_spans(text):
        line = text[p_start:p_end]
        cuts = [0] + [m.end() for m in _SENTENCE_END.finditer(line)] + [len(line)]
        for a, b in zip(cuts, cuts[1:]):
            seg = line[a:b]
            if seg.strip():
                lead = len(seg) - len(seg.lstrip())
                spans.append((p_start + a + lead, p_start + a + len(seg.rstrip())))
    return spans


def remove_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """Cut the given character spans out and tidy the whitespace left behind."""
    if not spans:
        return text
    out, pos = [], 0
    for a, b in sorted(spans):
        if a >= pos:
            out.append(text[pos:a])
        pos = max(pos, b)
    out.append(text[pos:])
    joined = "".join(out)
    # Only trailing whitespace is tidied: leading indentation is content (code, poems).
    lines = [line.rstrip() for line in joined.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip("\n")
