"""Prometheus metrics of one server (its own registry, so several servers can live in a process)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Queue depth, running sequences, tokens/s, TTFT and inter-token latency."""

    def __init__(self, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("qcn_queue_depth", "Requests waiting for a sequence slot", registry=r)
        self.running = Gauge("qcn_running_sequences", "Sequences holding a slot (prefilling or decoding)", registry=r)
        self.tokens_per_s = Gauge("qcn_generation_tokens_per_second", f"Generated tokens per second over the last {window_s:g} s", registry=r)
        self.generated = Counter("qcn_generation_tokens", "Generated tokens", registry=r)
        self.prompt = Counter("qcn_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached = Counter("qcn_prompt_tokens_cached", "Prompt tokens restored from a kept state instead of prefilled", registry=r)
        self.requests = Counter("qcn_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("qcn_time_to_first_token_seconds", "Time from arrival to the first generated token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qcn_inter_token_latency_seconds", "Time between consecutive generated tokens of a request", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("qcn_request_latency_seconds", "Time from arrival to the last token", buckets=_LATENCY_BUCKETS, registry=r)
        self._window_s = window_s
        self._window: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def set_load(self, *, queue_depth: int, running: int) -> None:
        self.queue_depth.set(queue_depth)
        self.running.set(running)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens_generated(self, n: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.generated.inc(n)
        with self._lock:
            self._window.append((now, n))
            self._update_rate(now)

    def _update_rate(self, now: float) -> None:
        while self._window and self._window[0][0] < now - self._window_s:
            self._window.popleft()
        total = sum(n for _, n in self._window)
        span = now - self._window[0][0] if len(self._window) > 1 else 0.0
        self.tokens_per_s.set(total / span if span > 0 else 0.0)

    def request_finished(self, req, outcome: str) -> None:
        label = req.finish_reason if outcome == "done" and req.finish_reason else outcome
        self.requests.labels(outcome=label).inc()
        self.prompt.inc(req.prompt_tokens)
        self.cached.inc(req.cached_tokens)
        if req.last_token_at is not None:
            self.e2e.observe(req.last_token_at - req.arrival)

    def render(self) -> bytes:
        with self._lock:
            if self._window:
                self._update_rate(time.perf_counter())
        return generate_latest(self.registry)
