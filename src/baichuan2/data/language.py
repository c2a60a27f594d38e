"""Language identification: every document gets an ISO 639 tag; a recipe decides which to keep.

The identifier is py3langid (langid.py's Naive Bayes model, 142 languages, shipped inside the pip
package as a numpy archive: no download, no pickle).  Chosen by ``benchmarks/langid_accuracy.py`` on
the 7,611 labelled chatterbot conversations (26 languages): accuracy 0.972 at ~5,300 docs/s and
115 MB, against lingua 0.966 at ~150 docs/s (2 cores) and 1.1 GB; the old zh/en script-ratio rule
labelled Japanese and Korean as ``zh`` and every Latin-script language as ``en``.

Tags are langid's codes with two folds: written Cantonese/Wu (``yue``, ``wuu``) count as ``zh`` -
on short texts langid confuses them with Mandarin, and for a Chinese/English model they are Chinese
text - and text without letters is ``und``.  Sources named in ``untagged_sources`` (code) are tagged
with the source name: a natural-language label means nothing for them.  ``identifier: script`` keeps
the old rule (zh/en/other by script ratio) for comparisons.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from baichuan2.data.text import detect_language
from baichuan2.utils.io import InputError

SAMPLE_CHARS = 4000  # langid's cost is linear in length; the start of a document decides its language
FOLD = {"yue": "zh", "wuu": "zh", "zxx": "und"}
# Scripts written without spaces between words: MinHash shingles them by characters, like Chinese.
CHAR_UNIT_LANGS = frozenset({"zh", "ja", "th", "lo", "km", "my", "dz"})
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


@dataclass
class LanguageArgs:
    """Language tagging and the keep-list.

    Args:
        identifier: "py3langid" (142 languages) or "script" (the old CJK-ratio rule: zh/en/other).
        keep: Languages kept (ISO 639 codes as tagged, e.g. [zh, en]); empty keeps every language.
            Documents of other languages go to the rejects as ``language:<code>``.
        untagged_sources: Sources tagged with their own name instead of a language (code).
        zh_threshold: The script rule only: CJK share of letters above which a document is Chinese.
    """

    identifier: str = "py3langid"
    keep: list[str] = field(default_factory=list)
    untagged_sources: list[str] = field(default_factory=lambda: ["code"])
    zh_threshold: float = 0.3

    def __post_init__(self):
        if self.identifier not in ("py3langid", "script"):
            raise InputError(f"language.identifier {self.identifier!r}: use 'py3langid' or 'script'")


@functools.lru_cache(maxsize=1)
def _langid():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)


def identify(text: str) -> str:
    """ISO 639 code of ``text`` ("und" when it has no letters)."""
    sample = text[:SAMPLE_CHARS]
    if not _LETTER.search(sample):
        return "und"
    code = _langid().classify(sample)[0]
    return FOLD.get(code, code)


class LanguageTagger:
    """Tags documents; ``reject_reason`` says whether the recipe keeps a tag."""

    def __init__(self, args: LanguageArgs):
        self.args = args
        self.keep = frozenset(args.keep)

    def tag(self, text: str, source: str) -> str:
        if source in self.args.untagged_sources:
            return source
        if self.args.identifier == "script":
            return detect_language(text, self.args.zh_threshold)
        return identify(text)

    def reject_reason(self, lang: str, source: str) -> str | None:
        if not self.keep or lang in self.keep or source in self.args.untagged_sources:
            return None
        return f"language:{lang}"


def shingle_group(lang: str) -> str:
    """The MinHash shingling a language gets: "zh" (character n-grams) or "en" (word n-grams)."""
    return "zh" if lang in CHAR_UNIT_LANGS else "en"
