"""The pipeline's building blocks: small steps over batches of documents, each keeping its own counts.

A ``Step`` takes a list of ``Doc`` and returns the ones it keeps; a document it removes becomes a reject
row (step, reason, cluster, the text) through ``Step.reject``, so nothing disappears silently.  A
``Filter`` is a step that decides one document at a time.  Steps hold no state between batches except
their counts, so a shard can be processed in batches of any size with the same result.  (The model is
datatrove's ``PipelineStep``/``BaseFilter``; global work - exact-dedup index, LSH bucket join, k-means -
lives in the pipeline's barrier stages, not in steps.)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from baichuan2.data.exact import ExactArgs, document_hashes
from baichuan2.data.language import LanguageArgs, LanguageTagger, shingle_group
from baichuan2.data.minhash import MinHasher, MinHashParams
from baichuan2.data.quality import QualityArgs, check_quality
from baichuan2.data.readers import Record
from baichuan2.data.safety import SafetyArgs, SafetyFilter
from baichuan2.data.text import normalize, paragraph_spans, remove_spans, sentence_spans


@dataclass
class Doc:
    """A document on its way through the steps; ``meta`` holds what a step computes for later stages."""

    doc_id: str
    source: str
    text: str
    lang: str = ""
    quality: float = 1.0
    upsample: bool = False
    meta: dict = field(default_factory=dict)


class StepStats:
    """Documents in / removed per source, removals per reason, and (span steps) spans and chars cut."""

    def __init__(self):
        self.seen, self.removed, self.reasons = Counter(), Counter(), Counter()
        self.spans_removed = self.chars_removed = 0

    def to_json(self) -> dict:
        return {"in": dict(self.seen), "removed": dict(self.removed), "reasons": dict(self.reasons),
                "spans_removed": self.spans_removed, "chars_removed": self.chars_removed}


def merge_stats(parts: list[dict]) -> dict:
    """Sum per-step stats from many tasks: ``[{step: stats_json}]`` -> ``{step: stats_json}``."""
    merged: dict[str, StepStats] = {}
    for part in parts:
        for step, d in part.items():
            m = merged.setdefault(step, StepStats())
            m.seen.update(d.get("in", {}))
            m.removed.update(d.get("removed", {}))
            m.reasons.update(d.get("reasons", {}))
            m.spans_removed += d.get("spans_removed", 0)
            m.chars_removed += d.get("chars_removed", 0)
    return {step: s.to_json() for step, s in merged.items()}


def reject_row(doc_id, source, step, reason, text, kind="document", cluster_id=None, detail=None) -> dict:
    return {"doc_id": doc_id, "source": source, "step": step, "reason": reason, "kind": kind,
            "cluster_id": cluster_id, "detail": detail, "text": text}


class Step:
    """One transformation of a document batch.  Subclasses implement ``process``."""

    name = "step"
    counted = True  # appears in the per-step counts of the report
    count_full_reason = False  # count "language:ja" as itself, not as "language"

    def __init__(self):
        self.stats = StepStats()
        self.rejects: list[dict] = []

    def __call__(self, docs: list[Doc]) -> list[Doc]:
        for d in docs:
            self.stats.seen[d.source] += 1
        return self.process(docs)

    def process(self, docs: list[Doc]) -> list[Doc]:
        raise NotImplementedError

    def reject(self, doc: Doc, reason: str, text: str | None = None, **kw) -> None:
        self.stats.removed[doc.source] += 1
        self.stats.reasons[reason if self.count_full_reason else reason.split(":")[0]] += 1
        self.rejects.append(reject_row(doc.doc_id, doc.source, self.name, reason,
                                       doc.text if text is None else text, **kw))


class Filter(Step):
    """A step deciding each document alone: ``check`` returns a reject reason or None."""

    def check(self, doc: Doc) -> str | None:
        raise NotImplementedError

    def process(self, docs: list[Doc]) -> list[Doc]:
        kept = []
        for doc in docs:
            reason = self.check(doc)
            if reason:
                self.reject(doc, reason)
            else:
                kept.append(doc)
        return kept


class Read(Step):
    """Records -> documents; unreadable records (bad JSON/UTF-8, damaged archive, too long) -> rejects."""

    name = "read"

    def records(self, records: list[Record]) -> list[Doc]:
        docs = []
        for rec in records:
            self.stats.seen[rec.source] += 1
            if rec.reject:
                self.stats.removed[rec.source] += 1
                self.stats.reasons[rec.reject.split(":")[0]] += 1
                self.rejects.append(reject_row(rec.doc_id, rec.source, self.name, rec.reject, rec.text))
            else:
                docs.append(Doc(rec.doc_id, rec.source, rec.text))
        return docs


class Normalize(Step):
    """NFC, LF line ends, no control characters or trailing spaces (``text.normalize``)."""

    name = "normalize"
    counted = False

    def process(self, docs: list[Doc]) -> list[Doc]:
        for d in docs:
            d.text = normalize(d.text)
        return docs


class TagLanguage(Filter):
    """Tag every document's language; drop languages the recipe does not keep."""

    name = "language"
    count_full_reason = True

    def __init__(self, args: LanguageArgs):
        super().__init__()
        self.tagger = LanguageTagger(args)
        self.mix: Counter = Counter()

    def check(self, doc: Doc) -> str | None:
        doc.lang = self.tagger.tag(doc.text, doc.source)
        self.mix[doc.lang] += 1
        return self.tagger.reject_reason(doc.lang, doc.source)


