"""ExpertCache: expert slots under a byte budget, with residency, pins and in-flight loads.

CacheCore is the accounting alone, on ids: which experts hold a slot (ready or loading), which
are pinned by the running layer, which were loaded on a guess and not yet used, and whom to evict.
The trace simulator drives the same CacheCore, so what it reports of a policy is what the engine
does. ExpertCache adds the slot memory, the loader and the stall clock.

Rules (DESIGN.md invariants 2-4):
- every entry, ready or loading, holds one slot: resident + in-flight bytes <= budget;
- a pinned entry (the running layer's) is never evicted;
- wrong guesses go first: a speculative entry its layer did not use is evicted before any other;
- a speculative load never evicts an entry that the same prefetch request wants, nor a resident
  expert of the layers between the running layer and its target (AdapMoE: a wrong guess never
  pushes out a useful expert);
- a guess joins the eviction policy at its first use, as a demand load does at its miss: wrong
  guesses never skew the policy's counts, and a used one is counted once;
- in a sweep (a call that needs at least half its layer: a long prompt) eviction follows the
  forward order, furthest next use first, never an expert the call needs (CacheCore.route).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

import torch

from .checkpoint import ExpertId
from .errors import BudgetError, ExpertLoadError
from .loader import DEMAND, PREFETCH, RUNNING, Loader, LoadTask
from .policies import EvictionPolicy
from .stats import Stats
from .store import ExpertStore, SlotArena

log = logging.getLogger(__name__)


@dataclass
class Entry:
    slot: int
    task: LoadTask | None = None  # set while loading (engine only)
    ready: bool = True
    speculative: bool = False  # loaded on a guess and not used yet
    wasted: bool = False  # its layer ran without needing it
    pins: int = 0


def equal_quotas(capacity: int, layers: list[int]) -> dict[int, int]:
    """Split `capacity` slots over layers as evenly as possible (earlier layers get the remainder)."""
    base, extra = divmod(capacity, len(layers))
    return {layer: base + (1 if i < extra else 0) for i, layer in enumerate(layers)}


@dataclass
class CacheCore:
    """Slot accounting on ids, shared by the engine's cache and the simulator."""

    capacity: int
    policy: EvictionPolicy
    quotas: dict[int, int] | None = None  # per-layer slot shares for partitioned policies
    entries: dict[ExpertId, Entry] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    per_layer: Counter = field(default_factory=Counter)
    now: int = -1  # index of the running batch: tick() before each, so the first is 0 (as BeladyPolicy's future)
    layers: list[int] = field(default_factory=list)  # sparse layers in forward order; [] = no sweep rule
    experts_per_layer: int = 0  # routed experts per layer
    sweep: int | None = None  # the running layer while its call is a sweep (see route)
    sweep_needed: frozenset[int] = frozenset()  # ...and the experts that call needs

    def __post_init__(self) -> None:
        self.free = list(range(self.capacity - 1, -1, -1))
        self._order = {layer: i for i, layer in enumerate(self.layers)}

    def tick(self) -> int:
        self.now += 1
        return self.now

    def route(self, layer: int, needed: Iterable[int]) -> None:
        """The running call's router chose the distinct experts `needed` of `layer`. A call that needs at
        least half of them (a long prompt) is a sweep: every later layer of this forward will need
        most of its experts too, so until the next call eviction follows the forward order instead
        of the policy (see choose_victim). The policy still orders experts inside a layer, and
        partitioned policies and Belady (which knows the future) keep their own order."""
        needed = frozenset(needed)
        sweep = (
            layer in self._order
            and self.quotas is None
            and self.policy.name != "belady"
            and len(needed) >= max(2, (self.experts_per_layer + 1) // 2)
        )
        self.sweep = layer if sweep else None
        self.sweep_needed = needed if sweep else frozenset()

    def guess_keep(self, layer: int, last_target: int, guessed: Container[int], *, after: bool = False) -> set[int]:
        """Layers whose resident experts guesses made at `layer` (targets up to `last_target`) may
        not evict: the running and skipped-over layers (needed before any guess is) and layers no
        guess ever targets, `guessed` being those that some guess has (the first sparse layer:
        evicted, its experts only come back by a demand miss; measured: layer 0's misses 2.3x those
        without prefetch). `after` the running call, its own layer is no longer needed first."""
        keep = set(range(layer, last_target + 1))
        keep.update(l for l, n in self.per_layer.items() if n and l not in guessed)
        if after:
            keep.discard(layer)
        return keep

    def guess_protect(self, eids: Iterable[ExpertId], keep_layers: Iterable[int]) -> set[ExpertId]:
        """What a request for guesses `eids` may not evict: the experts it wants, every entry of
        `keep_layers` (guess_keep) and, in a sweep, what Belady keeps (kept_from_guesses)."""
        keep = set(keep_layers)
        return set(eids) | {e for e in self.entries if e[0] in keep} | self.kept_from_guesses()

    def end_call(self) -> None:
        """The running call has computed every expert it needed: in a sweep they are now the
        entries used furthest ahead (the next forward), the first to make room."""
        self.sweep_needed = frozenset()

    def kept_from_guesses(self) -> set[ExpertId]:
        """In a sweep, what a guess may not take a slot from: every entry but the running layer's
        experts its call does not need. Those others are Belady's keep (the next prompt needs them
        first); a guess loaded early into one of their slots only moves a read from now to the
        next prompt, and adds one. (Free slots and written-off guesses stay open to guesses.)"""
        if self.sweep is None:
            return set()
        return {e for e in self.entries if not (e[0] == self.sweep and e[1] not in self.sweep_needed)}

    def _sweep_victim(self, ok: Callable[[ExpertId], bool]) -> ExpertId | None:
        """In a sweep at layer L, the evictable entry whose next use is furthest: L's own experts the
        call does not need (next forward), then L-1, L-2, ..., the first layer, then the last, ...,
        L+1 (this forward); never one the call needs (acquire pins them one by one). Belady's
        choice for a prompt that uses every expert; an LRU or LFU would instead evict the first
        layers, which the next prompt needs first (0 hits at any budget below 100%)."""
        n, at = len(self.layers), self._order[self.sweep]
        far, layer = -1, None
        for eid in self.entries:
            if eid[0] == self.sweep and eid[1] in self.sweep_needed:
                continue
            d = (self._order.get(eid[0], at) - at - 1) % n  # L-1 -> n-2, ..., L+1 -> 0; L -> n-1
            if d > far and ok(eid):
                far, layer = d, eid[0]
        if layer is None:
            return None
        in_layer = lambda e: e[0] == layer and ok(e) and not (layer == self.sweep and e[1] in self.sweep_needed)  # noqa: E731
        victim = self.policy.victim(in_layer, self.now)
        return victim if victim is not None else next(e for e in self.entries if in_layer(e))  # a guess not yet used

    def _evictable(self, eid: ExpertId, protect: set[ExpertId]) -> bool:
        e = self.entries.get(eid)
        return e is not None and e.ready and e.pins == 0 and eid not in protect

    def choose_victim(self, incoming: ExpertId, protect: set[ExpertId] = frozenset()) -> ExpertId | None:
        """The entry to evict when no slot is free, or None if every entry is busy."""
        ok = lambda e: self._evictable(e, protect)  # noqa: E731
        for eid, ent in self.entries.items():  # oldest wrong guess first
            if ent.wasted and ok(eid):
                return eid
        if self.sweep is not None:
            victim = self._sweep_victim(ok)
            if victim is not None:
                return victim
        if self.quotas is not None:
            over = {l for l, n in self.per_layer.items() if n > self.quotas.get(l, 0)}
            if over:
                v = self.policy.victim(lambda e: e[0] in over and ok(e), self.now)
                if v is not None:
                    return v
        victim = self.policy.victim(ok, self.now)
        if victim is None:  # only guesses not yet used are left (the policy does not know them): oldest first
            victim = next((e for e, n in self.entries.items() if n.speculative and ok(e)), None)
        return victim

    def add(self, eid: ExpertId, *, speculative: bool, ready: bool) -> Entry:
        ent = Entry(slot=self.free.pop(), ready=ready, speculative=speculative)
        self.entries[eid] = ent
        self.per_layer[eid[0]] += 1
        if not speculative:  # a guess joins the policy at its first use (acquire): until then it
            self.policy.insert(eid, self.now)  # must not touch the policy's counts (a wrong one never is used)
        return ent

    def remove(self, eid: ExpertId) -> Entry:
        ent = self.entries.pop(eid)
        self.per_layer[eid[0]] -= 1
        self.policy.remove(eid)
        self.free.append(ent.slot)
        return ent

    def make_room(self, incoming: ExpertId, protect: set[ExpertId] = frozenset()) -> bool:
        """Evict so `incoming` may take a slot; False if no evictable entry is left.

        A partitioned cache first keeps the incoming layer within its share (evicting inside the
        layer); when every slot is taken it then evicts from layers over their share, then any."""
        layer = incoming[0]
        if self.quotas is not None and self.per_layer[layer] >= max(self.quotas.get(layer, 0), 1):
            ok = lambda e: e[0] == layer and self._evictable(e, protect)  # noqa: E731
            victim = next((e for e, n in self.entries.items() if n.wasted and ok(e)), None)
            victim = victim or self.policy.victim(ok, self.now)
            if victim is not None:
                self.remove(victim)
        while not self.free:
            victim = self.choose_victim(incoming, protect)
            if victim is None:
                return False
            self.remove(victim)
        return True


class ExpertCache:
    """Expert slots in memory, filled by the loader, under a byte budget."""

    def __init__(
        self,
        *,
        store: ExpertStore,
        budget_bytes: int,
        expert_bytes: int,
        top_k: int,
        policy: EvictionPolicy,
        partitioned: bool,
        layers: list[int],
        io_threads: int,
        stats: Stats,
    ) -> None:
        minimum = top_k * expert_bytes
        if budget_bytes < minimum:
            raise BudgetError(
                f"expert budget {budget_bytes} bytes is below the minimum {minimum} bytes "
                f"({top_k} experts of {expert_bytes} bytes: one layer's top-{top_k}); raise --expert-budget"
            )
        capacity = min(budget_bytes // expert_bytes, store.num_experts)
        self.expert_bytes = expert_bytes
        self.budget_bytes = budget_bytes
        self.core = CacheCore(
            capacity, policy, equal_quotas(capacity, layers) if partitioned else None,
            layers=sorted(layers), experts_per_layer=store.num_experts // max(len(layers), 1),
        )  # fmt: skip
        self.store = store
        self.arena = SlotArena(capacity, store.slot_bytes)
        self.loader = Loader(store, self.arena, threads=io_threads)
        self.stats = stats
        self.max_occupancy = 0  # most slots ever held by ready + loading entries (<= capacity)

    @property
    def capacity(self) -> int:
        return self.core.capacity

    # --- the running layer -------------------------------------------------------------------
    def preempt(self, layer: int, needed: Iterable[int]) -> None:
        """The layer's router has run: its speculative entries it does not need are wrong guesses;
        cancel those still queued and mark the rest first to go."""
        needed = set(needed)
        self.core.route(layer, needed)
        for eid, ent in list(self.core.entries.items()):
            if not ent.ready and ent.pins == 0 and ent.task is not None and ent.task.finished:
                self._settle(eid, ent)  # a finished load is evictable now (nothing else settles a wrong guess)
                if eid not in self.core.entries:
                    continue
            if eid[0] != layer or not ent.speculative or eid[1] in needed or ent.wasted:
                continue
            ent.wasted = True
            self.stats.prefetch_wasted += 1
            self.stats.layer(layer).prefetch_wasted += 1
            if not ent.ready and ent.task is not None and self.loader.cancel(ent.task):
                self.stats.prefetch_cancelled += 1
                self.stats.layer(layer).prefetch_cancelled += 1
                self.core.remove(eid)

    def acquire(self, layer: int, experts: Iterable[int]) -> list[ExpertId]:
        """Pin `experts` of `layer` (at most `capacity` of them); start demand loads for misses."""
        core = self.core
        core.tick()
        out, missed = [], []
        for x in experts:
            eid = (layer, int(x))
            ls = self.stats.layer(layer)
            self.stats.lookups += 1
            ls.lookups += 1
            ent = core.entries.get(eid)
            if ent is not None:
                self.stats.hits += 1
                ls.hits += 1
                if ent.speculative:
                    ent.speculative = False
                    if ent.wasted:  # a guess written off for an earlier token, used now after all
                        ent.wasted = False
                        self.stats.prefetch_wasted -= 1
                        ls.prefetch_wasted -= 1
                    self.stats.prefetch_used += 1
                    ls.prefetch_used += 1
                    if not ent.ready and ent.task.finished and ent.task.error is None:
                        ent.ready = True  # arrived in time (ready is otherwise only set when waited on)
                    if not ent.ready:
                        self.stats.prefetch_late += 1
                        ls.prefetch_late += 1
                        self.loader.promote(ent.task)
                    # first use of a guess counts as its insertion, as a demand load's would: the
                    # insert at prefetch time is no use, and counting both would rank every
                    # prefetched expert above demand-loaded ones (never-prefetched layers starve)
                    core.policy.insert(eid, core.now)
                else:
                    core.policy.access(eid, core.now)
            else:
                self.stats.misses += 1
                ls.misses += 1
                self._reclaim(eid)
                ent = core.add(eid, speculative=False, ready=False)
                missed.append((eid, ent))
            ent.pins += 1
            out.append(eid)
        if missed:  # the layer's demand loads queued together, in the order computed
            tasks = self.loader.submit_many([(eid, ent.slot) for eid, ent in missed], DEMAND)
            for (_, ent), task in zip(missed, tasks):
                ent.task = task
        self._note_occupancy()
        return out

    def _reclaim(self, incoming: ExpertId) -> None:
        """Make room for a demand load, cancelling or waiting for speculative loads if need be."""
        core = self.core
        if core.make_room(incoming):
            return
        # every ready entry is pinned: take a slot back from an unpinned load in flight
        loading = [(e, n) for e, n in core.entries.items() if not n.ready and n.pins == 0]
        for eid, ent in loading:
            if self.loader.cancel(ent.task):
                self.stats.prefetch_cancelled += 1
                self.stats.layer(eid[0]).prefetch_cancelled += 1
                if ent.speculative and not ent.wasted:
                    self.stats.prefetch_wasted += 1
                    self.stats.layer(eid[0]).prefetch_wasted += 1
                core.remove(eid)
                return
        for eid, ent in loading:
            self._wait(ent, eid, raise_error=False)
            if eid in core.entries:
                core.remove(eid)
            return
        raise RuntimeError(f"no slot can be freed for {incoming}: all {core.capacity} slots are pinned")

    def ready(self, eid: ExpertId) -> bool:
        ent = self.core.entries[eid]
        if not ent.ready and ent.task.finished:
            self._settle(eid, ent)
        return self.core.entries[eid].ready if eid in self.core.entries else False

    def weights(self, eid: ExpertId) -> tuple[torch.Tensor, ...]:
        """The expert's part tensors, waiting for its load if needed (raises on a read error)."""
        ent = self.core.entries[eid]
        if not ent.ready:
            self._wait(ent, eid, raise_error=True)
        return self.arena.tensors(ent.slot, self.store.plan(eid))

    def _wait(self, ent: Entry, eid: ExpertId, *, raise_error: bool) -> None:
        if not ent.task.finished:
            t0 = time.perf_counter()
            ent.task.event.wait()
            dt = time.perf_counter() - t0
            self.stats.stall_seconds += dt
            self.stats.layer(eid[0]).stall_seconds += dt
        self._settle(eid, ent)
        if raise_error and ent.task is not None:
            if ent.task.error is not None:
                raise ent.task.error
            if ent.task.state == "cancelled":  # only close() cancels a load someone waits for
                raise ExpertLoadError(f"the load of expert {eid} was cancelled (the engine is closing)")

    def _settle(self, eid: ExpertId, ent: Entry) -> None:
        task = ent.task
        if task.error is not None or task.state == "cancelled":
            if ent.pins == 0 and eid in self.core.entries:
                self.core.remove(eid)
            return
        ent.ready = True

    def release(self, eids: Iterable[ExpertId]) -> None:
        for eid in eids:
            ent = self.core.entries.get(eid)
            if ent is not None:
                ent.pins -= 1
                if ent.task is not None and ent.task.error is not None and ent.pins == 0:
                    self.core.remove(eid)

    # --- speculation ---------------------------------------------------------------------------
    def prefetch(self, eids: list[ExpertId], limit: int | None = None, *, keep_layers: Iterable[int] = ()) -> int:
        """Start speculative loads for `eids` (in priority order) that are not resident, within the
        budget, never evicting a pinned entry, one this request wants, or any entry of `keep_layers`
        (nor, in a sweep, anything Belady keeps: CacheCore.kept_from_guesses).

        The caller passes the running layer and every layer up to its farthest target as
        `keep_layers`: their resident experts may be needed before any guess is, so a wrong guess
        never pushes out a useful expert (AdapMoE's rule); it may take a free slot, a written-off
        guess, or what the eviction policy would evict next anyway. Returns loads started."""
        core = self.core
        protect: set[ExpertId] | None = None  # made when a guess first has to evict (a decode step's guesses are mostly resident)
        started: list[tuple[ExpertId, Entry]] = []
        for eid in eids:
            if limit is not None and len(started) >= limit:
                break
            if eid in core.entries:
                continue
            if protect is None and (not core.free or core.quotas is not None):
                protect = core.guess_protect(eids, keep_layers)
            if not core.make_room(eid, protect=protect or frozenset()):
                break
            started.append((eid, core.add(eid, speculative=True, ready=False)))
            self.stats.layer(eid[0]).prefetch_issued += 1
        if started:  # queued together, in this order: one hand-over to the I/O threads
            tasks = self.loader.submit_many([(eid, ent.slot) for eid, ent in started], PREFETCH)
            for (_, ent), task in zip(started, tasks):
                ent.task = task
        self.stats.prefetch_issued += len(started)
        self._note_occupancy()
        return len(started)

    def arrival_key(self, eid: ExpertId) -> tuple[int, int, int]:
        """Sorts experts by when they will be ready: ready ones, then loads being read, then queued
        loads in the order the loader serves them (priority, then submission)."""
        ent = self.core.entries.get(eid)
        if ent is None or ent.ready or ent.task is None:
            return (0, 0, 0)
        return (1 if ent.task.state == RUNNING else 2, ent.task.priority, ent.task.seq)

    def _note_occupancy(self) -> None:
        n = len(self.core.entries)
        if n > self.max_occupancy:
            self.max_occupancy = n

    def resident(self) -> set[ExpertId]:
        return {e for e, n in self.core.entries.items() if n.ready}

    def holding(self, layer: int) -> set[int]:
        """Experts of `layer` holding a slot, ready or loading: an acquire now would count them as hits."""
        return {e for (l, e) in self.core.entries if l == layer}

    def close(self) -> None:
        self.loader.close()
        self.store.close()
