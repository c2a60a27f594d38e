"""The server under adversarial clients: disconnects, floods, a full queue, a stalled scheduler, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import _free_port

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "你好，今天天气怎么样？"}], "temperature": 0}
REPO = Path(__file__).resolve().parents[2]


def _finished(engine, reason: str) -> float:
    return engine.metrics.registry.get_sample_value("baichuan2_requests_finished_total",
                                                    {"finish_reason": reason}) or 0.0


def test_disconnect_cancels_and_the_next_request_is_answered_within_a_second(server, engine):
    url, key = server
    headers = {"Authorization": f"Bearer {key}"}
    cancelled_before = _finished(engine, "cancelled")
    body = {**CHAT, "max_tokens": 150, "stream": True, "temperature": 1.0, "seed": 1}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/chat/completions", json=body,
                                                 headers=headers) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is running ...
    # ... and the client is gone (connection closed)
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, headers=headers, timeout=60)
    assert r.status_code == 200 and time.perf_counter() - t0 < 1.0
    deadline = time.time() + 30
    while _finished(engine, "cancelled") == cancelled_before:
        assert time.time() < deadline, "the abandoned stream was never cancelled"
        time.sleep(0.02)


def test_200_concurrent_streams_all_complete(server, engine):
    url, key = server

    async def one(client, i):
        body = {**CHAT, "max_tokens": 6, "stream": True, "temperature": 1.0, "seed": i}
        text, finish = "", None
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["delta"].get("content") or ""
                    finish = choice["finish_reason"] or finish
        return finish

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(timeout=300, limits=limits, headers={"Authorization": f"Bearer {key}"}) as c:
            return await asyncio.gather(*(one(c, i) for i in range(200)))

    finishes = asyncio.run(main())
    assert len(finishes) == 200 and all(f in ("stop", "length") for f in finishes)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_full_queue_answers_429_with_retry_after(checkpoint):
    from fastapi.testclient import TestClient

    from baichuan2.serve.engine import Engine, Overloaded
    from baichuan2.serve.server import create_app

    engine = Engine(str(checkpoint), max_seqs=1, max_queue=2)
    cfg = engine.sampling(temperature=0, max_new_tokens=150)
    ids = engine.text_prompt("Hello", 150)
    release, step = threading.Event(), engine.batcher.step
    engine.batcher.step = lambda: (release.wait(60), step())  # a busy scheduler: nothing leaves the queue
    held = []
    try:
        with pytest.raises(Overloaded):
            for _ in range(4):  # at most one is taken by the (stuck) scheduler, two wait, then the queue is full
                held.append(engine.submit(ids, cfg, lambda token, finish: None))
        with TestClient(create_app(engine, "tiny")) as client:
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "too many requests" in r.json()["error"]["message"]
            for req in held:
                req.cancelled = True
            release.set()
            deadline = time.time() + 60
            while engine.batcher.has_work or engine.queued:
                assert time.time() < deadline
                time.sleep(0.02)
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200
            engine.drain(0)
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503 and "retry-after" in r.headers
    finally:
        release.set()
        engine.close()


def test_health_turns_unhealthy_when_the_scheduler_stalls_and_metrics_are_exported(checkpoint):
    from fastapi.testclient import TestClient

    from baichuan2.serve.engine import Engine
    from baichuan2.serve.server import create_app

    engine = Engine(str(checkpoint), stall_timeout=0.3)
    release = threading.Event()
    step = engine.batcher.step

    def stuck_step():  # a step that hangs (e.g. a wedged device) until released
        release.wait(60)
        step()

    try:
        with TestClient(create_app(engine, "tiny")) as client:
            r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
            assert r.status_code == 200 and client.get("/health").status_code == 200
            metrics = client.get("/metrics").text
            for name in ("baichuan2_requests_running", "baichuan2_requests_waiting",
                         "baichuan2_time_to_first_token_seconds_count", "baichuan2_inter_token_latency_seconds",
                         "baichuan2_generation_tokens_per_second", "baichuan2_kv_cache_usage_ratio"):
                assert name in metrics
            assert engine.metrics.registry.get_sample_value("baichuan2_time_to_first_token_seconds_count") == 1
            engine.batcher.step = stuck_step
            engine.submit(engine.text_prompt("Hi", 2), engine.sampling(max_new_tokens=2), lambda t, f: None)
            time.sleep(0.8)
            r = client.get("/health")
            assert r.status_code == 503 and "no progress" in r.json()["reason"]
            release.set()
            deadline = time.time() + 30
            while client.get("/health").status_code != 200:
                assert time.time() < deadline
                time.sleep(0.05)
    finally:
        release.set()
        engine.close()


def test_default_max_tokens_fits_the_context(engine):
    from fastapi.testclient import TestClient

    from baichuan2.serve.server import create_app
    from tests.serve.conftest import CONTEXT

    assert engine.default_max_tokens(None) == CONTEXT // 2 and engine.default_max_tokens(7) == 7
    with TestClient(create_app(engine, "tiny")) as client:  # no default given: derived from the context
        r = client.post("/v1/chat/completions", json={**CHAT})
        assert r.status_code == 200, r.text
        prompt = "word " * 60
        n = len(engine.text_prompt(prompt, 0))
        assert CONTEXT // 2 < n < CONTEXT - 2  # the usual default would not fit; what is left is used instead
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "stop": []})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= CONTEXT - n


def test_sigterm_mid_stream_exits_cleanly(checkpoint):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "baichuan2.cli", "serve", str(checkpoint), "--port", str(port),
                             "--model_name", "tiny", "--shutdown_deadline", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "no start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {**CHAT, "max_tokens": 180, "stream": True, "temperature": 1.0, "seed": 3}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0  # generous: the shared CI machine may be loaded
        assert events[-1] == "data: [DONE]"  # the stream was finished or cancelled, never cut mid-air
        last = json.loads(events[-2][6:])["choices"][0]["finish_reason"]
        assert last in ("stop", "length", "cancelled")
        log = proc.stdout.read()
        assert "request 1:" in log  # one log line per request
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
