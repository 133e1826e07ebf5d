"""Belady's policy in the engine: the offline optimum, for measurement, never for production.

Belady evicts the expert whose next use is furthest in the future, so it needs the future: the
engine's own access stream, one batch per CacheCore tick (one acquire call, i.e. one wave of a
layer call). Exact routing does not depend on the cache, so a run's stream is known from a run of
the same calls under any policy:
- `future_trace`: a trace recorded from the same calls (`expertcache trace`, or a Recorder) on a
  fresh engine; its layer calls are cut into this engine's waves (its own capacity);
- otherwise each `generate()` runs twice: once under LRU to record the stream, then under Belady;
  the cache is emptied before each run and the stats are the second run's.
Every layer call is checked against the future as it routes: a run that leaves it (other prompt,
more tokens, routing that reads the cache) stops with an error rather than report a wrong optimum.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import ExpertCacheError
from .policies import BeladyPolicy, ExpertId, LRUPolicy
from .trace import Recorder, Trace, _GuessRecorder

NAME = "belady"
Call = tuple[int, tuple[int, ...]]  # (layer, distinct routed experts, ascending): one layer call


class NoFuture:
    """The policy slot of a Belady engine before a future is known: any use is an error."""

    name = NAME

    def _refuse(self, *args) -> None:
        raise ExpertCacheError(
            "cache policy 'belady' needs the future access stream: pass a trace of this run "
            "(--trace / future_trace=) or use generate(), which records one first"
        )

    insert = access = victim = _refuse

    def remove(self, eid: ExpertId) -> None:
        pass


def calls_of(trace: Trace) -> list[Call]:
    """Each layer call of a trace as the engine looks it up: its distinct experts, ascending."""
    return [(r.layer, tuple(sorted({int(e) for e in r.ids.reshape(-1).tolist() if e >= 0}))) for r in trace.routes]


def waves_of(calls: list[Call], capacity: int) -> list[tuple[ExpertId, ...]]:
    """The access stream in CacheCore ticks: each call cut into waves of `capacity` experts, as
    OffloadedMoE acquires them."""
    return [
        tuple((layer, e) for e in experts[i : i + capacity])
        for layer, experts in calls
        for i in range(0, len(experts), capacity)
    ]


def _reads_cache(routing) -> bool:
    """Routing that looks at what is resident (cache-aware, speculative) changes with the policy."""
    return hasattr(routing, "resident")


class BeladyOracle:
    """Gives an engine's Belady policy its future and checks each layer call against it."""

    def __init__(self, engine, future_trace: str | Path | None = None) -> None:
        self.engine = engine
        if _reads_cache(engine.context.routing):
            raise ExpertCacheError(
                f"cache policy 'belady' needs routing that does not read the cache (routing "
                f"{engine.config.routing!r} changes with what is resident): use exact or adaptive-gating"
            )
        self._calls: list[Call] | None = None
        self._next = 0
        engine.context.observers.insert(0, self._check)
        if future_trace is not None:
            trace = Trace.load(future_trace)
            shape, ckpt = trace.shape, engine.checkpoint
            if tuple(shape.sparse_layers) != tuple(ckpt.sparse_layers) or shape.num_experts != ckpt.num_experts:
                raise ExpertCacheError(
                    f"trace {future_trace} is of another model ({len(shape.sparse_layers)} sparse layers x "
                    f"{shape.num_experts} experts; this one has {len(ckpt.sparse_layers)} x {ckpt.num_experts})"
                )
            self._install(calls_of(trace), source=str(future_trace))
        self.from_trace = future_trace is not None

    def _install(self, calls: list[Call], source: str) -> None:
        core = self.engine.cache.core
        core.now = -1  # the first acquire is tick 0, the future's batch 0
        core.policy = BeladyPolicy(waves_of(calls, core.capacity))
        self._calls, self._next, self._source = calls, 0, source

    def _check(self, layer: int, x, logits, weights, ids) -> None:
        """Observer: this call must be the future's next one."""
        if self._calls is None:
            NoFuture()._refuse()
        i = self._next
        if i >= len(self._calls):
            raise ExpertCacheError(
                f"cache policy 'belady': this run goes past the end of its future ({self._source}, "
                f"{len(self._calls)} layer calls): record the trace from the same calls"
            )
        got = (layer, tuple(sorted(e for e in set(ids.reshape(-1).tolist()) if e >= 0)))
        if got != self._calls[i]:
            raise ExpertCacheError(
                f"cache policy 'belady': layer call {i} (layer {layer}) routed other experts than its future "
                f"({self._source}): the trace must come from the same prompt, tokens and routing"
            )
        self._next = i + 1

    # --- generate(): a recording run, then the Belady run -------------------------------------
    def generate(self, run: Callable, prompt, *, greedy: bool, seed: int | None, on_token, **kw):
        """Run `run` (Engine._generate) twice: under LRU to record the access stream, then under
        Belady with it. Sampling without a seed gets one, so both runs draw the same tokens."""
        engine = self.engine
        if not greedy and seed is None:
            seed = secrets.randbits(63)
        core, ctx = engine.cache.core, engine.context
        self._empty_cache()
        core.policy, core.now, self._calls = LRUPolicy(), -1, None
        # the caller's own Recorders see only the Belady run: pause them (and their predictor wrap)
        paused = [o for o in ctx.observers if o == self._check or isinstance(getattr(o, "__self__", None), Recorder)]
        predictor = ctx.predictor
        while isinstance(ctx.predictor, _GuessRecorder):
            ctx.predictor = ctx.predictor.inner
        for o in paused:
            ctx.observers.remove(o)
        try:
            with Recorder(engine) as rec:
                run(prompt, greedy=greedy, seed=seed, on_token=None, **kw)
        finally:
            ctx.observers[:0] = paused
            ctx.predictor = predictor
        self._empty_cache()
        self._install(calls_of(rec.trace), source="the recording run of this generate()")
        engine.reset_stats()
        return run(prompt, greedy=greedy, seed=seed, on_token=on_token, **kw)

    def _empty_cache(self) -> None:
        """Evict everything (waiting for or cancelling loads still in flight)."""
        cache = self.engine.cache
        core = cache.core
        for eid, ent in list(core.entries.items()):
            if ent.task is not None and not ent.task.finished and not cache.loader.cancel(ent.task):
                ent.task.event.wait()
            core.remove(eid)
        self.engine.context.predictions.clear()
