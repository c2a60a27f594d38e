"""A 3-level prompt taxonomy (primary/secondary/tertiary) for reward-model data and per-category reports.

Baichuan 2 classified RM prompts into 6 primary, 30 secondary and 200+ tertiary categories. The taxonomy
is a YAML tree whose leaves list keywords (see ``assets/taxonomy.yaml``); ``classify`` gives a prompt the
leaf with the most keyword hits, so data without labels still gets a category. Labels that come with the
data win (``resolve``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from baichuan2.utils.io import InputError

DEFAULT_TAXONOMY = Path(__file__).parent / "assets" / "taxonomy.yaml"
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")


@dataclass
class Taxonomy:
    name: str
    leaves: list[tuple[str, re.Pattern | None]]  # ("primary/secondary/tertiary", keyword pattern)
    fallback: str = "other/other/other"

    @classmethod
    def load(cls, path: str | Path = DEFAULT_TAXONOMY) -> Taxonomy:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"{path}: cannot read the taxonomy: {e}") from None
        tree = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(tree, dict) or not tree:
            raise InputError(f"{path}: expected a 'categories' mapping primary -> secondary -> tertiary -> keywords")
        leaves = []
        for primary, seconds in tree.items():
            for secondary, thirds in (seconds or {}).items():
                if not isinstance(thirds, dict):
                    raise InputError(f"{path}: {primary}/{secondary} must map tertiary names to keyword lists")
                for tertiary, words in thirds.items():
                    leaves.append((f"{primary}/{secondary}/{tertiary}", _keyword_pattern(words or [])))
        fallback = str(data.get("fallback", "other/other/other"))
        if fallback.count("/") != 2:
            raise InputError(f"{path}: fallback must be a 3-level path a/b/c, got {fallback!r}")
        return cls(name=str(data.get("name", path.stem)), leaves=leaves, fallback=fallback)

    def classify(self, text: str) -> str:
        """The leaf whose keywords occur most often in ``text`` (ties: taxonomy order), else the fallback."""
        best, best_hits = self.fallback, 0
        for path, pattern in self.leaves:
            hits = len(pattern.findall(text)) if pattern is not None else 0
            if hits > best_hits:
                best, best_hits = path, hits
        return best

    def resolve(self, label: str | list | None, text: str) -> str:
        """A record's own category (``"a/b/c"`` or ``[a, b, c]``, padded to 3 levels), else ``classify(text)``."""
        if label:
            parts = [str(p) for p in (label if isinstance(label, list) else str(label).split("/")) if str(p)]
            parts = (parts + ["other"] * 3)[:3]
            return "/".join(parts)
        return self.classify(text)

    def sizes(self) -> tuple[int, int, int]:
        paths = [p.split("/") for p, _ in self.leaves]
        return (len({p[0] for p in paths}), len({tuple(p[:2]) for p in paths}), len(paths))


def _keyword_pattern(words: list) -> re.Pattern | None:
    """Latin keywords as whole words, CJK ones as substrings (Chinese has no spaces), case-insensitive."""
    alts = []
    for w in sorted({str(w) for w in words}, key=len, reverse=True):
        alts.append(re.escape(w) if _CJK.search(w) else rf"(?<![\w]){re.escape(w)}(?![\w])")
    return re.compile("|".join(alts), re.IGNORECASE) if alts else None


def category_levels(path: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b", "a/b/c"]`` (the keys of the per-level reports)."""
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
