"""`baichuan2 serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: GET / (a web chat page; /api/info and /api/markdown serve it), POST /v1/chat/completions and /v1/completions (both with ``stream``),
GET /v1/models, GET /health (503 when the scheduler stopped making progress), GET /metrics (Prometheus).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input (roles,
context length), 401 for a missing/wrong bearer token, 404 for an unknown model, 422 for a body that
doesn't match the schema (every numeric field must be finite and within its range; the field is named),
429 with ``Retry-After`` when the request queue is full, 503 while shutting down.

Handlers never block the event loop: they await the engine's per-request asyncio queues, and a client that
disconnects cancels its sequence (streaming: the response task is cancelled; non-streaming: polled).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Literal

from fastapi import Request  # module level: FastAPI resolves the handlers' (string) annotations here
from pydantic import BaseModel, ConfigDict, Field

from baichuan2.serve.engine import Delta, Engine, Overloaded
from baichuan2.serve.markdown import render_markdown
from baichuan2.utils.io import InputError

ASSETS = Path(__file__).parent / "assets"
MAX_SEED = 2**63 - 1


class ChatMessage(BaseModel):
    role: str
    content: str = Field(max_length=1_000_000)


class _Sampling(BaseModel):
    # Bounds keep every value finite and meaningful; out-of-range values are 422s naming the field.
    model_config = ConfigDict(allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)  # extension (Baichuan's defaults use it)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)  # extension
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = Field(default=None, max_length=16)
    stream: bool = False
    n: Literal[1] = 1  # one completion per request
    ignore_eos: bool = False  # extension (as vLLM): generate max_tokens whatever the model says (benchmarks)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)


class CompletionRequest(_Sampling):
    prompt: str = Field(max_length=10_000_000)


class MarkdownRequest(BaseModel):
    text: str = Field(max_length=1_000_000)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers, self.param = (status, message, kind, code,
                                                                                     headers, param)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, default_max_tokens: int | None = None):
    """The FastAPI app.  ``default_max_tokens`` applies when a request sets none (default: up to 512, at
    most half the context length, and never more than the room a completion prompt leaves)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

    app = FastAPI(title="baichuan2", version="1")
    app.state.engine = engine

    def error(status, message, kind="invalid_request_error", code=None, headers=None, param=None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                            headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error(e.status, e.message, e.kind, e.code, e.headers, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        errs = e.errors()
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in errs)
        param = ".".join(str(x) for x in errs[0]["loc"][1:]) if errs else None
        return error(422, f"invalid request: {problems}", param=param or None)

    if api_key:
        # A plain ASGI middleware, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware relays every
        # streamed chunk through an extra memory stream and task, a cost paid per token per stream.
        expected = f"Bearer {api_key}".encode()

        def bearer_auth(app):  # (Starlette builds middleware as factory(app=next_app))
            async def guarded(scope, receive, send):
                if scope["type"] == "http" and scope["path"].startswith("/v1") and \
                        dict(scope["headers"]).get(b"authorization", b"") != expected:
                    denied = error(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                   "authentication_error", "invalid_api_key")
                    return await denied(scope, receive, send)
                return await app(scope, receive, send)
            return guarded

        app.add_middleware(bearer_auth)

    def check(req: _Sampling):
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {model_name!r}",
                           code="model_not_found")
        try:
            cfg = engine.sampling(max_new_tokens=engine.default_max_tokens(req.max_tokens, default_max_tokens or 512),
                                  temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                  repetition_penalty=req.repetition_penalty, seed=req.seed)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        if req.ignore_eos:
            cfg = replace(cfg, stop_token_ids=[])
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return cfg, stops

    def prompt_ids(fn, *args):
        try:
            return fn(*args)
        except InputError as e:
            raise APIError(400, str(e), code="context_length_exceeded" if "context" in str(e) else None) from None

    def start(ids, cfg, stops):
        """Submit now, so a full queue is a 429 (shutting down: 503) before any response starts."""
        try:
            return engine.astream(ids, cfg, stops)
        except Overloaded as e:
            raise APIError(503 if e.shutting_down else 429, str(e), "server_error" if e.shutting_down else
                           "rate_limit_error", headers={"Retry-After": str(e.retry_after)}) from None
        except InputError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None

    async def deltas(stream):
        try:
            async for d in stream:
                yield d
        finally:  # the client went away (the task was cancelled) or the stream ended
            stream.cancel()

    async def collect(request: Request, stream) -> Delta:
        """The whole completion, cancelled if the client goes away meanwhile."""
        async def gather():
            return [d async for d in deltas(stream)]

        task = asyncio.ensure_future(gather())
        try:
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    raise APIError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()
                stream.cancel()
        parts = task.result()
        last = parts[-1]
        return Delta("".join(p.text for p in parts), last.finish_reason, last.prompt_tokens,
                     last.completion_tokens, last.cached_tokens)

    def usage(d: Delta) -> dict:
        return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
                "total_tokens": d.prompt_tokens + d.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": d.cached_tokens}}

    async def sse(chunks):
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    @app.get("/health")
    async def health():
        if engine.healthy:
            return {"status": "ok", "model": model_name}
        reason = engine.error or f"scheduler made no progress for {engine.stall_timeout:g} s"
        return JSONResponse({"status": "unhealthy", "model": model_name, "reason": reason}, 503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index():
        return FileResponse(ASSETS / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/api/info")
    async def info():
        d = engine.defaults
        return {"model": model_name, "max_model_len": engine.max_length,
                "default_max_tokens": engine.default_max_tokens(None, default_max_tokens or 512),
                "sampling": {"temperature": d.temperature if d.do_sample else 0, "top_p": d.top_p, "top_k": d.top_k,
                             "repetition_penalty": d.repetition_penalty}}

    @app.post("/api/markdown")
    async def markdown(body: MarkdownRequest):
        return {"html": render_markdown(body.text)}

    @app.get("/assets/{name}")
    async def asset(name: str):
        path = ASSETS / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise APIError(404, f"no asset {name!r}", code="not_found")
        return FileResponse(path)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "baichuan2",
                                            "max_model_len": engine.max_length}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        cfg, stops = check(req)
        messages = [m.model_dump() for m in req.messages]
        ids = prompt_ids(engine.chat_prompt, messages, cfg.max_new_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = start(ids, cfg, stops)
        if req.stream:
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}

            async def chunks():
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]}
                async for d in deltas(stream):
                    if d.text:
                        yield {**base, "choices": [{"index": 0, "delta": {"content": d.text}, "finish_reason": None}]}
                    if d.finish_reason:
                        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": d.finish_reason}],
                               "usage": usage(d)}
            return StreamingResponse(sse(chunks()), media_type="text/event-stream")
        d = await collect(request, stream)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": d.text},
                             "finish_reason": d.finish_reason}], "usage": usage(d)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.max_tokens is None:  # default: whatever room the prompt leaves, up to the usual default
            room = engine.max_length - 1 - len(engine.tok.encode(req.prompt))
            req.max_tokens = max(1, min(room, engine.default_max_tokens(None, default_max_tokens or 512)))
        cfg, stops = check(req)
        ids = prompt_ids(engine.text_prompt, req.prompt, cfg.max_new_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        stream = start(ids, cfg, stops)
        if req.stream:
            async def chunks():
                async for d in deltas(stream):
                    if d.text or d.finish_reason:
                        chunk = {**base, "choices": [{"index": 0, "text": d.text, "finish_reason": d.finish_reason}]}
                        if d.finish_reason:
                            chunk["usage"] = usage(d)
                        yield chunk
            return StreamingResponse(sse(chunks()), media_type="text/event-stream")
        d = await collect(request, stream)
        return {**base, "choices": [{"index": 0, "text": d.text, "finish_reason": d.finish_reason}], "usage": usage(d)}

    return app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, max_tokens: int | None = None, dtype: str = "auto", device: str = "auto",
          max_seqs: int = 64, max_queue: int = 512, kv_cache_tokens: int | None = None, prefill_chunk: int = 256,
          prefix_cache_tokens: int = 16384, threads: int = 0, shutdown_deadline: float = 20.0,
          quantize: str | None = None) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with a web chat page at `/`.

    Use it with any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)` and
    `client.chat.completions.create(model=NAME, messages=[...], stream=True)`. Sampling defaults come from
    the checkpoint's generation_config.json (Baichuan 2 chat: temperature 0.3, top_k 5, top_p 0.85,
    repetition penalty 1.05); requests may override temperature, top_p, top_k, repetition_penalty,
    max_tokens, stop and seed. Requests are batched continuously (one scheduler thread owns the model).
    SIGTERM/Ctrl-C stops admission, lets active streams finish for `shutdown_deadline` seconds, cancels the
    rest and exits 0. Prometheus metrics at /metrics, health at /health, one log line per request.

    Args:
        checkpoint: Model directory (HF layout with tokenizer).
        host: Interface to bind (0.0.0.0 to accept remote clients).
        port: TCP port.
        model_name: Name clients must pass as `model` (default: the directory name).
        api_key: Require `Authorization: Bearer <api_key>` on /v1 routes.
        max_tokens: Default completion length when a request doesn't set max_tokens (default: 512 capped at
            half the model's context length).
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
        max_seqs: Sequences decoded together at most.
        max_queue: Requests waiting for admission at most; more are answered 429 with Retry-After.
        kv_cache_tokens: KV-cache budget in tokens (prompt + max_tokens reserved per sequence; default
            max_seqs x context length).
        prefill_chunk: Prompt tokens computed per scheduler iteration.
        prefix_cache_tokens: Prompt-prefix tokens kept for reuse (0 = off).
        threads: torch intra-op threads of the model's steps (0 = chosen while serving from measured step
            times, between one per physical core and one fewer, which leaves a core to the HTTP server
            and wins when other processes load the machine).
        shutdown_deadline: Seconds active streams get to finish after SIGTERM.
        quantize: int8 | int4: weight-only quantize a full-precision checkpoint on load.
    """
    import logging
    import os

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = Engine(checkpoint, dtype=dtype, device=device, max_seqs=max_seqs, max_queue=max_queue,
                    kv_cache_tokens=kv_cache_tokens, prefill_chunk=prefill_chunk,
                    prefix_cache_tokens=prefix_cache_tokens, quantize=quantize, threads=threads)
    name = model_name or Path(os.path.abspath(checkpoint)).name
    app = create_app(engine, name, api_key or os.environ.get("BAICHUAN2_API_KEY"), max_tokens)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # first signal: drain (stop admitting, cancel after the deadline)
            if engine.accepting:
                engine.drain(shutdown_deadline)
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal once shut down (the process would die "killed by SIGTERM");
            # a drained shutdown is a clean one: exit 0.
            getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=int(shutdown_deadline) + 5)
    print(f"serving {name!r} from {checkpoint} at http://{host}:{port}/v1 (chat page: http://{host}:{port}/)",
          flush=True)
    Server(config).run()
    engine.close()


COMMANDS = serve
