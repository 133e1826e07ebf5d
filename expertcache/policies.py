"""Eviction policies: which resident expert to drop, decided on ids and counters alone.

Policies know nothing about tensors, bytes or threads, so the engine and the simulator drive the
very same objects. `now` is the index of the current access batch (one wave of a layer call); a
policy is told of inserts, accesses (once per batch per expert) and removals, and asked for a
victim among the entries an `allowed` predicate admits.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from .errors import ExpertCacheError
from .ids import ExpertId

Allowed = Callable[[ExpertId], bool]


class EvictionPolicy(Protocol):
    name: str

    def insert(self, eid: ExpertId, now: int) -> None: ...

    def access(self, eid: ExpertId, now: int) -> None: ...

    def remove(self, eid: ExpertId) -> None: ...

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None: ...


class LRUPolicy:
    """Least recently used: evicts the entry touched longest ago."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertId, None] = OrderedDict()

    def insert(self, eid: ExpertId, now: int) -> None:
        self._order[eid] = None
        self._order.move_to_end(eid)

    def access(self, eid: ExpertId, now: int) -> None:
        self._order.move_to_end(eid)

    def remove(self, eid: ExpertId) -> None:
        self._order.pop(eid, None)

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None:
        return next((e for e in self._order if allowed(e)), None)


class LFUPolicy:
    """Least frequently used: evicts the entry with the fewest touches over the whole run; ties go
    to the entry touched longest ago.

    Counts survive eviction ("perfect" LFU), so an expert that was hot, got pushed out and comes
    back keeps its history; this is the accounting that reproduces the reference replay
    (docs/ARCHITECTURE.md). A lazy min-heap keeps the victim search logarithmic."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[ExpertId, int] = {}  # touches over the run, kept after eviction
        self._live: dict[ExpertId, tuple[int, int, ExpertId]] = {}  # resident -> (count, last touch stamp, eid)
        self._heap: list[tuple[int, int, ExpertId]] = []  # live items and stale ones
        self._clock = 0  # strictly increasing touch stamp, so ties break by touch order

    def _touch(self, eid: ExpertId) -> None:
        self._clock += 1
        count = self._count[eid] = self._count.get(eid, 0) + 1
        _heap_push(self._heap, self._live, eid, (count, self._clock))

    def insert(self, eid: ExpertId, now: int) -> None:
        self._touch(eid)

    def access(self, eid: ExpertId, now: int) -> None:
        self._touch(eid)

    def remove(self, eid: ExpertId) -> None:
        self._live.pop(eid, None)

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None:
        return _heap_victim(self._heap, self._live, allowed)


class LFRUPolicy:
    """Recency-weighted frequency (LRFU): each touch adds 1 to a score that halves every
    `half_life` batches; evicts the lowest current score. Frequent experts survive a cyclic sweep
    that would flush an LRU, and stale ones still age out.

    Every score decays by the same factor, so entries order by log(score) + decay * stamp, which
    only changes when an entry is touched: a lazy min-heap keeps the victim search logarithmic.
    Ties go to the entry inserted first."""

    name = "lfru"

    def __init__(self, half_life: float = 64.0) -> None:
        self._decay = math.log(2) / half_life
        self._score: dict[ExpertId, tuple[float, int]] = {}  # eid -> (score at stamp, stamp)
        self._live: dict[ExpertId, tuple[float, int, int, ExpertId]] = {}  # (order key, stamp, insert seq, eid)
        self._heap: list[tuple[float, int, int, ExpertId]] = []  # live items and stale ones
        self._seq = 0

    def _bump(self, eid: ExpertId, now: int) -> None:
        score, stamp = self._score.get(eid, (0.0, now))
        score = score * math.exp(-self._decay * (now - stamp)) + 1.0
        self._score[eid] = (score, now)
        item = self._live.get(eid)
        if item is None:
            self._seq += 1
        seq = self._seq if item is None else item[2]
        # log of the score decayed to time 0: comparable across entries without underflow
        _heap_push(self._heap, self._live, eid, (math.log(score) + self._decay * now, now, seq))

    def insert(self, eid: ExpertId, now: int) -> None:
        self._score.pop(eid, None)
        self._live.pop(eid, None)
        self._bump(eid, now)

    def access(self, eid: ExpertId, now: int) -> None:
        self._bump(eid, now)

    def remove(self, eid: ExpertId) -> None:
        self._score.pop(eid, None)
        self._live.pop(eid, None)

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None:
        return _heap_victim(self._heap, self._live, allowed)


class RandomPolicy:
    """Uniformly random victim from a seeded generator: the baseline every policy must beat."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._resident: dict[ExpertId, None] = {}

    def insert(self, eid: ExpertId, now: int) -> None:
        self._resident[eid] = None

    def access(self, eid: ExpertId, now: int) -> None:
        pass

    def remove(self, eid: ExpertId) -> None:
        self._resident.pop(eid, None)

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None:
        candidates = [e for e in self._resident if allowed(e)]
        return self._rng.choice(candidates) if candidates else None


