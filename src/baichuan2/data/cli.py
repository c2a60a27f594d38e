"""`baichuan2 data run | report | eval-dedup`."""

from __future__ import annotations

import json

from baichuan2.data.embed import EmbedArgs
from baichuan2.data.exact import ExactArgs
from baichuan2.data.language import LanguageArgs
from baichuan2.data.minhash import MinHashParams
from baichuan2.data.quality import QualityArgs
from baichuan2.data.safety import SafetyArgs
from baichuan2.data.score import ScoreArgs
from baichuan2.utils.io import InputError, as_paths


def run(inputs: str | list[str], out_dir: str = "runs/data", text_field: str = "text", workers: int = 2,
        executor: str = "local", ray_address: str | None = None, language: LanguageArgs = LanguageArgs(),
        quality: QualityArgs = QualityArgs(), safety: SafetyArgs = SafetyArgs(), exact: ExactArgs = ExactArgs(),
        minhash: MinHashParams = MinHashParams(), embed: EmbedArgs = EmbedArgs(), score: ScoreArgs = ScoreArgs(),
        overwrite: bool = False) -> None:
    """Clean, deduplicate, cluster and score a corpus into parquet shards for `baichuan2 tokenizer encode`.

    Steps: read (bad lines -> rejects) -> normalise -> language id (py3langid; recipe keep-list) -> quality filter -> harmful-content
    filter -> exact dedup of documents, paragraphs and sentences -> MinHash-LSH near-dup clusters ->
    embedding k-means + SemDeDup -> sampling weights. Writes out_dir/output/part-*.parquet (text, source,
    doc_id, cluster_id, dup_count, quality, weight, ...), out_dir/rejects/*.parquet (every removed
    document or span with step, reason and cluster), out_dir/report.md|json and cluster_sizes.png.
    Re-running the same command resumes after a crash; a recipe: `--config recipes/data-default.yaml`.

    Args:
        inputs: Files, globs or directories (.jsonl[.gz|.zst], .parquet, .txt); `tag=path` sets the source.
        out_dir: Output directory.
        text_field: JSON/parquet field holding the text.
        workers: Worker processes (local) or CPUs of a local Ray cluster.
        executor: "local" or "ray" (pip install 'baichuan2[ray]').
        ray_address: Address of an existing Ray cluster ("auto", "ray://head:10001").
        language: Language identifier and the languages to keep (empty keep-list: all).
        quality: Heuristic quality thresholds (Gopher/C4 style).
        safety: Harmful-content term lists / classifier and safety up-sampling.
        exact: Exact dedup of documents, paragraphs and sentences.
        minhash: MinHash-LSH parameters (permutations, bands x rows, n-grams, verification threshold).
        embed: Embedding encoder, k-means clusters and SemDeDup epsilon.
        score: Sampling weights from source, quality, duplication and semantic density.
        overwrite: Replace an existing run in out_dir made with a different recipe.
    """
    from baichuan2.data.pipeline import DataRecipe, run_pipeline

    if executor not in ("local", "ray"):
        raise SystemExit(f"data run: unknown executor {executor!r}; allowed: 'local' or 'ray'")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise SystemExit(f"data run: workers must be a positive integer, got {workers!r}")
    recipe = DataRecipe(inputs=as_paths(inputs), out_dir=out_dir,
                        text_field=text_field, workers=workers, executor=executor, ray_address=ray_address,
                        language=language, quality=quality, safety=safety, exact=exact, minhash=minhash,
                        embed=embed, score=score)
    try:
        report = run_pipeline(recipe, overwrite=overwrite)
    except InputError as e:
        raise SystemExit(f"data run: {e}") from None
    m = report["minhash"]
    langs = ", ".join(f"{k} {v}" for k, v in list(report["output_by_language"].items())[:8])
    print(f"done: {report['output_docs']} documents kept ({langs}); exact dups {m['exact_dups']}, near dups {m['near_dups']}, "
          f"semantic dups {report['semantic']['semantic_dups']}; report: {out_dir}/report.md")


def report(out_dir: str) -> None:
    """Print the markdown report of a finished run.

    Args:
        out_dir: The run's output directory.
    """
    from pathlib import Path

    path = Path(out_dir) / "report.md"
    if not path.exists():
        raise SystemExit(f"data report: {path} not found (has `baichuan2 data run` finished?)")
    print(path.read_text(encoding="utf-8"))


def eval_dedup(corpus: str = "../shared/data/dedup-eval/clough-stevenson-plagiarised-short-answers",
               synthetic_docs: int = 400, seed: int = 0, minhash: MinHashParams = MinHashParams(),
               out: str | None = None) -> None:
    """Precision/recall/F1 of near-duplicate detection at the given MinHash-LSH parameters.

    Two test sets: the Clough-Stevenson corpus of plagiarised short answers (each answer vs its Wikipedia
    source; categories cut / light / heavy revision are positives, non-plagiarised negatives) and a
    synthetic Chinese/English perturbation set built from the bundled corpus with exact ground truth
    (pairs whose true shingle Jaccard is >= the threshold are positives).

    Args:
        corpus: Directory of the Clough-Stevenson corpus (skipped when absent).
        synthetic_docs: Base documents for the synthetic set (each gets several perturbed copies).
        seed: Random seed of the synthetic perturbations.
        minhash: MinHash-LSH parameters under test.
        out: Optional JSON file for the results.
    """
    from baichuan2.data.dedup_eval import evaluate_all

    results = evaluate_all(corpus, synthetic_docs, seed, minhash)
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if out:
        from baichuan2.utils.io import atomic_write_json

        atomic_write_json(out, results)


COMMANDS = {"run": run, "report": report, "eval-dedup": eval_dedup}
