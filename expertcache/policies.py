"""Eviction policies: which resident expert to drop, decided on ids and counters alone.

Policies know nothing about tensors, bytes or threads, so the engine's ExpertCache and the
trace simulator drive the very same objects. `now` is the index of the current access batch
(one MoE layer call); a policy is told of inserts, accesses (once per batch per expert) and
removals, and asked for a victim among the entries an `allowed` predicate admits.
"""

from __future__ import annotations

import math
from bisect import bisect_right
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

ExpertId = tuple[int, int]  # (layer, expert)
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
    """Least frequently used while resident; ties go to the entry touched longest ago."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[ExpertId, int] = {}
        self._last: dict[ExpertId, int] = {}
        self._clock = 0  # strictly increasing touch stamp, so ties break by touch order

    def _touch(self, eid: ExpertId) -> None:
        self._clock += 1
        self._last[eid] = self._clock

    def insert(self, eid: ExpertId, now: int) -> None:
        self._count[eid] = 1
        self._touch(eid)

    def access(self, eid: ExpertId, now: int) -> None:
        self._count[eid] = self._count.get(eid, 0) + 1
        self._touch(eid)

    def remove(self, eid: ExpertId) -> None:
        self._count.pop(eid, None)
        self._last.pop(eid, None)

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None:
        best = None
        for e in self._count:
            if allowed(e):
                key = (self._count[e], self._last[e])
                if best is None or key < best[0]:
                    best = (key, e)
        return None if best is None else best[1]


class LFRUPolicy:
    """Recency-weighted frequency (LRFU): each touch adds 1 to a score that halves every
    `half_life` batches; evicts the lowest current score. Frequent experts survive a cyclic sweep
    that would flush an LRU, and stale ones still age out."""

    name = "lfru"

    def __init__(self, half_life: float = 64.0) -> None:
        self._decay = math.log(2) / half_life
        self._score: dict[ExpertId, tuple[float, int]] = {}  # eid -> (score at stamp, stamp)

    def _bump(self, eid: ExpertId, now: int) -> None:
        score, stamp = self._score.get(eid, (0.0, now))
        self._score[eid] = (score * math.exp(-self._decay * (now - stamp)) + 1.0, now)

    def insert(self, eid: ExpertId, now: int) -> None:
        self._score.pop(eid, None)
        self._bump(eid, now)

    def access(self, eid: ExpertId, now: int) -> None:
        self._bump(eid, now)

    def remove(self, eid: ExpertId) -> None:
        self._score.pop(eid, None)

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None:
        best = None
        for e, (score, stamp) in self._score.items():
            if allowed(e):
                # compare log-scores so old stamps never underflow: log(s) - decay*(now - stamp)
                key = (math.log(score) - self._decay * (now - stamp), stamp)
                if best is None or key < best[0]:
                    best = (key, e)
        return None if best is None else best[1]


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


class BeladyPolicy:
    """Furthest next use (Belady's MIN): the offline optimum for a known access sequence.

    `future` is the access stream as a list of batches (batch index = `now`); an entry never
    used again is the first to go."""

    name = "belady"

    def __init__(self, future: Sequence[Iterable[ExpertId]]) -> None:
        self._uses: dict[ExpertId, list[int]] = {}
        for t, batch in enumerate(future):
            for e in set(batch):
                self._uses.setdefault(e, []).append(t)
        self._resident: dict[ExpertId, None] = {}

    def _next_use(self, eid: ExpertId, now: int) -> float:
        uses = self._uses.get(eid, [])
        i = bisect_right(uses, now)
        return uses[i] if i < len(uses) else math.inf

    def insert(self, eid: ExpertId, now: int) -> None:
        self._resident[eid] = None

    def access(self, eid: ExpertId, now: int) -> None:
        pass

    def remove(self, eid: ExpertId) -> None:
        self._resident.pop(eid, None)

    def victim(self, allowed: Allowed, now: int) -> ExpertId | None:
        best = None
        for e in self._resident:
            if allowed(e):
                nxt = self._next_use(e, now)
                if best is None or nxt > best[0]:
                    best = (nxt, e)
        return None if best is None else best[1]


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
    """Build a policy by name; returns (policy, partitioned)."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}: choose one of {', '.join(POLICIES)}")
    factory, partitioned = POLICIES[name]
    if name == "belady" and "future" not in kwargs:
        raise ValueError("cache policy 'belady' needs the future access stream (a recorded trace of the same run)")
    accepted = {"future"} if name == "belady" else {"seed"} if name == "random" else {"half_life"} if name == "lfru" else set()
    return factory(**{k: v for k, v in kwargs.items() if k in accepted}), partitioned