def use_times(future: Sequence[Iterable[ExpertId]]) -> dict[ExpertId, list[int]]:
    """Each expert's batch indices in an access stream, ascending (a repeat inside a batch once)."""
    uses: dict[ExpertId, list[int]] = {}
    for t, batch in enumerate(future):
        for e in batch:
            times = uses.get(e)
            if times is None:
                uses[e] = [t]
            elif times[-1] != t:
                times.append(t)
    return uses


def next_use(uses: dict[ExpertId, list[int]], eid: ExpertId, now: int) -> float:
    """The first batch after `now` that uses `eid` (inf: none)."""
    times = uses.get(eid)
    i = bisect_right(times, now) if times else 0
    return times[i] if times and i < len(times) else math.inf


class BeladyPolicy:
    """Furthest next use (Belady's MIN): the offline optimum for a known access sequence.

    `future` is the access stream as a list of batches (batch index = `now`); an entry never
    used again is the first to go; ties go to the entry inserted first. An entry's next use is
    fixed from one touch to the next, so a lazy max-heap keeps the victim search logarithmic."""

    name = "belady"

    def __init__(self, future: Sequence[Iterable[ExpertId]]) -> None:
        self._uses = use_times(future)  # eid -> batch indices that use it, ascending
        self._live: dict[ExpertId, tuple[float, int, ExpertId]] = {}  # resident -> (-next use, insert seq, eid)
        self._heap: list[tuple[float, int, ExpertId]] = []  # live items and stale ones
        self._seq = 0

    def _schedule(self, eid: ExpertId, now: int, seq: int) -> None:
        _heap_push(self._heap, self._live, eid, (-next_use(self._uses, eid, now), seq))

    def insert(self, eid: ExpertId, now: int) -> None:
        self._seq += 1
        self._schedule(eid, now, self._seq)

    def access(self, eid: ExpertId, now: int) -> None:
        item = self._live.get(eid)
        if item is not None:
            self._schedule(eid, now, item[1])

    def remove(self, eid: ExpertId) -> None:
        self._live.pop(eid, None)

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None:
        return _heap_victim(self._heap, self._live, allowed)


class LookaheadPolicy:
    """Read-ME's pre-gate replayed: the routing of the next `window` batches is known (a pre-gate
    gives a token's every layer before the first runs; a queued prompt's ahead of its turn), the
    rest is not. An entry with no use inside the window goes first, the least used (LFU, the
    older on ties); if every entry has one, the furthest next use goes (Belady inside the window).
    window = 0 is LFU; a window past the stream's end is Belady."""

    name = "lookahead"

    def __init__(self, future: Sequence[Iterable[ExpertId]], window: int) -> None:
        self.window = window
        self._uses = use_times(future)
        self._count: dict[ExpertId, int] = {}  # touches over the run, kept after eviction (as LFUPolicy)
        self._last: dict[ExpertId, int] = {}  # touch stamp: ties go to the entry touched longest ago
        self._live: set[ExpertId] = set()
        self._clock = 0

    def insert(self, eid: ExpertId, now: int) -> None:
        self._live.add(eid)
        self.access(eid, now)

    def access(self, eid: ExpertId, now: int) -> None:
        self._count[eid] = self._count.get(eid, 0) + 1
        self._clock += 1
        self._last[eid] = self._clock

    def remove(self, eid: ExpertId) -> None:
        self._live.discard(eid)

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None:
        best, best_key = None, None
        for e in self._live:
            if not allowed(e):
                continue
            nxt = next_use(self._uses, e, now)
            key = (0, self._count[e], self._last[e], e) if nxt > now + self.window else (1, -nxt, 0, e)
            if best_key is None or key < best_key:
                best, best_key = e, key
        return best


