"""`baichuan2 serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (both with ``stream``),
GET /health.  Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 for bad input
(roles, context length, sampling values), 401 for a missing/wrong bearer token, 404 for an unknown
model, 422 for a body that doesn't match the schema.  Generation runs in a worker thread under the
engine's lock, so the event loop stays responsive and concurrent requests queue.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from baichuan2.serve.engine import Delta, Engine
from baichuan2.utils.io import InputError


class ChatMessage(BaseModel):
    role: str
    content: str


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # extension (Baichuan's defaults use it)
    repetition_penalty: float | None = Field(default=None, gt=0)  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1  # one completion per request


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def create_app(engine: Engine, model_name: str, api_key: str | None = None, default_max_tokens: int = 512):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="baichuan2", version="1")

    def error(status, message, kind="invalid_request_error", code=None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error(e.status, e.message, e.kind, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:])}: {err['msg']}" for err in e.errors())
        return error(422, f"invalid request: {problems}")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(401, "missing or invalid API key (Authorization: Bearer <key>)",
                             "authentication_error", "invalid_api_key")
        return await call_next(request)

    def check(req: _Sampling):
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {model_name!r}",
                           code="model_not_found")
        try:
            cfg = engine.sampling(max_new_tokens=req.max_tokens or default_max_tokens, temperature=req.temperature,
                                  top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty,
                                  seed=req.seed)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return cfg, stops

    def prompt_ids(fn, *args):
        try:
            return fn(*args)
        except InputError as e:
            raise APIError(400, str(e), code="context_length_exceeded" if "context" in str(e) else None) from None

    def usage(d: Delta) -> dict:
        return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
                "total_tokens": d.prompt_tokens + d.completion_tokens}

    def sse(chunks):
        for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "baichuan2"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        cfg, stops = check(req)
        messages = [m.model_dump() for m in req.messages]
        ids = prompt_ids(engine.chat_prompt, messages, cfg.max_new_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
        if req.stream:
            def chunks():
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]}
                for d in engine.stream(ids, cfg, stops):
                    if d.text:
                        yield {**base, "choices": [{"index": 0, "delta": {"content": d.text}, "finish_reason": None}]}
                    if d.finish_reason:
                        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": d.finish_reason}],
                               "usage": usage(d)}
            return StreamingResponse(sse(chunks()), media_type="text/event-stream")
        d = await run_in_threadpool(engine.complete, ids, cfg, stops)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": d.text},
                             "finish_reason": d.finish_reason}], "usage": usage(d)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        cfg, stops = check(req)
        ids = prompt_ids(engine.text_prompt, req.prompt, cfg.max_new_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        if req.stream:
            def chunks():
                for d in engine.stream(ids, cfg, stops):
                    if d.text or d.finish_reason:
                        chunk = {**base, "choices": [{"index": 0, "text": d.text, "finish_reason": d.finish_reason}]}
                        if d.finish_reason:
                            chunk["usage"] = usage(d)
                        yield chunk
            return StreamingResponse(sse(chunks()), media_type="text/event-stream")
        d = await run_in_threadpool(engine.complete, ids, cfg, stops)
        return {**base, "choices": [{"index": 0, "text": d.text, "finish_reason": d.finish_reason}], "usage": usage(d)}

    return app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          api_key: str | None = None, max_tokens: int = 512, dtype: str = "auto", device: str = "auto") -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API.

    Use it with any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)` and
    `client.chat.completions.create(model=NAME, messages=[...], stream=True)`. Sampling defaults come from
    the checkpoint's generation_config.json (Baichuan 2 chat: temperature 0.3, top_k 5, top_p 0.85,
    repetition penalty 1.05); requests may override temperature, top_p, top_k, repetition_penalty,
    max_tokens, stop and seed. Stop with Ctrl-C (in-flight requests finish first).

    Args:
        checkpoint: Model directory (HF layout with tokenizer).
        host: Interface to bind (0.0.0.0 to accept remote clients).
        port: TCP port.
        model_name: Name clients must pass as `model` (default: the directory name).
        api_key: Require `Authorization: Bearer <api_key>` on /v1 routes.
        max_tokens: Default completion length when a request doesn't set max_tokens.
        dtype: auto | float32 | bfloat16 | float16.
        device: auto | cpu | cuda | cuda:N.
    """
    import os
    from pathlib import Path

    import uvicorn

    engine = Engine(checkpoint, dtype=dtype, device=device)
    name = model_name or Path(os.path.abspath(checkpoint)).name
    app = create_app(engine, name, api_key or os.environ.get("BAICHUAN2_API_KEY"), max_tokens)
    print(f"serving {name!r} from {checkpoint} at http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


COMMANDS = serve
