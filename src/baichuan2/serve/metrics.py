"""Prometheus metrics of one engine, in a registry of its own (several engines can live in one process).

Gauges are read from the scheduler's state when scraped; histograms and counters are fed by the engine as
tokens are delivered.  Generated tokens/s is the rate over the last `window` seconds.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine, window: float = 10.0):
        self.registry = CollectorRegistry()
        r, b = self.registry, engine.batcher
        Gauge("baichuan2_requests_running", "Sequences being prefilled or decoded", registry=r).set_function(
            lambda: len(b.running) + len(b.prefilling))
        Gauge("baichuan2_requests_waiting", "Requests waiting for admission", registry=r).set_function(
            lambda: engine.queued)
        Gauge("baichuan2_kv_cache_usage_ratio", "Reserved share of the KV-cache token budget",
              registry=r).set_function(lambda: b.reserved / b.kv_budget)
        Gauge("baichuan2_kv_cache_tokens", "Tokens held in the KV cache", registry=r).set_function(
            lambda: b.kv_tokens_used)
        Gauge("baichuan2_generation_tokens_per_second", f"Generated tokens/s over the last {window:g} s",
              registry=r).set_function(self.tokens_per_second)
        Gauge("baichuan2_prefix_cache_hit_ratio", "Share of admitted prompts that reused a cached prefix",
              registry=r).set_function(lambda: (b.prefix_cache.hits / b.prefix_cache.queries)
                                       if b.prefix_cache and b.prefix_cache.queries else 0.0)
        Gauge("baichuan2_scheduler_threads", "Intra-op threads of the scheduler's steps (chosen while serving)",
              registry=r).set_function(lambda: engine.tuner.current)
        Gauge("baichuan2_scheduler_thread_switches", "Times the measured step times changed the thread count",
              registry=r).set_function(lambda: engine.tuner.switches)
        self.ttft = Histogram("baichuan2_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("baichuan2_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("baichuan2_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("baichuan2_requests_finished", "Finished requests", ["finish_reason"], registry=r)
        self.window = window
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def generated(self, n: int) -> None:
        self.tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window

    def finished(self, reason: str) -> None:
        self.requests.labels(finish_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
