"""A tiny random model with a tokenizer trained on real English/Chinese dialogues (byte fallback for rare
Chinese characters, so one character often spans several tokens — the case streaming must get right)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest
import torch

from baichuan2.model import Baichuan, ModelConfig
from baichuan2.model.checkpoint import save_pretrained
from baichuan2.pipeline.corpus import chatterbot_documents
from baichuan2.tokenizer import Tokenizer
from baichuan2.tokenizer.train import train_tokenizer

CONTEXT = 192


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "dialogues.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        for doc in chatterbot_documents():
            fh.write(json.dumps({"text": doc["text"]}, ensure_ascii=False) + "\n")
    train_tokenizer([str(corpus)], str(root / "tok"), vocab_size=1024, max_sentences=50_000)
    tok = Tokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    model = Baichuan(ModelConfig.from_name("tiny-rope", vocab_size=tok.vocab_size, max_position_embeddings=CONTEXT))
    out = root / "ckpt"
    save_pretrained(model, out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def engine(checkpoint):
    from baichuan2.serve.engine import Engine

    return Engine(str(checkpoint))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """``app`` under a real uvicorn server on a free port, in a thread; yields its base URL."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def server(engine):
    """The FastAPI app under a real uvicorn server on a free port; yields (base_url, api_key)."""
    from baichuan2.serve.server import create_app

    key = "test-key"
    with running_server(create_app(engine, "tiny", api_key=key, default_max_tokens=16)) as url:
        yield url, key
