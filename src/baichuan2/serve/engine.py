"""The serving engine: one scheduler thread owns the model and runs continuous batching (`Batcher`).

Requests enter a bounded queue (`submit` raises `Overloaded` when it is full or the engine is draining);
every iteration the scheduler admits what fits the KV-cache budget, prefills in chunks, decodes all running
sequences in one batched step and retires finished or cancelled ones.  Each request's tokens flow back
through its own queue — a `queue.Queue` for the synchronous `stream` (chat CLI), an asyncio queue fed with
``call_soon_threadsafe`` for `astream` (HTTP) — so nothing holds a lock across a yield and a slow or vanished
client never stalls the others: closing a stream cancels its sequence, which leaves at the next iteration.

Text is produced incrementally (vLLM-style prefix/read offsets): a trailing U+FFFD (a Chinese character or
emoji whose bytes span several tokens) is held back until the character is complete, and text that could be
the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from baichuan2.model.generate import Batcher, Request, SamplingConfig
from baichuan2.serve.metrics import Metrics
from baichuan2.serve.threads import ThreadTuner
from baichuan2.tokenizer.chat import Message, build_chat_input
from baichuan2.utils.io import InputError

log = logging.getLogger("baichuan2.serve")


class Overloaded(Exception):
    """The request queue is full, or the engine no longer admits requests (shutting down)."""

    def __init__(self, message: str, retry_after: int = 1, shutting_down: bool = False):
        super().__init__(message)
        self.retry_after, self.shutting_down = retry_after, shutting_down


@dataclass
class Delta:
    text: str  # new text since the previous delta
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """Token ids in, printable text deltas out (incremental decoding, stop strings held back and cut)."""

    def __init__(self, tok, stop: Sequence[str] = ()):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is already text; decoding from `prefix` keeps spacing
        self.text, self.shown = "", 0
        self.stopped = False

    def push(self, token: int | None) -> str:
        """Add a token (None = the sequence ended: flush what was held back); return the text to show."""
        if token is not None:
            self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if token is not None and (after.endswith("\ufffd") or len(after) <= len(before)):
            return ""  # an incomplete UTF-8 sequence: wait for the rest of the character
        start = len(self.text)
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            safe = len(self.text)
        else:
            safe = len(self.text) if token is None else len(self.text) - _stop_prefix_len(self.text, self.stop)
        out = self.text[self.shown:safe] if safe > self.shown else ""
        self.shown = max(self.shown, safe)
        return out


class Engine:
    """A loaded model + tokenizer + scheduler thread.

    Args:
        checkpoint: model directory (HF layout with tokenizer).
        max_seqs: sequences decoded together at most.
        max_queue: requests waiting for admission at most; more get `Overloaded` (HTTP 429).
        kv_cache_tokens: KV-cache budget in tokens over all admitted sequences (prompt + max new tokens
            each); default max_seqs x context length.
        prefill_chunk: prompt tokens computed per iteration (long prompts do not stall running streams).
        prefix_cache_tokens: prompt-prefix tokens kept for reuse (0 = off).
        stall_timeout: seconds without progress while work is pending after which `healthy` is False.
        threads: intra-op threads of the scheduler's steps; 0 = chosen while serving between N - 1 and N
            (N = torch's thread count when the engine starts, one per physical core) from measured step
            times (`ThreadTuner`): N - 1 leaves a core to the event loop and wins under background load,
            N wins on an idle machine.
    """

    def __init__(self, checkpoint: str, dtype: str = "auto", device: str = "auto", max_seqs: int = 64,
                 max_queue: int = 512, kv_cache_tokens: int | None = None, prefill_chunk: int = 256,
                 prefix_cache_tokens: int = 16384, stall_timeout: float = 60.0, quantize: str | None = None,
                 threads: int = 0):
        from baichuan2.model.checkpoint import load_pretrained
        from baichuan2.tokenizer import Tokenizer

        self.checkpoint = checkpoint
        self.model = load_pretrained(checkpoint, dtype=dtype, device=device, quantize=quantize).eval()
        self.tok = Tokenizer.from_pretrained(checkpoint)
        self.max_length = self.model.config.max_position_embeddings
        stop = [self.model.config.eos_token_id]
        if (Path(checkpoint) / "generation_config.json").exists():
            self.defaults = SamplingConfig.from_generation_config(checkpoint)
        else:
            self.defaults = SamplingConfig.chat(stop_token_ids=stop)
        if not self.defaults.stop_token_ids:
            self.defaults = replace(self.defaults, stop_token_ids=stop)
        self.batcher = Batcher(self.model, max_seqs=max_seqs, max_len=self.max_length,
                               kv_budget_tokens=kv_cache_tokens, prefill_chunk=prefill_chunk,
                               prefix_cache_tokens=prefix_cache_tokens)
        self.max_queue, self.stall_timeout = max_queue, stall_timeout
        cores = torch.get_num_threads()
        auto = threads <= 0 and self.model.device.type == "cpu" and cores > 1
        self.tuner = ThreadTuner((cores - 1, cores) if auto else (threads if threads > 0 else cores,))
        self.metrics = Metrics(self)
        self._incoming: deque[Request] = deque()
        # tokens for event-loop streams, gathered over one scheduler step and handed to each loop in ONE
        # call_soon_threadsafe (one wake-up of the loop per step, not one per token: at 64 streams the
        # per-token wake-ups cost the loop thread -- and, through the GIL, the scheduler -- ~10% of a step)
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ids = itertools.count(1)
        self.accepting = True
        self._stopped = False
        self.last_progress = time.monotonic()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="baichuan2-scheduler", daemon=True)
        self._thread.start()

    # -- configuration helpers ---------------------------------------------------------

    def sampling(self, **overrides) -> SamplingConfig:
        """The checkpoint's defaults with the given (non-None) overrides; raises ValueError when invalid."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if values.get("temperature") == 0:
            values["do_sample"] = False
        return replace(self.defaults, **values)

    def default_max_tokens(self, requested: int | None, limit: int = 512) -> int:
        """A completion length that fits the context: ``limit`` capped at half the context length."""
        return requested if requested is not None else max(1, min(limit, self.max_length // 2))

    def chat_prompt(self, messages: Sequence[Message], max_new_tokens: int) -> list[int]:
        if max_new_tokens >= self.max_length:
            raise InputError(f"max_tokens {max_new_tokens} leaves no room for the prompt "
                             f"(context length {self.max_length})")
        ids = build_chat_input(self.tok, messages, max_new_tokens, self.max_length)
        if not messages or messages[-1]["role"] != "user":
            raise InputError("the last message must come from the user")
        return ids

    def text_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        # BOS as the checkpoint's tokenizer config says (official Baichuan 2: add_bos_token false, so a
        # base-model prompt is tokenizer(prompt) alone); an empty prompt still needs one token to start from.
        ids = self.tok.encode(prompt)
        if getattr(self.tok, "add_bos_token", False) or not ids:
            ids = [self.tok.bos_id] + ids
        if len(ids) + max_new_tokens > self.max_length:
            raise InputError(f"prompt ({len(ids)} tokens) + max_tokens ({max_new_tokens}) exceeds the context "
                             f"length {self.max_length}")
        return ids

    # -- the scheduler -----------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._incoming) + len(self.batcher.waiting)

    @property
    def healthy(self) -> bool:
        if self.error or not self._thread.is_alive():
            return False
        busy = self._incoming or self.batcher.has_work
        return not busy or time.monotonic() - self.last_progress < self.stall_timeout

    def submit(self, prompt_ids: list[int], cfg: SamplingConfig,
               deliver: Callable[[int | None, str | None], None]) -> Request:
        """Queue a request; ``deliver(token, finish)`` is called from the scheduler thread."""
        with self._lock:
            if not self.accepting:
                raise Overloaded("the server is shutting down", retry_after=5, shutting_down=True)
            if self.queued >= self.max_queue:
                raise Overloaded(f"too many requests waiting ({self.queued}); retry shortly")
            req = Request(list(prompt_ids), cfg)
            try:
                self.batcher.check(req)
            except ValueError as e:
                raise InputError(str(e)) from None
            rid, submitted = next(self._ids), time.monotonic()
            timing = {"first": None, "last": None}

            def emit(token: int | None, finish: str | None) -> None:
                now = time.monotonic()
                if token is not None:
                    if timing["first"] is None:
                        timing["first"] = now
                        self.metrics.ttft.observe(now - submitted)
                    else:
                        self.metrics.itl.observe(now - timing["last"])
                    timing["last"] = now
                    self.metrics.generated(1)
                else:
                    total = now - submitted
                    ttft = (timing["first"] or now) - submitted
                    self.metrics.finished(finish or "unknown")
                    log.info("request %d: prompt=%d cached=%d completion=%d finish=%s ttft=%.3fs total=%.3fs "
                             "tok/s=%.1f", rid, len(req.prompt), req.cached_tokens, len(req.tokens), finish, ttft,
                             total, len(req.tokens) / max(total - ttft, 1e-9))
                deliver(token, finish)

            req.emit = emit
            self._incoming.append(req)
        self._wake.set()
        return req

    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                while self._incoming:
                    self.batcher.add(self._incoming.popleft())
            if not self.batcher.has_work:
                self.last_progress = time.monotonic()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            b = self.batcher
            key = None if b.waiting or b.prefilling else len(b.running)  # decode-only steps are comparable
            self.tuner.threads_for(key)
            try:
                start = time.perf_counter()
                b.step()
                self.tuner.record(key, time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 - one bad step must not leave clients waiting forever
                log.exception("scheduler step failed")
                self.error = f"{type(e).__name__}: {e}"
                self._fail_all()
                self._flush()
                return
            self._flush()
            self.last_progress = time.monotonic()

    def _flush(self) -> None:
        """Hand this step's tokens to the event loops of their streams (scheduler thread only)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is reading those streams any more
                pass

    def _fail_all(self) -> None:
        b = self.batcher
        with self._lock:
            self.accepting = False
            pending = list(self._incoming) + list(b.waiting) + list(b.prefilling) + list(b.running)
            self._incoming.clear()
        for req in pending:
            if req.finish_reason is None and req.emit is not None:
                req.finish_reason = "error"
                req.emit(None, "error")

    def drain(self, deadline: float) -> None:
        """Stop admitting; cancel whatever is still generating after ``deadline`` seconds."""
        self.accepting = False

        def cancel_late():
            end = time.monotonic() + deadline
            while time.monotonic() < end and (self._incoming or self.batcher.has_work):
                time.sleep(0.05)
            for req in list(self._incoming) + list(self.batcher.waiting) + list(self.batcher.prefilling) + \
                    list(self.batcher.running):
                req.cancelled = True
            self._wake.set()

        threading.Thread(target=cancel_late, name="baichuan2-drain", daemon=True).start()

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- streams -----------------------------------------------------------------------

    def _delta(self, req: Request, text: str, finish: str | None = None) -> Delta:
        return Delta(text, finish, len(req.prompt), len(req.tokens), req.cached_tokens)

    def stream(self, prompt_ids: list[int], cfg: SamplingConfig, stop: Sequence[str] = ()) -> Iterator[Delta]:
        """Text deltas of one completion (blocking); the last delta carries the finish reason and counts.
        Closing the iterator early cancels the request."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = self.submit(prompt_ids, cfg, lambda token, finish: q.put((token, finish)))
        text = TextStream(self.tok, stop)
        try:
            while True:
                token, finish = q.get()
                piece = text.push(token)
                if text.stopped or finish is not None:
                    req.cancelled = True
                    yield self._delta(req, piece, "stop" if text.stopped else finish)
                    return
                if piece:
                    yield self._delta(req, piece)
        finally:
            req.cancelled = True

    def astream(self, prompt_ids: list[int], cfg: SamplingConfig, stop: Sequence[str] = ()) -> AsyncStream:
        """`stream` for an event loop: submits now (raising `Overloaded`/`InputError` at once) and returns an
        async iterator of deltas whose awaits never block the loop; ``cancel()`` it when the client leaves."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def deliver(token: int | None, finish: str | None) -> None:  # on the scheduler thread: see _flush
            self._outbox.setdefault(loop, []).append((q, (token, finish)))

        req = self.submit(prompt_ids, cfg, deliver)
        return AsyncStream(self, req, q, TextStream(self.tok, stop))

    def complete(self, prompt_ids: list[int], cfg: SamplingConfig, stop: Sequence[str] = ()) -> Delta:
        return _join(list(self.stream(prompt_ids, cfg, stop)))

    async def acomplete(self, prompt_ids: list[int], cfg: SamplingConfig, stop: Sequence[str] = ()) -> Delta:
        stream = self.astream(prompt_ids, cfg, stop)
        try:
            return _join([d async for d in stream])
        finally:
            stream.cancel()


class AsyncStream:
    """Deltas of one request, read on the event loop from the queue the scheduler thread feeds."""

    def __init__(self, engine: Engine, req: Request, q: asyncio.Queue, text: TextStream):
        self.engine, self.request, self.q, self.text = engine, req, q, text
        self.done = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Delta:
        while not self.done:
            token, finish = await self.q.get()
            piece = self.text.push(token)
            if self.text.stopped or finish is not None:
                self.done = True
                self.cancel()  # a stop string ends it here; the scheduler drops the sequence next iteration
                return self.engine._delta(self.request, piece, "stop" if self.text.stopped else finish)
            if piece:
                return self.engine._delta(self.request, piece)
        raise StopAsyncIteration

    def cancel(self) -> None:
        if self.request.finish_reason is None and not self.request.cancelled:
            self.request.cancelled = True
            self.engine._wake.set()


def _put_all(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


def _join(parts: list[Delta]) -> Delta:
    last = parts[-1]
    return Delta("".join(p.text for p in parts), last.finish_reason, last.prompt_tokens, last.completion_tokens,
                 last.cached_tokens)
