"""Harmful-content filter and the safety up-sampling signal.

Term lists are matched case-insensitively with one compiled alternation per list (a C-speed scan per
document).  ``classifier`` names a Python callable ``"module:function"`` taking a list of texts and
returning harm probabilities; documents at or above ``classifier_threshold`` are rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from baichuan2.utils.io import InputError, load_callable

ASSETS = Path(__file__).parent / "assets"


@dataclass
class SafetyArgs:
    """Args:
        enabled: Run the harmful-content filter.
        harmful_terms_files: Files of terms (one per line, '#' comments); any match rejects the document.
        harmful_terms: Extra terms given inline.
        upsample_terms_files: Files of safety-positive terms; a match multiplies the sampling weight.
        upsample_terms: Extra up-sample terms given inline.
        upsample_factor: Weight multiplier for documents with a safety-positive term.
        classifier: Optional "module:function" scoring a list of texts with harm probabilities.
        classifier_threshold: Reject documents whose harm probability is at least this.
    """

    enabled: bool = True
    harmful_terms_files: list[str] = field(default_factory=lambda: [str(ASSETS / "harmful_terms.txt")])
    harmful_terms: list[str] = field(default_factory=list)
    upsample_terms_files: list[str] = field(default_factory=lambda: [str(ASSETS / "safety_upsample_terms.txt")])
    upsample_terms: list[str] = field(default_factory=list)
    upsample_factor: float = 2.0
    classifier: str | None = None
    classifier_threshold: float = 0.5


def read_terms(files: list[str], inline: list[str]) -> list[str]:
    terms = list(inline)
    for f in files:
        path = Path(f)
        if not path.exists():
            raise InputError(f"{path}: term list not found")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                terms.append(line)
    return terms


def _pattern(terms: list[str]) -> re.Pattern | None:
    if not terms:
        return None
    # Longest first so the reported term is the most specific one.
    return re.compile("|".join(re.escape(t) for t in sorted(set(terms), key=len, reverse=True)), re.IGNORECASE)


class SafetyFilter:
    def __init__(self, args: SafetyArgs):
        self.args = args
        self.harmful = _pattern(read_terms(args.harmful_terms_files, args.harmful_terms))
        self.upsample = _pattern(read_terms(args.upsample_terms_files, args.upsample_terms))
        self.classifier = load_callable(args.classifier, "safety.classifier") if args.classifier else None

    def check(self, texts: list[str]) -> list[tuple[str | None, bool]]:
        """Per text: (reject reason or None, has a safety up-sample term)."""
        probs = list(self.classifier(texts)) if self.classifier and texts else [0.0] * len(texts)
        out = []
        for text, p in zip(texts, probs):
            reason = None
            if self.args.enabled and self.harmful is not None and (m := self.harmful.search(text)):
                reason = f"harmful:{m.group(0).lower()}"
            elif self.args.enabled and p >= self.args.classifier_threshold:
                reason = f"harmful_classifier:{p:.2f}"
            out.append((reason, bool(self.upsample and self.upsample.search(text))))
        return out
