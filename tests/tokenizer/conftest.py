from __future__ import annotations

import json

import pytest

from baichuan2.pipeline.corpus import chatterbot_documents, stdlib_documents
from baichuan2.tokenizer.train import train_tokenizer


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A few MB of real text: stdlib docs/code and chatterbot dialogues (English + Chinese)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for doc in stdlib_documents(code_bytes=1_500_000, docs_bytes=500_000):
            fh.write(json.dumps({"text": doc["text"], "source": doc["source"]}, ensure_ascii=False) + "\n")
        for doc in chatterbot_documents():
            fh.write(json.dumps({"text": doc["text"], "source": doc["source"]}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok2k"
    train_tokenizer([str(small_corpus)], str(out), vocab_size=2048, max_sentences=100_000)
    return out