def lookahead_window(name: str) -> int | None:
    """Tokens of lookahead a policy name "lookahead-N" asks for (None: not a lookahead name)."""
    head, _, n = name.partition("-")
    return int(n) if head == "lookahead" and n.isdigit() else None


class UnknownFuture:
    """Belady's place before its future is given (sim/belady.py installs one): any use is an error."""

    name = "belady"

    def _refuse(self, *args) -> None:
        raise ExpertCacheError(
            "cache policy 'belady' needs the future access stream: run it through expertcache.sim.belady "
            "(the CLI's --cache-policy belady does), which records or reads one first"
        )

    insert = access = victim = _refuse

    def remove(self, eid: ExpertId) -> None:
        pass


_SKIP_BEFORE_SCAN = 32  # heap items a victim search passes over before it scans the live entries


def _heap_push(heap: list, live: dict, eid: ExpertId, key: tuple) -> None:
    """Push `eid` under `key`; `live[eid]` is its one live heap item (older ones are stale). The
    heap is rebuilt from the live items when stale ones outnumber them, so it stays proportional
    to the resident set."""
    item = live[eid] = (*key, eid)
    heapq.heappush(heap, item)
    if len(heap) > 4 * len(live) + 64:
        heap[:] = list(live.values())
        heapq.heapify(heap)


def _heap_victim(heap: list, live: dict, allowed: Allowed) -> ExpertId | None:
    """The entry of the smallest live heap item that `allowed` admits; stale items are dropped,
    live ones skipped over are put back. A filter that rejects many (one layer's entries out of
    all) falls back to one linear scan, so a search never costs more than O(n)."""
    skipped = []
    found = None
    while heap:
        item = heap[0]
        eid = item[-1]
        if live.get(eid) is not item:
            heapq.heappop(heap)
        elif allowed(eid):
            found = eid
            break
        else:
            skipped.append(heapq.heappop(heap))
            if len(skipped) > _SKIP_BEFORE_SCAN:  # a narrow filter (one layer of many): scan instead
                found = min((it for it in live.values() if allowed(it[-1])), default=(None,))[-1]
                break
    for item in skipped:
        heapq.heappush(heap, item)
    return found


# name -> (factory, partitioned by layer). Partitioned policies give each layer an equal share of
# the slots (cache.py enforces the quotas); the factory's policy orders entries inside a layer.
POLICIES: dict[str, tuple[Callable[..., EvictionPolicy], bool]] = {
    "lru": (LRUPolicy, False),
    "lfu": (LFUPolicy, False),
    "lfru": (LFRUPolicy, False),
    "random": (RandomPolicy, False),
    "belady": (BeladyPolicy, False),
    "layer": (LRUPolicy, True),
    "layerlfu": (LFUPolicy, True),
}


def make_policy(name: str, **kwargs) -> tuple[EvictionPolicy, bool]:
    """Build a policy by name; returns (policy, partitioned). Belady without `future` is an
    UnknownFuture until one is installed."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}: choose one of {', '.join(POLICIES)}")
    factory, partitioned = POLICIES[name]
    if name == "belady" and kwargs.get("future") is None:
        return UnknownFuture(), partitioned
    accepted = {"future"} if name == "belady" else {"seed"} if name == "random" else {"half_life"} if name == "lfru" else set()
    return factory(**{k: v for k, v in kwargs.items() if k in accepted}), partitioned
