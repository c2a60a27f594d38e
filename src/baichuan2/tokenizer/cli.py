"""`baichuan2 tokenizer train | encode | stats`."""

from __future__ import annotations

from baichuan2.utils.io import atomic_write_json


def train(inputs: str | list[str], out_dir: str, vocab_size: int = 125696, text_field: str = "text",
          character_coverage: float = 0.9999, max_sentences: int = 2_000_000, reserved: int | None = None,
          seed: int = 0, threads: int = 0, fit_coverage: bool = True, overwrite: bool = False) -> None:
    """Train a SentencePiece BPE tokenizer with Baichuan 2's settings.

    No normalisation, no dummy prefix, digits split, byte fallback, whitespace-only pieces,
    pieces up to 32 characters; chat role tokens at ids 195/196 (or 5/6 below 1,024 pieces).

    Args:
        inputs: a file, glob or directory (.txt, .jsonl[.gz|.zst], .parquet), or a list '[a.jsonl, web=b/*.jsonl]';
            `tag=path` names the source (default: the file name).
        out_dir: where tokenizer.model, the HF tokenizer files and train_report.json go.
        vocab_size: vocabulary size (Baichuan 2: 125,696).
        text_field: JSONL/parquet field holding the text.
        character_coverage: share of characters covered by pieces; the rest falls back to UTF-8 bytes.
        max_sentences: lines sampled (reservoir, seeded) for training, to bound memory.
        reserved: number of <reserved_N> tokens (default: 1000 for vocabularies >= 100k, else 108).
        seed: sampling seed.
        threads: trainer threads (0 = all cores).
        fit_coverage: lower the coverage when a small vocabulary cannot hold every covered character.
        overwrite: replace an existing tokenizer in out_dir.
    """
    from baichuan2.tokenizer.train import train_tokenizer

    train_tokenizer(inputs, out_dir, vocab_size=vocab_size, text_field=text_field,
                    character_coverage=character_coverage, max_sentences=max_sentences, reserved=reserved,
                    seed=seed, threads=threads, fit_coverage=fit_coverage, overwrite=overwrite)


def encode(inputs: str | list[str], out_dir: str, tokenizer: str, text_field: str = "text", docs_per_shard: int = 20000,
           workers: int = 0, overwrite: bool = False) -> None:
    """Encode a corpus into packed uint32 token shards for pretraining (parallel, resumable).

    Each document is followed by EOS; per-document sampling weight, source and id (from the data
    pipeline's parquet output, when present) go into each shard's index. Re-running the same command
    skips finished shards.

    Args:
        inputs: a file, glob or directory (.txt, .jsonl[.gz|.zst], .parquet), or a list '[a.jsonl, web=b/*.jsonl]';
            `tag=path` names the source.
        out_dir: output directory for shard-NNNNN.bin / .idx.parquet and manifest.json.
        tokenizer: tokenizer.model file or a directory holding one.
        text_field: JSONL/parquet field holding the text.
        docs_per_shard: documents per shard (the unit of resumption).
        workers: encoding processes (0 = one per core).
        overwrite: delete existing shards in out_dir first.
    """
    from baichuan2.tokenizer.encode import encode_corpus

    encode_corpus(inputs, out_dir, tokenizer, text_field=text_field, docs_per_shard=docs_per_shard,
                  workers=workers, overwrite=overwrite)


def stats(tokenizers: str | list[str], inputs: str | list[str], text_field: str = "text", max_docs: int = 0,
          json_out: str | None = None) -> None:
    """Compression report for one or more tokenizers on the same text, by source and language.

    Compression rate = tokens per character (lower is better), the scale of the paper's Table 2
    (Baichuan 2: 0.498 on the paper's own corpus). Bytes per token are shown alongside.

    Args:
        tokenizers: a tokenizer.model file / directory or HF tokenizer.json, or a list of them '[a, b]'.
        inputs: a text/JSONL/parquet file, glob or directory, or a list of them (`tag=path` names a source).
        text_field: JSONL/parquet field holding the text.
        max_docs: read at most this many documents (0 = all).
        json_out: also write the numbers to this JSON file.
    """
    from baichuan2.tokenizer.stats import compression_stats, print_stats

    if isinstance(tokenizers, str):
        tokenizers = [tokenizers]
    result = compression_stats(tokenizers, inputs, text_field=text_field, max_docs=max_docs)
    print_stats(result)
    if json_out:
        atomic_write_json(json_out, result)


COMMANDS = {"train": train, "encode": encode, "stats": stats}