class QualityFilter(Filter):
    """Gopher/C4-style rules; passing documents get a quality score for the sampling weights."""

    name = "quality"

    def __init__(self, args: QualityArgs):
        super().__init__()
        self.args = args

    def check(self, doc: Doc) -> str | None:
        if not doc.text:
            return "empty"
        if self.args.enabled:
            reason, doc.quality, _ = check_quality(doc.text, doc.lang, doc.source, self.args)
            return reason
        return None


class SafetyCheck(Step):
    """Harmful-content terms or a classifier over the batch; marks safety up-sampling candidates."""

    name = "safety"

    def __init__(self, args: SafetyArgs):
        super().__init__()
        self.filter = SafetyFilter(args)

    def process(self, docs: list[Doc]) -> list[Doc]:
        kept = []
        for doc, (reason, upsample) in zip(docs, self.filter.check([d.text for d in docs]) if docs else []):
            if reason:
                self.reject(doc, reason)
            else:
                doc.upsample = upsample
                kept.append(doc)
        return kept


class ExactHashes(Step):
    """Hashes for exact dedup of the document, its paragraphs and its sentences (joined globally later)."""

    name = "exact_hashes"
    counted = False

    def __init__(self, args: ExactArgs):
        super().__init__()
        self.args = args

    def process(self, docs: list[Doc]) -> list[Doc]:
        for d in docs:
            d.meta["doc_hash"], d.meta["para_hashes"], d.meta["sent_hashes"] = document_hashes(d.text, d.source,
                                                                                               self.args)
        return docs


class MinHashSignatures(Step):
    """MinHash signatures (character n-grams for scripts without spaces, word n-grams otherwise)."""

    name = "minhash"
    counted = False

    def __init__(self, params: MinHashParams):
        super().__init__()
        self.hasher = MinHasher(params)

    def process(self, docs: list[Doc]) -> list[Doc]:
        if docs:
            sig = self.hasher.signatures([d.text for d in docs], [shingle_group(d.lang) for d in docs])
            for d, row in zip(docs, sig):
                d.meta["signature"] = row
        return docs


class DropDuplicates(Filter):
    """Remove exact and near duplicates; ``meta["cluster"]`` is the document's row of the cluster table."""

    name = "dedup"

    def check(self, doc: Doc) -> str | None:
        return doc.meta["cluster"]["reason"] or None

    def reject(self, doc: Doc, reason: str, text: str | None = None, **kw) -> None:
        c = doc.meta["cluster"]
        super().reject(doc, reason, cluster_id=c["cluster_id"], detail=f"cluster of {c['dup_count']}")


class CutDuplicateSpans(Step):
    """Cut paragraphs and sentences seen earlier in the corpus; drop documents left too short."""

    name = "spans"

    def __init__(self, args: ExactArgs):
        super().__init__()
        self.args = args

    def process(self, docs: list[Doc]) -> list[Doc]:
        kept = []
        for doc in docs:
            c, text, cuts = doc.meta["cluster"], doc.text, []
            for unit, spans_fn, reason in (("para", paragraph_spans, "dup_paragraph"),
                                           ("sent", sentence_spans, "dup_sentence")):
                if c[f"drop_{unit}"]:
                    spans = spans_fn(text)
                    for i, owner in zip(c[f"drop_{unit}"], c[f"drop_{unit}_owner"]):
                        s, e = spans[i]
                        cuts.append((s, e))
                        self.stats.spans_removed += 1
                        self.stats.chars_removed += e - s
                        self.stats.reasons[reason] += 1
                        self.rejects.append(reject_row(doc.doc_id, doc.source, self.name, reason, text[s:e], kind=unit,
                                                       cluster_id=owner,
                                                       detail=f"chars {s}-{e}; first seen in global doc {owner}"))
            if cuts:
                doc.text = remove_spans(text, cuts)
                if len(doc.text) < self.args.min_chars_after:
                    self.reject(doc, "too_short_after_span_dedup", cluster_id=c["cluster_id"])
                    continue
            kept.append(doc)
        return kept


class SemanticDedup(Filter):
    """Remove documents whose embedding is near-identical to a kept one (SemDeDup's decision, made globally)."""

    name = "semantic"

    def check(self, doc: Doc) -> str | None:
        return None if doc.meta["semantic"]["semantic_keep"] else "semantic_dup"

    def reject(self, doc: Doc, reason: str, text: str | None = None, **kw) -> None:
        s = doc.meta["semantic"]
        super().reject(doc, reason, cluster_id=s["semantic_cluster"],
                       detail=f"near-identical embedding to {s['dup_of_doc_id']}")


def run_steps(steps: list[Step], docs: list[Doc]) -> list[Doc]:
    for step in steps:
        docs = step(docs)
    return docs


def steps_stats(steps: list[Step]) -> dict:
    return {s.name: s.stats.to_json() for s in steps if s.counted}


def steps_rejects(steps: list[Step]) -> list[dict]:
    return [r for s in steps for r in s.rejects]


def stack_signatures(docs: list[Doc], num_perm: int) -> np.ndarray:
    return np.stack([d.meta["signature"] for d in docs]) if docs else np.zeros((0, num_perm), np.uint32)
