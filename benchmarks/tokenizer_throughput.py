"""Tokenizer encoding throughput: ours vs HF `tokenizers` (same vocabulary) vs a naive sentencepiece loop.

Corpus (>= 50 MB of real offline text, built once into --cache): every Python source file of the
running interpreter's standard library (English prose in docstrings + code), the language reference
(pydoc_data), chatterbot-corpus dialogues, fortunes-zh if installed, and the Chinese/English benchmark
files under ../shared/data/bench when present.

Contenders, all on the same documents and the same vocabulary (the real Baichuan 2 tokenizer by
default; HF's is converted from it with transformers' SentencePiece converter and checked to give
identical ids):
  * ours, in memory: `Tokenizer.encode_batch` (SentencePiece C++ with N threads);
  * ours, end to end: `baichuan2 tokenizer encode` (read JSONL, N worker processes, write uint32 shards);
  * HF tokenizers: `Tokenizer.encode_batch` (Rust, RAYON_NUM_THREADS=N);
  * naive: `[sp.encode(t) for t in docs]` in one Python thread.

    python benchmarks/tokenizer_throughput.py [--tokenizer DIR] [--threads 2] [--min-mb 50]
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_corpus(path: Path, min_mb: float) -> None:
    from baichuan2.pipeline.corpus import chatterbot_documents, chinese_documents

    docs = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts:
            continue
        try:
            docs.append({"text": p.read_text(encoding="utf-8"), "source": "code"})
        except (UnicodeDecodeError, OSError):
            continue
    import pydoc_data.topics as topics

    docs += [{"text": t, "source": "docs"} for t in topics.topics.values()]
    docs += [{"text": d["text"], "source": d["source"]} for d in chatterbot_documents()]
    docs += [{"text": d["text"], "source": "zh"} for d in chinese_documents()]
    bench = REPO.parent / "shared" / "data" / "bench"
    for f in sorted(bench.rglob("*")) if bench.exists() else []:
        if f.suffix in (".csv", ".jsonl", ".json") and f.is_file():
            docs.append({"text": f.read_text(encoding="utf-8", errors="replace"), "source": "bench"})
    size = sum(len(d["text"].encode()) for d in docs)
    copies = 1
    while size * copies < min_mb * 1e6:  # only if the machine's text is short of the target
        copies += 1
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(copies):
            for d in docs:
                fh.write(json.dumps(d, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "baichuan2-tokenizer"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--min-mb", type=float, default=50)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "baichuan2_tokenizer_bench.jsonl"))
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before tokenizers spins up its pool

    import sentencepiece as spm
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    from baichuan2.tokenizer import Tokenizer
    from baichuan2.tokenizer.encode import encode_corpus

    cache = Path(args.cache)
    if not cache.exists():
        build_corpus(cache, args.min_mb)
    texts = [json.loads(line)["text"] for line in cache.open(encoding="utf-8")]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    ours = Tokenizer.from_pretrained(args.tokenizer)
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(ours.model_file.read_bytes())
    hf = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)})
    sp = spm.SentencePieceProcessor(model_file=str(ours.model_file))
    print(f"corpus: {len(texts):,} documents, {mb:.1f} MB; tokenizer {ours.model_file} (vocab {ours.vocab_size}); "
          f"threads {args.threads}")

    results = {}
    t0 = time.perf_counter()
    ids_ours = ours.encode_batch(texts, num_threads=args.threads)
    results["ours: Tokenizer.encode_batch"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids_hf = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    results["HF tokenizers: encode_batch"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in texts[: max(1, len(texts) // 4)]:  # a quarter is enough to time a single-thread loop
        sp.encode(t)
    results["naive sentencepiece loop (1 thread)"] = (time.perf_counter() - t0) * len(texts) / max(1, len(texts) // 4)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        encode_corpus([str(cache)], tmp, str(ours.model_file), docs_per_shard=2000, workers=args.threads)
        results["ours end-to-end: JSONL -> uint32 shards"] = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(ids_ours, ids_hf))
    tokens = sum(len(i) for i in ids_ours)
    print(f"identical ids ours vs HF: {same}/{len(texts)} documents; {tokens:,} tokens")
    base = results["HF tokenizers: encode_batch"]
    print(f"{'contender':<42}{'seconds':>9}{'MB/s':>9}{'vs HF':>8}")
    for name, secs in results.items():
        print(f"{name:<42}{secs:>9.2f}{mb / secs:>9.2f}{base / secs:>7.2f}x")


if __name__ == "__main__":
    main()
