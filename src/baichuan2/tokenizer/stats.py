"""Compression statistics of one or more tokenizers on the same text.

Definition used (the paper gives none): **compression rate = tokens per
character** of the input text (lower is better), on the same corpus for every
tokenizer.  This matches the scale of the paper's Table 2 (LLaMA 2 1.037,
Baichuan 2 0.498 on Chinese-heavy text: Chinese characters cost LLaMA ~1+
tokens each and Baichuan 2 ~0.5).  Bytes per token (UTF-8) is reported too;
rates are broken down by source tag and by language: the ``lang`` tag the
data pipeline wrote (``baichuan2.data.schema.OUTPUT_SCHEMA``), or for untagged
input the same identifier the pipeline uses (py3langid, ISO 639 codes), so a
Japanese or Korean dialogue never counts as Chinese.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from baichuan2.data.language import identify
from baichuan2.tokenizer.corpus import iter_documents

PAPER_TABLE_2 = {"LLaMA 2": 1.037, "Bloom": 0.501, "ChatGLM 2": 0.527, "Baichuan 1": 0.570, "Baichuan 2": 0.498}


def language(doc: dict | str) -> str:
    """A document's language: its pipeline tag when it has one, else identified from the text."""
    if isinstance(doc, str):
        return identify(doc)
    return doc.get("lang") or identify(doc["text"])


def load_encoder(path: str) -> tuple[str, Callable[[list[str]], list[list[int]]]]:
    """A tokenizer from a SentencePiece model/dir (ours, Baichuan's) or a HF ``tokenizer.json``."""
    p = Path(path)
    if p.suffix == ".json" or (p.is_dir() and (p / "tokenizer.json").exists() and not (p / "tokenizer.model").exists()):
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(str(p if p.suffix == ".json" else p / "tokenizer.json"))
        return p.stem if p.suffix == ".json" else p.name, lambda texts: [
            e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    from baichuan2.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(p)
    name = p.parent.name if p.is_file() else p.name
    return name, lambda texts: tok.encode_batch(texts)


def compression_stats(tokenizers: Sequence[str], inputs: Sequence[str], text_field: str = "text",
                      max_docs: int = 0) -> dict:
    """``{tokenizer: {group: {"chars", "bytes", "tokens", "tokens_per_char", "bytes_per_token"}}}``."""
    docs = []
    for i, doc in enumerate(iter_documents(inputs, text_field)):
        if max_docs and i >= max_docs:
            break
        if doc["text"]:
            docs.append(doc)
    texts = [d["text"] for d in docs]
    groups = [("all", f"source:{d['source']}", f"lang:{language(d)}") for d in docs]
    result: dict = {}
    for path in tokenizers:
        name, encode = load_encoder(path)
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for start in range(0, len(texts), 2048):
            batch = texts[start:start + 2048]
            for text, ids, keys in zip(batch, encode(batch), groups[start:start + 2048]):
                for key in keys:
                    t = totals[key]
                    t[0] += len(text)
                    t[1] += len(text.encode("utf-8"))
                    t[2] += len(ids)
        result[name] = {key: {"chars": c, "bytes": b, "tokens": n, "tokens_per_char": n / max(c, 1),
                              "bytes_per_token": b / max(n, 1)}
                        for key, (c, b, n) in sorted(totals.items())}
    return result


def print_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="compression rate = tokens per character (lower is better); bytes per token in brackets")
    names = list(stats)
    table.add_column("text")
    for name in names:
        table.add_column(name, justify="right")
    first = stats[names[0]]
    total = max(1, first.get("all", {}).get("chars", 1))
    # Every source; languages with at least 1% of the characters (the rare tail stays in the returned dict).
    keys = sorted((k for k in {k for per in stats.values() for k in per}
                   if not k.startswith("lang:") or first.get(k, {}).get("chars", 0) >= 0.01 * total),
                  key=lambda k: (k != "all", k))
    for key in keys:
        row = [f"{key} ({stats[names[0]][key]['chars']:,} chars)" if key in stats[names[0]] else key]
        for name in names:
            s = stats[name].get(key)
            row.append(f"{s['tokens_per_char']:.3f} ({s['bytes_per_token']:.2f})" if s else "-")
        table.add_row(*row)
    Console().print(table)
    print("paper Table 2 (its corpus, not this one): " + ", ".join(f"{k} {v}" for k, v in PAPER_TABLE_2.items()))


def tokenizer_label(path: str | os.PathLike) -> str:
    p = Path(path)
    return p.parent.name if p.is_file() else p.name
