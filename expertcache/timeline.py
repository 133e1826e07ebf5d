"""Engine-mode replay with prefetch on a simulated clock: the engine's cache rules (cache.py's
preempt / acquire / prefetch on the shared CacheCore) driven by a trace's recorded predictor
guesses, with every read served by one link of a hardware profile.

Timing model, for decode calls (prefill is not timed: its loads are taken to land at once):
- a layer call starts when its router has run (time s): its misses are submitted at demand
  priority and, after them, its guesses for later layers at low priority;
- the link serves one expert read at a time, each `latency + bytes / bandwidth`; demand reads go
  before queued speculative ones (a late guess the call needs is promoted); a started read runs
  to its end (the engine's chunk-level yield is not modelled);
- the call waits until every expert it needs has arrived, then computes for the profile's
  `layer_compute_seconds`, plus `read_cpu_seconds` for each read it submitted (demand or guess:
  the compute a read beside it takes); the next call starts then. A guess made at layer l
  therefore loads behind layer l's own demand reads and compute, and what is left of it when
  layer l+1 routes is waited for;
- at s, finished reads are ready (a loading entry cannot be evicted, as in the engine) and the
  call's own guesses still queued and not needed are cancelled (never read).
With no guesses a call costs compute + the serial loads of its misses: hardware.py's overlap 0.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .cache import CacheCore
from .hardware import Hardware
from .policies import ExpertId

DEMAND, PREFETCH = 0, 1  # as loader.py: lower is served first


@dataclass(eq=False)
class Read:
    """One expert read on the simulated link."""

    eid: ExpertId
    priority: int
    seq: int
    submit: float
    seconds: float
    start: float | None = None
    finish: float | None = None


class Link:
    """One read at a time, by (priority, submission) among the reads already submitted."""

    def __init__(self) -> None:
        self.queue: list[Read] = []
        self.free_at = 0.0
        self._seq = itertools.count()

    def submit(self, eid: ExpertId, priority: int, now: float, seconds: float) -> Read:
        r = Read(eid, priority, next(self._seq), now, seconds)
        self.queue.append(r)
        return r

    def _start_next(self, before: float | None) -> Read | None:
        """Start the next read if it starts before `before` (None: whenever it starts)."""
        if not self.queue:
            return None
        t0 = max(self.free_at, min(r.submit for r in self.queue))
        if before is not None and t0 >= before:
            return None
        r = min((r for r in self.queue if r.submit <= t0), key=lambda r: (r.priority, r.seq))
        self.queue.remove(r)
        r.start, r.finish = t0, t0 + r.seconds
        self.free_at = r.finish
        return r

    def advance(self, t: float) -> None:
        """Start every read that starts before `t`."""
        while self._start_next(t) is not None:
            pass

    def finish(self, reads: list[Read]) -> float:
        """Serve the queue until every read of `reads` has finished; the last finish time."""
        while any(r.finish is None for r in reads):
            if self._start_next(None) is None:  # cannot happen: an unfinished read is queued
                raise RuntimeError("a read waited for is not on the link")
        return max((r.finish for r in reads), default=0.0)

    def cancel(self, r: Read) -> bool:
        """Drop a read that has not started; False once it has."""
        if r.start is not None:
            return False
        self.queue.remove(r)
        return True

    def promote(self, r: Read) -> None:
        r.priority = DEMAND

    def flush(self) -> None:
        """Everything submitted lands now (the untimed prefill)."""
        self.finish(list(self.queue))


@dataclass
class Counters:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_late: int = 0
    prefetch_wasted: int = 0
    prefetch_cancelled: int = 0


@dataclass
class CallResult:
    hits: int
    misses: int
    miss_bytes: int
    wait_seconds: float  # time the call waited for loads after routing
    seconds: float  # the call: wait + compute (decode calls; 0 for untimed prefill calls)


@dataclass
class TimedCache:
    """ExpertCache's accounting on ids with reads on a simulated Link instead of a Loader."""

    core: CacheCore
    hardware: Hardware
    expert_bytes: dict[int, int]
    link: Link = field(default_factory=Link)
    reads: dict[ExpertId, Read] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    clock: float = 0.0
    predicted: set[int] = field(default_factory=set)  # layers some guess has targeted (the engine's context.predictions)

    def call(self, layer: int, waves: list[tuple[ExpertId, ...]], guesses, *, timed: bool) -> CallResult:
        """One MoE layer call: preempt, then per wave acquire (and, first wave, prefetch), wait,
        release; then compute. `waves`: the call's experts as the block acquires them; `guesses`:
        [(target layer, experts)] the predictor returned."""
        c = self.counters
        if not timed:
            self._land_everything()
        s = self.clock
        self._settle(s)
        hits0, misses0, issued0 = c.hits, c.misses, c.prefetch_issued
        lead = [(t, es) for t, es in guesses or () if t == layer]  # requested before this call (FirstLayerPrefetch)
        guesses = [(t, es) for t, es in guesses or () if t != layer]
        for _, experts in lead:
            self._issue([(layer, e) for e in experts], {layer}, s, timed)
        needed = {e for w in waves for _, e in w}
        self.core.route(layer, needed)  # as ExpertCache.preempt
        self._preempt(layer, needed)
        waited = 0.0
        for i, wave in enumerate(waves):
            waits = self._acquire(layer, wave, s + waited, timed)
            if i == 0 and guesses:
                self._prefetch(layer, guesses, s + waited, timed)
            if waits:
                waited = max(waited, self.link.finish(waits) - s)
            self._release(layer, wave)
        if guesses and self.core.sweep == layer:  # as OffloadedMoE._experts after its waves
            self.core.end_call()
            self._prefetch(layer, guesses, s + waited, timed, after=True)
        if not timed:
            self._land_everything()
        misses = c.misses - misses0
        reads = misses + c.prefetch_issued - issued0
        hw = self.hardware
        seconds = waited + hw.layer_compute_seconds + reads * hw.read_cpu_seconds if timed else 0.0
        self.clock = s + seconds
        return CallResult(c.hits - hits0, misses, misses * self.expert_bytes[layer], waited, seconds)

    # --- the engine's rules (cache.py), on a clock ------------------------------------------------
    def _load(self, eid: ExpertId, priority: int, now: float, timed: bool) -> Read | None:
        self.counters.bytes_read += self.expert_bytes[eid[0]]
        if not timed:
            return None
        r = self.link.submit(eid, priority, now, self.hardware.load_seconds(1, self.expert_bytes[eid[0]]))
        self.reads[eid] = r
        return r

    def _settle(self, now: float) -> None:
        """Reads started before `now` are committed; those finished by then are ready."""
        self.link.advance(now)
        for eid, r in list(self.reads.items()):
            if r.finish is not None and r.finish <= now:
                ent = self.core.entries.get(eid)
                if ent is not None:
                    ent.ready = True
                del self.reads[eid]

    def _land_everything(self) -> None:
        self.link.flush()
        for eid in list(self.reads):
            ent = self.core.entries.get(eid)
            if ent is not None:
                ent.ready = True
        self.reads.clear()
        self.clock = max(self.clock, self.link.free_at)

    def _preempt(self, layer: int, needed: set[int]) -> None:
        c = self.counters
        for eid, ent in list(self.core.entries.items()):
            if eid[0] != layer or not ent.speculative or eid[1] in needed or ent.wasted:
                continue
            ent.wasted = True
            c.prefetch_wasted += 1
            r = self.reads.get(eid)
            if not ent.ready and r is not None and self.link.cancel(r):
                c.prefetch_cancelled += 1
                c.bytes_read -= self.expert_bytes[layer]
                del self.reads[eid]
                self.core.remove(eid)

    def _acquire(self, layer: int, wave: tuple[ExpertId, ...], now: float, timed: bool) -> list[Read]:
        """Pin the wave; returns the reads it must wait for (misses and late guesses)."""
        core, c = self.core, self.counters
        core.tick()
        waits = []
        for eid in wave:
            c.lookups += 1
            ent = core.entries.get(eid)
            if ent is not None:
                c.hits += 1
                if ent.speculative:
                    ent.speculative = False
                    if ent.wasted:
                        ent.wasted = False
                        c.prefetch_wasted -= 1
                    c.prefetch_used += 1
                    if not ent.ready:
                        c.prefetch_late += 1
                        r = self.reads[eid]
                        self.link.promote(r)
                        waits.append(r)
                    core.policy.insert(eid, core.now)
                else:
                    core.policy.access(eid, core.now)
            else:
                c.misses += 1
                self._reclaim(eid)
                ent = core.add(eid, speculative=False, ready=not timed)
                r = self._load(eid, DEMAND, now, timed)
                if r is not None:
                    waits.append(r)
            ent.pins += 1
        return waits

    def _reclaim(self, incoming: ExpertId) -> None:
        core, c = self.core, self.counters
        if core.make_room(incoming):
            return
        loading = [(e, n) for e, n in core.entries.items() if not n.ready and n.pins == 0]
        for eid, ent in loading:
            r = self.reads.get(eid)
            if r is not None and self.link.cancel(r):
                c.prefetch_cancelled += 1
                c.bytes_read -= self.expert_bytes[eid[0]]
                if ent.speculative and not ent.wasted:
                    c.prefetch_wasted += 1
                del self.reads[eid]
                core.remove(eid)
                return
        for eid, ent in loading:  # the engine waits for that load, then takes its slot
            r = self.reads.pop(eid, None)
            if r is not None:
                self.link.finish([r])
            core.remove(eid)
            return
        raise RuntimeError(f"no slot can be freed for {incoming}: all {core.capacity} slots are pinned")

    def _prefetch(self, layer: int, guesses, now: float, timed: bool, after: bool = False) -> None:
        core = self.core
        eids = [(t, e) for t, experts in guesses for e in experts]
        self.predicted.update(t for t, _ in guesses)
        if not eids:
            return
        keep = core.guess_keep(layer, max(t for t, _ in guesses), self.predicted, after=after)  # as OffloadedMoE._request
        self._issue(eids, keep, now, timed)

    def _issue(self, eids: list[ExpertId], keep_layers: set[int], now: float, timed: bool) -> None:
        """As ExpertCache.prefetch: speculative loads in order, never evicting what guess_protect keeps."""
        core = self.core
        protect = core.guess_protect(eids, keep_layers)
        for eid in eids:
            if eid in core.entries:
                continue
            if not core.make_room(eid, protect=protect):
                break
            core.add(eid, speculative=True, ready=not timed)
            self.counters.prefetch_issued += 1
            self._load(eid, PREFETCH, now, timed)

    def _release(self, layer: int, wave: tuple[ExpertId, ...]) -> None:
        for eid in wave:  # computed: every expert of the wave has arrived
            ent = self.core.entries.get(eid)
            if ent is not None:
                ent.ready = True
                ent.pins -= 1
                self.reads.pop(eid, None)
