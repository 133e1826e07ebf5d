"""The server's counters and histograms, written in Prometheus' text format (no client library)."""

from __future__ import annotations

import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
RATE_WINDOW = 10.0  # seconds over which tokens/s is measured


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for b, c in zip((*self.buckets, float("inf")), self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{"+Inf" if b == float("inf") else b}"}} {running}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Filled from the event loop (requests) and the batcher's thread (steps, tokens)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.finished: dict[str, int] = {}  # finish reason -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.tpot = Histogram(LATENCY_BUCKETS)
        self.step = Histogram(LATENCY_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def done(self, req, reason: str | None = None) -> None:
        reason = (reason or req.finish_reason or "unknown").split(":")[0]  # "error: ..." -> "error" (a label)
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += len(req.prompt)
            self.generated_tokens += len(req.out)
            if req.first_token is not None:
                self.ttft.observe(req.first_token - req.submitted)
                if len(req.out) > 1 and req.finished is not None:
                    self.tpot.observe((req.finished - req.first_token) / (len(req.out) - 1))

    def on_step(self, info: dict) -> None:
        now = time.monotonic()
        with self._lock:
            self.step.observe(info["seconds"])
            self.batch.observe(info["batch"])
            self._recent.append((now, info["batch"]))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [n for t, n in self._recent if t >= now - RATE_WINDOW]
        return sum(recent) / RATE_WINDOW

    def render(self, depth: dict[str, int], engine_stats: dict) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        with self._lock:
            metric("expertcache_requests_total", "counter", "HTTP requests by endpoint and status",
                   [f'expertcache_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())])
            metric("expertcache_finished_total", "counter", "generations ended, by finish reason",
                   [f'expertcache_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())])
            metric("expertcache_prompt_tokens_total", "counter", "prompt tokens of finished requests", [f"expertcache_prompt_tokens_total {self.prompt_tokens}"])
            metric("expertcache_generated_tokens_total", "counter", "tokens generated", [f"expertcache_generated_tokens_total {self.generated_tokens}"])
            metric("expertcache_ttft_seconds", "histogram", "time to first token", self.ttft.lines("expertcache_ttft_seconds"))
            metric("expertcache_tpot_seconds", "histogram", "time per output token after the first, per request", self.tpot.lines("expertcache_tpot_seconds"))
            metric("expertcache_step_seconds", "histogram", "one batched forward", self.step.lines("expertcache_step_seconds"))
            metric("expertcache_batch_size", "histogram", "rows in each batched forward", self.batch.lines("expertcache_batch_size"))
        metric("expertcache_tokens_per_second", "gauge", f"rows stepped per second over the last {RATE_WINDOW:.0f} s",
               [f"expertcache_tokens_per_second {self.tokens_per_second():.3f}"])
        metric("expertcache_queue_depth", "gauge", "requests waiting, and running in the batch",
               [f'expertcache_queue_depth{{state="{k}"}} {v}' for k, v in depth.items()])
        for key, kind, help_ in (("hits", "counter", "expert lookups served from the cache"),
                                 ("misses", "counter", "expert lookups that waited for a load"),
                                 ("bytes_read", "counter", "expert bytes read from disk"),
                                 ("stall_seconds", "counter", "seconds the forward waited for expert loads")):
            v = engine_stats.get(key)
            if v is not None:
                name = f"expertcache_cache_{key}_total"
                metric(name, kind, help_, [f"{name} {v}"])
        metric("expertcache_kv_cache_bytes", "gauge", "KV cache bytes the batch holds", [f"expertcache_kv_cache_bytes {depth.get('kv_bytes', 0)}"])
        return "\n".join(lines) + "\n"
