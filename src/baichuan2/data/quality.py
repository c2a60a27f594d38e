"""Heuristic quality filters (Gopher / C4 style) and a continuous quality score for sampling.

Each rule has a threshold in ``QualityArgs`` (the recipe's ``quality:`` section).  A document failing a
hard rule is rejected with the rule's name as the reason; every document that passes also gets a score
in (0, 1] measuring how far it sits from the thresholds, used by the scoring step for sampling weights.
Word statistics count a CJK character as one word (Chinese has no spaces), so the same rules serve
both languages; rules that only make sense for English prose (stop words, mean word length) are
skipped for Chinese, and structured sources (``structured_sources``, e.g. code) only get the length and
character-ratio rules.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from baichuan2.data.text import words

_EN_STOP = frozenset("the be to of and that have with this from".split())
_BULLETS = ("•", "-", "*", "·", "●", "‣", "▪")


@dataclass
class QualityArgs:
    """Thresholds (DataTrove/Gopher defaults where they exist, loosened for short dialogue text).

    Args:
        enabled: Run the quality filter at all.
        min_chars: Reject shorter documents (after normalisation).
        max_chars: Reject longer documents (giant blobs are usually dumps, not text).
        min_words: Minimum words (a CJK character counts as one word).
        max_symbol_ratio: Max fraction of '#' and '...' symbols per word (Gopher 0.1).
        max_digit_ratio: Max fraction of digit characters among non-space characters.
        max_non_text_ratio: Max fraction of characters that are neither letters, digits nor whitespace.
        min_mean_word_len: English prose: mean word length lower bound (Gopher 3).
        max_mean_word_len: English prose: mean word length upper bound (Gopher 10).
        min_stop_words: English prose: minimum count of common English words (Gopher 2).
        max_bullet_lines: Max fraction of lines starting with a bullet (Gopher 0.9).
        max_ellipsis_lines: Max fraction of lines ending in an ellipsis (Gopher 0.3).
        max_dup_line_frac: Max fraction of lines that repeat an earlier line (Gopher 0.3).
        max_top_2gram_frac: Max share of characters in the most frequent word 2-gram (Gopher 0.2).
        max_dup_10gram_frac: Max share of characters covered by repeated word 10-grams (Gopher 0.1).
        repetition_min_words: Repetition rules (dup lines, top 2-gram, dup 10-grams) apply from this length
            on (Gopher applies them to documents of >= 50 words; short texts repeat by chance).
        structured_sources: Sources exempt from the prose and repetition rules (code repeats by design).
    """

    enabled: bool = True
    min_chars: int = 20
    max_chars: int = 1_000_000
    min_words: int = 5
    max_symbol_ratio: float = 0.1
    max_digit_ratio: float = 0.5
    max_non_text_ratio: float = 0.5
    min_mean_word_len: float = 2.0
    max_mean_word_len: float = 12.0
    min_stop_words: int = 0
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    max_dup_line_frac: float = 0.3
    max_top_2gram_frac: float = 0.2
    max_dup_10gram_frac: float = 0.1
    repetition_min_words: int = 50
    structured_sources: list[str] = field(default_factory=lambda: ["code"])


def _dup_ngram_char_frac(ws: list[str], n: int) -> float:
    """Share of word characters covered by n-grams that occur more than once (Gopher repetition)."""
    if len(ws) < n:
        return 0.0
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(ws)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    total = sum(len(w) for w in ws)
    return sum(len(w) for w, c in zip(ws, covered) if c) / max(total, 1)


def _top_ngram_char_frac(ws: list[str], n: int) -> float:
    if len(ws) < n:
        return 0.0
    counts = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / max(sum(len(w) for w in ws), 1)


def quality_signals(text: str, lang: str) -> dict[str, float]:
    ws = words(text)
    lines = [line for line in text.split("\n") if line.strip()]
    non_space = [c for c in text if not c.isspace()]
    n_ns = max(len(non_space), 1)
    line_counts = Counter(line.strip() for line in lines)
    return {
        "chars": len(text),
        "words": len(ws),
        "symbol_ratio": (text.count("#") + text.count("...") + text.count("…")) / max(len(ws), 1),
        "digit_ratio": sum(c.isdigit() for c in non_space) / n_ns,
        "non_text_ratio": sum(not (c.isalnum()) for c in non_space) / n_ns,
        "mean_word_len": (sum(len(w) for w in ws) / len(ws)) if ws and lang != "zh" else 0.0,
        "stop_words": sum(1 for w in ws if w.lower() in _EN_STOP),
        "bullet_lines": sum(line.lstrip().startswith(_BULLETS) for line in lines) / max(len(lines), 1),
        "ellipsis_lines": sum(line.rstrip().endswith(("...", "…")) for line in lines) / max(len(lines), 1),
        "dup_line_frac": sum(c - 1 for c in line_counts.values()) / max(len(lines), 1),
        "top_2gram_frac": _top_ngram_char_frac([w.lower() for w in ws], 2),
        "dup_10gram_frac": _dup_ngram_char_frac([w.lower() for w in ws], 10),
    }


def check_quality(text: str, lang: str, source: str, args: QualityArgs) -> tuple[str | None, float, dict]:
    """-> (reject reason or None, quality score in (0, 1], signals)."""
    s = quality_signals(text, lang)
    structured = source in args.structured_sources
    prose = lang == "en" and not structured
    rules: list[tuple[str, bool, float]] = [
        # (reason, failed?, margin in [0, 1]: 1 = far from the threshold, 0 = at it)
        ("too_short", s["chars"] < args.min_chars, min(1.0, s["chars"] / (4 * args.min_chars))),
        ("too_long", s["chars"] > args.max_chars, 1.0),
        ("too_few_words", s["words"] < args.min_words, min(1.0, s["words"] / (4 * args.min_words))),
        ("digit_ratio", s["digit_ratio"] > args.max_digit_ratio, 1 - s["digit_ratio"] / args.max_digit_ratio),
        ("non_text_ratio", s["non_text_ratio"] > args.max_non_text_ratio,
         1 - s["non_text_ratio"] / args.max_non_text_ratio),
    ]
    if not structured:
        rules += [
            ("symbol_ratio", s["symbol_ratio"] > args.max_symbol_ratio, 1 - s["symbol_ratio"] / args.max_symbol_ratio),
            ("bullet_lines", s["bullet_lines"] > args.max_bullet_lines, 1.0),
            ("ellipsis_lines", s["ellipsis_lines"] > args.max_ellipsis_lines, 1.0),
        ]
    if not structured and s["words"] >= args.repetition_min_words:
        rules += [
            ("dup_lines", s["dup_line_frac"] > args.max_dup_line_frac, 1 - s["dup_line_frac"] / args.max_dup_line_frac),
            ("top_2gram", s["top_2gram_frac"] > args.max_top_2gram_frac,
             1 - s["top_2gram_frac"] / args.max_top_2gram_frac),
            ("dup_10grams", s["dup_10gram_frac"] > args.max_dup_10gram_frac,
             1 - s["dup_10gram_frac"] / args.max_dup_10gram_frac),
        ]
    reason = next((name for name, failed, _ in rules if failed), None)
    # Geometric mean of the soft margins, floored so a passing document never gets weight zero.
    margins = [max(0.05, min(1.0, m)) for _, failed, m in rules if not failed]
    score = math.exp(sum(math.log(m) for m in margins) / len(margins)) if margins else 0.05
    return reason, round(score, 6), s
