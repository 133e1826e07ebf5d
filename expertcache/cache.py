"""The expert cache: slots under a byte budget, and every rule of what loads, waits and goes.

CacheCore owns the rules on ids (docs/ARCHITECTURE.md, "Cache rules"); it moves bytes through a
`Reader`: the engine's Loader, or the simulator's clocked link, so both run the very same rules.
ExpertCache adds the slot memory: a layer call asks it one thing, `stream()`, and gets its experts'
weights back in the order they become ready.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import BudgetError, ExpertLoadError
from .ids import CANCELLED, DEMAND, DONE, FAILED, PREFETCH, UPGRADE, ExpertId, Prediction
from .loader import Loader
from .policies import EvictionPolicy
from .stats import Stats
from .store import ExpertStore, SlotArena

log = logging.getLogger(__name__)

FINISHED = (DONE, FAILED, CANCELLED)


class Reader(Protocol):
    """What moves expert bytes into slots. A load is an opaque handle; its state is one of
    loader.QUEUED, RUNNING, DONE, FAILED, CANCELLED."""

    def submit_many(self, loads: list[tuple[ExpertId, int]], priority: int, copy: int = 0) -> list: ...  # (expert, slot) -> loads;
    # copy=1 (passed only then): read the miss copy's experts (a Reader of a cache without one never sees it)

    def promote(self, load) -> None: ...  # a speculative load is needed now: demand priority

    def cancel(self, load) -> bool: ...  # True: it will never be read, its slot is free now

    def state(self, load) -> str: ...

    def error(self, load) -> BaseException | None: ...

    def wait(self, load) -> float: ...  # until it is over; the seconds waited

    def arrival(self, load) -> tuple: ...  # sort key: loads that will be ready sooner first


@dataclass
class Entry:
    slot: int
    load: object | None = None  # the Reader's handle while loading
    ready: bool = False
    speculative: bool = False  # loaded on a guess and not used yet
    wasted: bool = False  # its layer ran without needing it
    pins: int = 0
    low: bool = False  # holds the miss copy's expert (smaller, lossy), not the model's own
    low_uses: int = 0  # calls that have needed it while it held the miss copy's expert
    nbytes: int = 0  # bytes of its latest load (what a cancel takes back from bytes_read)
    upgrade_from: object | None = None  # while the full copy is read over the miss copy's: that copy's (finished) load


def capacity_for(budget_bytes: int, expert_bytes: int, top_k: int, num_experts: int) -> int:
    """Slots a budget buys, or a one-line error when it cannot hold one layer's top-k experts."""
    minimum = top_k * expert_bytes
    if budget_bytes < minimum:
        raise BudgetError(
            f"expert budget {budget_bytes} bytes is below the minimum {minimum} bytes "
            f"({top_k} experts of {expert_bytes} bytes: one layer's top-{top_k}); raise --expert-budget"
        )
    return min(budget_bytes // expert_bytes, num_experts)


def equal_quotas(capacity: int, layers: list[int]) -> dict[int, int]:
    """Split `capacity` slots over layers as evenly as possible (earlier layers get the remainder)."""
    base, extra = divmod(capacity, len(layers))
    return {layer: base + (1 if i < extra else 0) for i, layer in enumerate(layers)}


class CacheCore:
    """Slot accounting and every cache rule, on ids, over a Reader."""

    def __init__(self, *, capacity: int, policy: EvictionPolicy, reader: Reader, stats: Stats,
                 expert_bytes: dict[int, int], layers: list[int] = (), experts_per_layer: int = 0,
                 quotas: dict[int, int] | None = None, low_bytes: dict[int, int] | None = None) -> None:
        self.capacity = capacity
        self.policy = policy
        self.reader = reader
        self.stats = stats
        self.expert_bytes = expert_bytes  # layer -> bytes of one expert
        self.low_bytes = low_bytes  # layer -> bytes of one expert of the miss copy (None: there is none)
        self.miss_low = False  # demand misses load the miss copy (set per forward: decode steps; see Mixed precision)
        self.low_guesses = False  # ...and, while miss_low, guesses too (--miss-copy-reads all)
        self.upgrade_after = 2  # calls on a miss copy's expert after which its full copy is read (0: never)
        self.quotas = quotas  # per-layer slot shares of a partitioned policy
        self.layers = sorted(layers)  # sparse layers in forward order; [] = no sweep rule
        self.experts_per_layer = experts_per_layer
        self.entries: dict[ExpertId, Entry] = {}
        self.free = list(range(capacity - 1, -1, -1))
        self.per_layer: Counter = Counter()
        self.unready: set[ExpertId] = set()  # entries whose load may be in flight (may hold some that are ready: checked on use)
        self.guesses: set[ExpertId] = set()  # entries loaded on a guess and not used yet (speculative)
        self.now = -1  # index of the running wave: tick() before each, so the first is 0 (Belady's future)
        self.sweep: int | None = None  # the running layer while its call is a sweep (see route)
        self.sweep_needed: frozenset[int] = frozenset()  # ...and the experts that call still needs (stream's `each` lets computed ones go)
        self.guessed: set[int] = set()  # layers some guess has targeted
        self.max_occupancy = 0  # most slots ever held by ready + loading entries (<= capacity)
        self._order = {layer: i for i, layer in enumerate(self.layers)}

    # --- one layer call ------------------------------------------------------------------------
    def stream(self, layer: int, needed: list[int], guesses: Callable[[], Prediction] | None = None, *,
               each: bool = False) -> Iterator[ExpertId]:
        """One layer call: yields the distinct experts `needed` (ascending) ready, soonest first.

        Its layer's unneeded guesses are written off; the experts are pinned in waves of at most
        `capacity` (misses start demand loads); after the first wave's demand loads, `guesses()`
        is asked for and its guesses requested; in a sweep they are requested again once the
        call's own experts are done. Close the generator (contextlib.closing) if you stop early."""
        self.preempt(layer, needed)
        requested: Prediction = []
        for start in range(0, len(needed), self.capacity):
            wave = self.acquire(layer, needed[start : start + self.capacity])
            pinned = set(wave)
            try:
                if start == 0 and guesses is not None:
                    requested = guesses() or []
                    self.request(layer, requested)
                pending = list(wave)
                while pending:
                    # nothing ready: wait for the load that arrives first (prefetched ones lead)
                    ready = [e for e in pending if self.ready(e)] or [min(pending, key=self.arrival_key)]
                    for eid in ready:
                        self.wait(eid)
                        if self.entries[eid].low:
                            self.stats.count(layer, "low_uses")  # computed on the miss copy's expert
                        yield eid
                        pending.remove(eid)
                        if each and self.sweep == layer:  # computed: its slot is the guesses' (used furthest ahead)
                            self.sweep_needed = self.sweep_needed - {eid[1]}
                            self.release([eid])
                            pinned.discard(eid)
                            if requested:
                                self._hand_over(eid, requested)
            finally:
                self.release(pinned)
        if requested and self.sweep == layer:
            # a sweep: guesses could not take the slots Belady keeps while this layer computed;
            # now its own experts are done (used furthest ahead), they make room for the rest
            self.end_call()
            self.request(layer, requested, after=True)
        if self.low_bytes is not None:
            self.upgrade([(layer, e) for e in needed])

    def _hand_over(self, freed: ExpertId, guesses: Prediction) -> None:
        """In a sweep (stream's `each`), an expert the call has computed gives its slot at once to
        the call's first guess that holds none: it is used next in the next forward, after every
        layer guessed for (Belady's choice, as the sweep's eviction order has it), and the guess's
        load overlaps the rest of the call instead of starting after it. A free slot or a
        written-off guess is taken first."""
        for target, experts in guesses:
            for e in experts:
                if (target, e) not in self.entries:
                    self.prefetch([(target, e)], victim=freed)
                    return

    def preempt(self, layer: int, needed: Iterable[int]) -> None:
        """The layer's router has run: its speculative entries it does not need are wrong guesses;
        cancel those still queued and mark the rest first to go. (Only entries still loading and
        guesses are looked at, not every resident expert.)"""
        needed = set(needed)
        self.route(layer, needed)
        for eid in list(self.unready):
            ent = self.entries.get(eid)
            if ent is None or ent.ready:
                self.unready.discard(eid)
            elif ent.pins == 0 and ent.load is not None and self._finished(ent):
                self._settle(eid, ent)  # a finished load is evictable now (nothing else settles a wrong guess)
        for eid in sorted(e for e in self.guesses if e[0] == layer and e[1] not in needed):
            ent = self.entries.get(eid)
            if ent is None or not ent.speculative:
                self.guesses.discard(eid)
                continue
            if ent.wasted:
                continue
            ent.wasted = True
            self.stats.count(layer, "prefetch_wasted")
            if not ent.ready and self._cancel(eid, ent):
                self.remove(eid)

    def acquire(self, layer: int, experts: Iterable[int]) -> list[ExpertId]:
        """Pin `experts` of `layer` (at most `capacity` of them); start demand loads for misses."""
        self.tick()
        out, missed = [], []
        for x in experts:
            eid = (layer, int(x))
            ent = self.entries.get(eid)
            if ent is not None and ent.upgrade_from is not None:
                self._need_upgrading(eid, ent)
                ent = self.entries.get(eid)  # a failed upgrade took its entry with it: a miss
            if ent is None:
                self._reclaim(eid)
                ent = self.add(eid, speculative=False)
                missed.append((eid, ent))
            elif ent.speculative:
                self._first_use(eid, ent)
            else:
                self.policy.access(eid, self.now)
            ent.pins += 1
            out.append(eid)
        for stats in (self.stats, self.stats.layer(layer)):
            stats.lookups += len(out)
            stats.hits += len(out) - len(missed)
            stats.misses += len(missed)
        if self.low_bytes is not None:  # a miss copy: its smaller experts now, the full ones later (upgrade)
            if self.miss_low and missed:
                for _, ent in missed:
                    ent.low = True
                self.stats.count(layer, "low_loads", len(missed))
            for eid in out:
                ent = self.entries[eid]
                ent.low_uses += ent.low
        self._submit(missed, DEMAND)  # the layer's demand loads queued together, in the order computed
        return out

    def _first_use(self, eid: ExpertId, ent: Entry) -> None:
        """A guess is needed: it counts as used (and late if still loading), and joins the policy
        now, as a demand load does at its miss (a wrong guess never skews the policy's counts)."""
        layer = eid[0]
        ent.speculative = False
        self.guesses.discard(eid)
        if ent.wasted:  # a guess written off for an earlier token, used now after all
            ent.wasted = False
            self.stats.count(layer, "prefetch_wasted", -1)
        self.stats.count(layer, "prefetch_used")
        if not ent.ready and self._finished(ent) and self.reader.error(ent.load) is None:
            ent.ready = True  # arrived in time
            self.unready.discard(eid)
        if not ent.ready:
            self.stats.count(layer, "prefetch_late")
            self.reader.promote(ent.load)
        self.policy.insert(eid, self.now)

    def release(self, eids: Iterable[ExpertId]) -> None:
        for eid in eids:
            ent = self.entries.get(eid)
            if ent is not None:
                ent.pins -= 1
                if ent.pins == 0 and ent.load is not None and self.reader.error(ent.load) is not None:
                    self.remove(eid)

    # --- mixed precision: a miss copy's experts, upgraded when the link is idle ---------------------
    def upgrade(self, eids: Iterable[ExpertId]) -> None:
        """Read the full copy of each of `eids` that holds the miss copy's expert, unused now and
        needed by `upgrade_after` calls or more (2, the default: an expert used again, which the
        cache is likely to keep; an expert evicted after one use never costs its full read), over
        it, at the lowest priority (after every demand load and guess: when the link is idle).
        Until it lands the entry is loading: a call that needs it first cancels the read if no byte
        is read yet (the small copy is still whole) or waits for it (_need_upgrading)."""
        if self.upgrade_after <= 0:
            return
        todo = []
        for eid in eids:
            ent = self.entries.get(eid)
            if (ent is None or not ent.low or not ent.ready or ent.pins or ent.upgrade_from is not None
                    or ent.low_uses < self.upgrade_after):
                continue
            ent.upgrade_from, ent.ready = ent.load, False
            self.unready.add(eid)
            todo.append((eid, ent))
        if todo:
            self._submit(todo, UPGRADE)
            for eid, _ in todo:
                self.stats.count(eid[0], "upgrades")

    def _need_upgrading(self, eid: ExpertId, ent: Entry) -> None:
        """A call needs an expert whose full copy is being read over its miss copy's."""
        if self._finished(ent):
            self._settle(eid, ent)  # landed (or failed: then the entry is gone)
        elif self._cancel(eid, ent):  # not a byte read: the miss copy's expert is whole
            ent.load, ent.upgrade_from, ent.ready = ent.upgrade_from, None, True
            ent.nbytes = self.low_bytes[eid[0]]
            self.unready.discard(eid)
        else:
            self.reader.promote(ent.load)  # partly read: the full copy it is, now

    def ready(self, eid: ExpertId) -> bool:
        ent = self.entries[eid]
        if not ent.ready and self._finished(ent):
            self._settle(eid, ent)
        return eid in self.entries and self.entries[eid].ready

    def wait(self, eid: ExpertId) -> None:
        """Until the expert's load is over; raises its read error."""
        ent = self.entries[eid]
        if ent.ready:
            return
        self._wait(eid, ent)
        error = self.reader.error(ent.load)
        if error is not None:
            raise error
        if self.reader.state(ent.load) == CANCELLED:  # only closing the engine cancels a load someone waits for
            raise ExpertLoadError(f"the load of expert {eid} was cancelled (the engine is closing)")

    def arrival_key(self, eid: ExpertId) -> tuple:
        ent = self.entries.get(eid)
        if ent is None or ent.ready or ent.load is None:
            return (0, 0, 0)
        return self.reader.arrival(ent.load)

    # --- guesses -------------------------------------------------------------------------------
    def request(self, layer: int, guesses: Prediction, *, after: bool = False) -> None:
        """Prefetch what a call at `layer` guessed for later layers, never evicting what the next
        layers may need first (guess_keep)."""
        self.guessed.update(t for t, _ in guesses)
        eids = [(target, e) for target, experts in guesses for e in experts]
        if eids:
            self.prefetch(eids, keep_layers=self.guess_keep(layer, max(t for t, _ in guesses), after=after))

    def request_lead(self, layer: int, experts: list[int]) -> None:
        """Prefetch a layer's experts before its call (the first sparse layer, which no predictor sees)."""
        self.prefetch([(layer, e) for e in experts], keep_layers={layer})

    def prefetch(self, eids: list[ExpertId], *, keep_layers: Iterable[int] = (), victim: ExpertId | None = None) -> int:
        """Start speculative loads for `eids` (in priority order) that hold no slot, within the
        budget, never evicting a pinned entry, one this request wants or any entry of `keep_layers`
        (nor, in a sweep, anything Belady keeps). A wrong guess may take a free slot, a written-off
        guess, or what the eviction policy would evict next anyway. `victim`: the entry to evict
        for the first when no slot is free and no written-off guess is evictable (_hand_over's
        choice, made for it). Returns loads started."""
        protect: set[ExpertId] | None = None  # made when a guess first has to evict (a decode step's guesses are mostly resident)
        started: list[tuple[ExpertId, Entry]] = []
        for eid in eids:
            if eid in self.entries:
                continue
            if victim is not None and not self.free:
                wasted = next((g for g in self.guesses if self._evictable(g, frozenset()) and self.entries[g].wasted), None)
                if wasted is not None or self._evictable(victim, frozenset()):
                    self.remove(wasted or victim)
                victim = None
            if protect is None and (not self.free or self.quotas is not None):
                protect = self.guess_protect(eids, keep_layers)
            if not self.make_room(eid, protect=protect or frozenset()):
                break
            ent = self.add(eid, speculative=True)
            if self.miss_low and self.low_guesses:
                ent.low = True
                self.stats.count(eid[0], "low_loads")
            started.append((eid, ent))
            self.stats.layer(eid[0]).prefetch_issued += 1
        self.stats.prefetch_issued += len(started)
        self._submit(started, PREFETCH)  # queued together, in this order: one hand-over to the reader
        return len(started)

    def guess_keep(self, layer: int, last_target: int, *, after: bool = False) -> set[int]:
        """Layers whose resident experts guesses made at `layer` (targets up to `last_target`) may
        not evict: the running and skipped-over layers (needed before any guess is) and layers no
        guess ever targets (the first sparse layer: evicted, its experts only come back by a
        demand miss). `after` the running call, its own layer is no longer needed first."""
        keep = set(range(layer, last_target + 1))
        keep.update(l for l, n in self.per_layer.items() if n and l not in self.guessed)
        if after:
            keep.discard(layer)
        return keep

    def guess_protect(self, eids: Iterable[ExpertId], keep_layers: Iterable[int]) -> set[ExpertId]:
        """What a request for guesses `eids` may not evict: the experts it wants, every entry of
        `keep_layers` and, in a sweep, what Belady keeps (kept_from_guesses)."""
        keep = set(keep_layers)
        return set(eids) | {e for e in self.entries if e[0] in keep} | self.kept_from_guesses()

    # --- sweeps ------------------------------------------------------------------------------
    def route(self, layer: int, needed: Iterable[int]) -> None:
        """The running call needs the distinct experts `needed` of `layer`. A call that needs at
        least half of them (a long prompt) is a sweep: every later layer of this forward will need
        most of its experts too, so until the next call eviction follows the forward order instead
        of the policy (_sweep_victim). The policy still orders experts inside a layer; partitioned
        policies and Belady (which knows the future) keep their own order."""
        needed = frozenset(needed)
        sweep = (
            layer in self._order
            and self.quotas is None
            and self.policy.name != "belady"
            and len(needed) >= max(2, (self.experts_per_layer + 1) // 2)
        )
        self.sweep = layer if sweep else None
        self.sweep_needed = needed if sweep else frozenset()

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
        L+1 (this forward); never one the call needs. Belady's choice for a prompt that uses every
        expert; an LRU or LFU would instead evict the first layers, which the next prompt needs first."""
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

    # --- slots -------------------------------------------------------------------------------
    def tick(self) -> int:
        self.now += 1
        return self.now

    def _evictable(self, eid: ExpertId, protect: set[ExpertId]) -> bool:
        e = self.entries.get(eid)
        return e is not None and e.ready and e.pins == 0 and eid not in protect

    def choose_victim(self, protect: set[ExpertId] = frozenset()) -> ExpertId | None:
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
            victim = self.choose_victim(protect)
            if victim is None:
                return False
            self.remove(victim)
        return True

    def add(self, eid: ExpertId, *, speculative: bool) -> Entry:
        ent = Entry(slot=self.free.pop(), speculative=speculative)
        self.entries[eid] = ent
        self.unready.add(eid)
        if speculative:
            self.guesses.add(eid)
        self.per_layer[eid[0]] += 1
        if not speculative:  # a guess joins the policy at its first use (acquire)
            self.policy.insert(eid, self.now)
        self.max_occupancy = max(self.max_occupancy, len(self.entries))
        return ent

    def remove(self, eid: ExpertId) -> Entry:
        ent = self.entries.pop(eid)
        self.unready.discard(eid)
        self.guesses.discard(eid)
        self.per_layer[eid[0]] -= 1
        self.policy.remove(eid)
        self.free.append(ent.slot)
        return ent

    @contextmanager
    def no_free_slots(self) -> Iterator[None]:
        """Hold every free slot aside while inside, so each new load evicts (measure.py)."""
        held, self.free = self.free, []
        try:
            yield
        finally:
            self.free.extend(held)

    def clear(self) -> None:
        """Evict everything, waiting for (or cancelling) loads still in flight; forget the guesses."""
        for eid, ent in list(self.entries.items()):
            if ent.load is not None and not self._finished(ent) and not self._cancel(eid, ent, count=False):
                self._wait(eid, ent)
            if eid in self.entries:
                self.remove(eid)
        self.guessed.clear()
        self.sweep, self.sweep_needed = None, frozenset()

    # --- loads -------------------------------------------------------------------------------
    def _submit(self, new: list[tuple[ExpertId, Entry]], priority: int) -> None:
        """Hand loads to the reader; an entry marked `low` (not upgrading) reads the miss copy."""
        full, low = new, []
        if self.low_bytes is not None:
            full, low = [], []
            for pair in new:
                (low if pair[1].low and pair[1].upgrade_from is None else full).append(pair)
        for mine, copy, sizes in ((full, 0, self.expert_bytes), (low, 1, self.low_bytes)):
            if not mine:
                continue
            pairs = [(eid, ent.slot) for eid, ent in mine]
            loads = self.reader.submit_many(pairs, priority, copy) if copy else self.reader.submit_many(pairs, priority)
            for (eid, ent), load in zip(mine, loads):
                ent.load, ent.nbytes = load, sizes[eid[0]]
                self.stats.bytes_read += ent.nbytes

    def _finished(self, ent: Entry) -> bool:
        return self.reader.state(ent.load) in FINISHED

    def _cancel(self, eid: ExpertId, ent: Entry, *, count: bool = True) -> bool:
        if not self.reader.cancel(ent.load):
            return False
        self.stats.bytes_read -= ent.nbytes
        if ent.upgrade_from is not None:  # an upgrade, whoever cancels it
            self.stats.count(eid[0], "upgrades", -1)
            self.stats.count(eid[0], "upgrades_cancelled")
        elif count:
            self.stats.count(eid[0], "prefetch_cancelled")
        return True

    def _wait(self, eid: ExpertId, ent: Entry) -> None:
        waited = self.reader.wait(ent.load)
        if waited:
            self.stats.count(eid[0], "stall_seconds", waited)
        self._settle(eid, ent)

    def _settle(self, eid: ExpertId, ent: Entry) -> None:
        if self.reader.error(ent.load) is not None or self.reader.state(ent.load) == CANCELLED:
            if ent.pins == 0 and self.entries.get(eid) is ent:
                self.remove(eid)
            return
        if ent.upgrade_from is not None:  # the full copy has landed over the miss copy's
            ent.low, ent.upgrade_from = False, None
        ent.ready = True
        self.unready.discard(eid)

    def _reclaim(self, incoming: ExpertId) -> None:
        """Make room for a demand load, cancelling or waiting for speculative loads if need be."""
        if self.make_room(incoming):
            return
        # every ready entry is pinned: take a slot back from an unpinned load in flight
        loading = [(e, n) for e, n in self.entries.items() if not n.ready and n.pins == 0]
        for eid, ent in loading:
            if self._cancel(eid, ent):
                if ent.speculative and not ent.wasted:
                    self.stats.count(eid[0], "prefetch_wasted")
                self.remove(eid)
                return
        for eid, ent in loading:
            self._wait(eid, ent)
            if eid in self.entries:
                self.remove(eid)
            return
        raise RuntimeError(f"no slot can be freed for {incoming}: all {self.capacity} slots are pinned")


class ExpertCache:
    """Expert slots in memory, filled from the checkpoint by the Loader, under a byte budget.

    `low_store` (a miss copy: the same model's experts quantized smaller, `--miss-copy`) gives
    decode misses a smaller read (CacheCore.miss_low) and upgrades them later; every slot holds
    either copy, so the budget buys the same slots with it as without."""

    def __init__(self, *, store: ExpertStore, budget_bytes: int, expert_bytes: int, top_k: int,
                 policy: EvictionPolicy, partitioned: bool, layers: list[int], io_threads: int, stats: Stats,
                 prepare: Callable[[tuple[torch.Tensor, ...]], None] | None = None, quant=None,
                 low_store: ExpertStore | None = None, low_quant=None, low_expert_bytes: int = 0) -> None:
        capacity = capacity_for(budget_bytes, expert_bytes, top_k, store.num_experts)
        self.budget_bytes = budget_bytes
        self.store, self.low_store = store, low_store
        self.quant, self.low_quant = quant, low_quant  # how each copy's experts compute (None: as saved)
        copies = ()
        if low_store is not None:
            copies = ((low_store, low_quant.prepare if low_quant is not None and low_quant.repacks else None),)
        self.arena = SlotArena(capacity, max(s.slot_bytes for s in (store, low_store) if s is not None))
        self.loader = Loader(store, self.arena, threads=io_threads, prepare=prepare, copies=copies)
        low_bytes = None if low_store is None else {l: low_expert_bytes for l in layers}
        self.core = CacheCore(
            capacity=capacity, policy=policy, reader=self.loader, stats=stats,
            expert_bytes={l: expert_bytes for l in layers}, layers=layers,
            experts_per_layer=store.num_experts // max(len(layers), 1),
            quotas=equal_quotas(capacity, sorted(layers)) if partitioned else None, low_bytes=low_bytes,
        )  # fmt: skip

    @property
    def capacity(self) -> int:
        return self.core.capacity

    def stream(self, layer: int, needed: list[int], guesses: Callable[[], Prediction] | None = None, *, each: bool = False
               ) -> Iterator[tuple[int, tuple[torch.Tensor, ...], object]]:
        """One layer call (CacheCore.stream): yields (expert, its part tensors, how they compute:
        a QuantExperts or None), soonest ready first."""
        with closing(self.core.stream(layer, needed, guesses, each=each)) as ready:
            for eid in ready:
                yield (eid[1], *self._view(eid))

    def _view(self, eid: ExpertId) -> tuple[tuple[torch.Tensor, ...], object]:
        ent = self.core.entries[eid]
        if ent.low:
            return self.arena.tensors(ent.slot, self.low_store.plan(eid)), self.low_quant
        return self.arena.tensors(ent.slot, self.store.plan(eid)), self.quant

    def weights(self, eid: ExpertId) -> tuple[torch.Tensor, ...]:
        """The part tensors of an expert holding a slot (views of it), once its load is over."""
        self.core.wait(eid)
        return self._view(eid)[0]

    def holding(self, layer: int) -> set[int]:
        """Experts of `layer` holding a slot, ready or loading: an acquire now would count them as hits."""
        return {e for (l, e) in self.core.entries if l == layer}

    def resident(self) -> set[ExpertId]:
        return {e for e, n in self.core.entries.items() if n.ready}

    def close(self) -> None:
        self.loader.close()
        self.store.close()
        if self.low_store is not None:
            self.low_store.close()
