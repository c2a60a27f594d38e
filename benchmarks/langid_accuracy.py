"""Language identification on labelled text: py3langid vs lingua vs the old zh/en script rule.

Labelled sample: the chatterbot-corpus conversations (a pip package), one document per conversation
as the pipeline's corpus builder writes them, labelled by the corpus folder (26 languages; the
romanised `hinglish` folder has no ISO code and is left out).  Prints accuracy (overall and macro
over languages), the worst languages, throughput and memory, side by side.

    python benchmarks/langid_accuracy.py [--limit 0]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import Counter, defaultdict

from baichuan2.pipeline.corpus import chatterbot_documents

FOLDER_ISO = {"bengali": "bn", "chinese": "zh", "dutch": "nl", "english": "en", "french": "fr", "german": "de",
              "hebrew": "he", "hindi": "hi", "indonesian": "id", "italian": "it", "japanese": "ja", "korean": "ko",
              "marathi": "mr", "oriya": "or", "persian": "fa", "portuguese": "pt", "russian": "ru", "spanish": "es",
              "swedish": "sv", "tamil": "ta", "telugu": "te", "thai": "th", "traditionalchinese": "zh",
              "turkish": "tr", "ukrainian": "uk", "urdu": "ur", "yoruba": "yo"}


def labelled(limit: int = 0) -> list[tuple[str, str]]:
    out = []
    for doc in chatterbot_documents():
        folder = doc["doc_id"].split(":")[1].split("/")[0]
        if folder in FOLDER_ISO:
            out.append((doc["text"], FOLDER_ISO[folder]))
    return out[:limit] if limit else out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def py3langid_identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)
    return lambda texts: [ident.classify(t)[0] for t in texts], set(ident.nb_classes)


def lingua_identifier():
    from lingua import LanguageDetectorBuilder

    det = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()

    def run(texts):
        return [(r.iso_code_639_1.name.lower() if r is not None else "und") for r in det.detect_languages_in_parallel_of(texts)]

    from lingua import Language
    return run, {lang.iso_code_639_1.name.lower() for lang in Language.all()}


def script_rule():
    from baichuan2.data.text import detect_language

    return lambda texts: [detect_language(t) for t in texts], {"zh", "en"}


def evaluate(name, factory, data) -> dict:
    m0, t0 = rss_mb(), time.perf_counter()
    predict, known = factory()
    load_s = time.perf_counter() - t0
    texts = [t for t, _ in data]
    t0 = time.perf_counter()
    pred = predict(texts)
    secs = time.perf_counter() - t0
    per = defaultdict(Counter)
    for (_, gold), p in zip(data, pred):
        per[gold]["n"] += 1
        per[gold]["ok"] += p == gold
    covered = [g for g in per if g in known]
    acc_all = sum(per[g]["ok"] for g in per) / len(data)
    acc_cov = sum(per[g]["ok"] for g in covered) / max(1, sum(per[g]["n"] for g in covered))
    macro = sum(per[g]["ok"] / per[g]["n"] for g in covered) / max(1, len(covered))
    worst = sorted(covered, key=lambda g: per[g]["ok"] / per[g]["n"])[:5]
    return {"name": name, "acc": acc_all, "acc_known": acc_cov, "macro_known": macro, "known": len(covered),
            "docs_s": len(data) / secs, "load_s": load_s, "rss_mb": rss_mb() - m0,
            "worst": ", ".join(f"{g} {per[g]['ok'] / per[g]['n']:.2f}" for g in worst)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    data = labelled(args.limit)
    langs = Counter(g for _, g in data)
    print(f"{len(data)} labelled conversations, {len(langs)} languages")
    rows = [evaluate(n, f, data) for n, f in (("script rule (old zh/en)", script_rule),
                                              ("py3langid 0.4", py3langid_identifier),
                                              ("lingua 2.1 (all, high accuracy)", lingua_identifier))]
    print(f"{'identifier':34} {'acc':>6} {'acc*':>6} {'macro*':>6} {'langs*':>6} {'docs/s':>9} {'load s':>7} {'+RSS MB':>8}  worst*")
    for r in rows:
        print(f"{r['name']:34} {r['acc']:6.3f} {r['acc_known']:6.3f} {r['macro_known']:6.3f} {r['known']:6d} "
              f"{r['docs_s']:9.0f} {r['load_s']:7.2f} {r['rss_mb']:8.0f}  {r['worst']}")
    base = rows[1]["docs_s"]
    print("* over the languages the identifier knows; speed ratio lingua / py3langid: "
          f"{rows[2]['docs_s'] / base:.2f}")


if __name__ == "__main__":
    main()
