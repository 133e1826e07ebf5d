"""Belady's policy in the engine: the offline optimum, for measurement, never for production.

Belady evicts the expert whose next use is furthest ahead, so it needs the engine's own access
stream, one batch per cache tick (one wave of a layer call). Exact routing does not depend on the
cache, so a run's stream is known from a run of the same calls under any policy: a trace of them
(`expertcache trace`), or, without one, a first run under LRU. Every layer call is checked against
the future as it routes; a run that leaves it stops with an error rather than report a wrong optimum.
"""

from __future__ import annotations

import secrets
from contextlib import ExitStack
from pathlib import Path

from ..errors import ExpertCacheError
from ..ids import ExpertId
from ..policies import BeladyPolicy, LRUPolicy
from .recorder import Recorder
from .trace import Trace

Call = tuple[int, tuple[int, ...]]  # (layer, distinct routed experts, ascending): one layer call


def calls_of(trace: Trace) -> list[Call]:
    """Each layer call of a trace as the engine looks it up: its distinct experts, ascending."""
    return [(r.layer, tuple(sorted({int(e) for e in r.ids.reshape(-1).tolist() if e >= 0}))) for r in trace.routes]


def waves_of(calls: list[Call], capacity: int) -> list[tuple[ExpertId, ...]]:
    """The access stream in cache ticks: each call cut into waves of `capacity` experts, as
    CacheCore.stream acquires them."""
    return [
        tuple((layer, e) for e in experts[i : i + capacity])
        for layer, experts in calls
        for i in range(0, len(experts), capacity)
    ]


class FutureCheck:
    """An observer: each layer call must be the future's next one."""

    def __init__(self, calls: list[Call], source: str) -> None:
        self.calls, self.source, self.next = calls, source, 0

    def __call__(self, layer: int, x, logits, weights, ids) -> None:
        i = self.next
        if i >= len(self.calls):
            raise ExpertCacheError(
                f"cache policy 'belady': this run goes past the end of its future ({self.source}, "
                f"{len(self.calls)} layer calls): record the trace from the same calls"
            )
        got = (layer, tuple(sorted(e for e in set(ids.reshape(-1).tolist()) if e >= 0)))
        if got != self.calls[i]:
            raise ExpertCacheError(
                f"cache policy 'belady': layer call {i} (layer {layer}) routed other experts than its future "
                f"({self.source}): the trace must come from the same prompt, tokens and routing"
            )
        self.next = i + 1


def _check_routing(engine) -> None:
    if hasattr(engine.runtime.routing, "resident"):  # cache-aware and speculative routing read the cache
        raise ExpertCacheError(
            f"cache policy 'belady' needs routing that does not read the cache (routing "
            f"{engine.config.routing!r} changes with what is resident): use exact or adaptive-gating"
        )


def future_of(engine, trace_path: str | Path) -> list[Call]:
    """The layer calls of a trace recorded on this engine's model."""
    trace = Trace.load(trace_path)
    shape, ckpt = trace.shape, engine.checkpoint
    if tuple(shape.sparse_layers) != tuple(ckpt.sparse_layers) or shape.num_experts != ckpt.num_experts:
        raise ExpertCacheError(
            f"trace {trace_path} is of another model ({len(shape.sparse_layers)} sparse layers x "
            f"{shape.num_experts} experts; this one has {len(ckpt.sparse_layers)} x {ckpt.num_experts})"
        )
    return calls_of(trace)


def run(engine, calls: list[Call], source: str):
    """A context in which the engine's cache runs Belady with `calls` as its future (emptied
    first) and every layer call is checked against it."""
    _check_routing(engine)
    engine.reset_cache(BeladyPolicy(waves_of(calls, engine.cache.capacity)))
    return engine.observe(FutureCheck(calls, source))


def generate(engine, prompt, *, future_trace: str | Path | None = None, greedy: bool = True,
             seed: int | None = None, **kw):
    """engine.generate() under Belady. Without `future_trace` it runs twice: under LRU to record
    the access stream, then under Belady with it (stats are the second run's; sampling without a
    seed gets one, so both runs draw the same tokens)."""
    _check_routing(engine)
    if future_trace is not None:
        calls, source = future_of(engine, future_trace), str(future_trace)
    else:
        if not greedy and seed is None:
            seed = secrets.randbits(63)
        engine.reset_cache(LRUPolicy())
        with ExitStack() as stack:  # the caller's own recorders see only the Belady run
            stack.enter_context(engine.observers_paused())
            rec = stack.enter_context(Recorder(engine))
            engine.generate(prompt, greedy=greedy, seed=seed, **{**kw, "on_token": None})
        calls, source = calls_of(rec.trace), "the recording run of this generate()"
        engine.reset_stats()
    with run(engine, calls, source):
        return engine.generate(prompt, greedy=greedy, seed=seed, **kw)
