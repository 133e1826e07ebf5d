"""Calibrating the "measured" hardware profile on this machine, through a real engine: its
store's reads for the link, its decode steps for compute, its demand misses for what a read costs."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..config import EngineConfig
from ..decoding import Decoding
from ..engine import Engine
from ..ids import DEMAND
from ..loader import Loader
from ..store import ALIGN, Chunk, SlotArena
from ..errors import ExpertCacheError
from .hardware import HARDWARE_NAMES, PRESETS, Hardware

MEASURE_READS = 48  # experts loaded (and first blocks read) to calibrate the per-load fixed cost
MEASURE_SPAN_BYTES = 256 * 2**20  # most bytes of the one long read that calibrates bandwidth
MEASURE_STEPS = 16  # decode steps timed to calibrate compute (mean), and forward pairs for the miss cost


def get_hardware(name: str, *, model: str | Path | None = None, prefetch: str = "none") -> Hardware:
    """A preset by name, or "measured": calibrated on `model` (a checkpoint dir; None = demo)."""
    if name in PRESETS:
        return PRESETS[name]
    if name == "measured":
        return measure(model, prefetch=prefetch)
    raise ExpertCacheError(f"unknown hardware {name!r}: choose one of {', '.join(HARDWARE_NAMES)}")


def measure(source=None, *, reads: int = MEASURE_READS, steps: int = MEASURE_STEPS, prefetch: str = "none") -> Hardware:
    """Calibrate a profile on this machine from an Engine or a checkpoint directory (None = the
    bundled demo model).

    Link, through the ExpertStore's own reads (O_DIRECT unless the filesystem refuses it): the
    bandwidth comes from one long read over the experts of the largest file (at most
    MEASURE_SPAN_BYTES); the latency is the fixed cost of one expert load as the engine pays it.
    When the cache holds every expert it comes from demand misses in decode forwards: each
    forward is run with every expert resident and again with one routed expert per layer evicted
    and the cache kept full (so a miss evicts, as in a run; prefetch off); per miss, the time the
    forward waited for it, less its transfer at that bandwidth, is the latency, and the rest of
    the time it added (the eviction, the submission, wake-ups, computing on freshly read
    weights) is `read_cpu`, charged to every read. Otherwise
    `reads` experts are loaded one by one through the engine's Loader (submitted, read on a
    reader thread, the waiter woken): their mean time minus the transfer, and never less than one
    aligned block read per part (the device's own latency, median). Compute: every
    expert is made resident first (when the cache holds them all), then `steps` decode forwards
    are timed after a warm-up, minus any time they waited on expert loads; the mean, divided by
    the sparse layers. Means, not medians: the cost model adds these up, and on a shared machine
    the tail (a reader thread or the waiter scheduled late) is part of what a token costs.
    Compute is everything but the loads: attention, router, experts, sampling, and the predictor
    (`prefetch`, run with nothing left to load), so a profile for a prefetching engine is measured
    with its predictor. A checkpoint is opened with a 100% budget; an Engine given is used as it is
    (its cache and counters move)."""
    if isinstance(source, Engine):
        return _measure(source, reads, steps)
    cfg = EngineConfig(model=str(source) if source is not None else None, expert_budget="100%", prefetch=prefetch)
    with Engine(cfg) as engine:
        return _measure(engine, reads, steps)


def _measure(engine, reads: int, steps: int) -> Hardware:
    latency, bandwidth = _measure_reads(engine.store, engine.checkpoint.experts, reads, threads=engine.config.io_threads)
    compute = _measure_compute(engine, steps) / len(engine.checkpoint.sparse_layers)
    read_cpu = 0.0
    miss = _measure_miss(engine, steps)
    if miss is not None:  # a demand miss as the engine pays it: its wait, and the compute it adds
        wait, read_cpu = miss
        # never below the device's own latency: under load the wait can measure less than its transfer
        latency = max(wait - engine.checkpoint.expert_bytes / bandwidth, latency)
    desc = f"measured on this machine: {engine.store.io_effective} reads of {engine.checkpoint.model_dir}"
    return Hardware("measured", desc, bandwidth, latency, compute, read_cpu)


def _measure_reads(store, experts: dict, n: int, *, threads: int = 2) -> tuple[float, float]:
    """(fixed cost of one expert load, bandwidth): one long read over the experts' largest file
    gives the bandwidth; `n` experts loaded through a Loader of `threads` reader threads give the
    fixed cost (mean load time minus the transfer), at least one aligned block read per part."""

    eids = sorted(experts)
    picks = [eids[i * len(eids) // min(n, len(eids))] for i in range(min(n, len(eids)))]
    parts = statistics.median(len(store.plan(e).chunks) for e in picks)
    block_times = []
    arena = SlotArena(1, ALIGN)
    for eid in picks:
        c0 = store.plan(eid).chunks[0]
        t0 = time.perf_counter()
        store.read_chunk(eid, Chunk(c0.path, c0.file_offset, ALIGN, 0, 0, 1), arena.slot(0))
        block_times.append(time.perf_counter() - t0)
    block = statistics.median(block_times)
    # the file holding the most expert bytes, read from its first expert to its last
    spans: dict[str, list[int]] = {}
    for parts_ in experts.values():
        for ref in parts_.parts:
            lo, hi = spans.get(ref.path, (ref.offset, ref.offset + ref.nbytes))
            spans[ref.path] = [min(lo, ref.offset), max(hi, ref.offset + ref.nbytes)]
    path, (lo, hi) = max(spans.items(), key=lambda kv: kv[1][1] - kv[1][0])
    start = lo - lo % ALIGN
    length = min(hi - start + (-(hi - start)) % ALIGN, MEASURE_SPAN_BYTES)
    arena = SlotArena(1, length)
    t0 = time.perf_counter()
    store.read_chunk(eids[0], Chunk(path, start, length, 0, length, 1), arena.slot(0))
    dt = time.perf_counter() - t0
    bandwidth = length / (dt - block if dt > 2 * block else dt)
    loader = Loader(store, SlotArena(1, store.slot_bytes), threads=threads)
    try:
        load_times = []
        for eid in picks:
            t0 = time.perf_counter()
            loader.submit(eid, 0, DEMAND).wait()
            load_times.append(time.perf_counter() - t0)
    finally:
        loader.close()
    transfer = statistics.mean(sum(r.nbytes for r in experts[e].parts) for e in picks) / bandwidth
    return max(statistics.mean(load_times) - transfer, parts * block), bandwidth


def _measure_compute(engine, steps: int) -> float:
    vocab = int(engine.model.config.vocab_size)
    decoding = Decoding(engine.model)
    times = []
    _make_resident(engine)  # misses cost more than their stall (submission, wake-ups): time none
    with torch.inference_mode():
        decoding.feed([1 % vocab, 2 % vocab])
        for i in range(steps + 1):
            stall0 = engine.stats_.stall_seconds
            t0 = time.perf_counter()
            decoding.feed([(3 + i) % vocab])
            dt = time.perf_counter() - t0 - (engine.stats_.stall_seconds - stall0)
            if i:  # the first decode step warms kernels and the cache
                times.append(max(dt, 0.0))
    return statistics.mean(times)


def _measure_miss(engine, steps: int) -> tuple[float, float] | None:
    """(wait, other compute) one demand miss adds to a decode forward, as the engine pays it:
    `steps` times, a forward with every expert resident, then the same forward again (the KV
    cache cropped back) with one of its routed experts per layer evicted and no free slot left,
    prefetch off for both; per miss, the mean time waited (the engine's stall counter) and the
    mean of the rest of the difference (at least 0). None when the cache cannot hold every
    expert."""
    if not _make_resident(engine):
        return None
    core = engine.cache.core
    vocab = int(engine.model.config.vocab_size)
    decoding = Decoding(engine.model)
    routed: dict[int, int] = {}

    def note(layer, x, logits, weights, ids) -> None:
        routed[layer] = int(ids.reshape(-1)[0])

    waits, others = [], []
    with engine.prefetch_paused(), torch.inference_mode():
        decoding.feed([1 % vocab, 2 % vocab])
        for i in range(steps):
            _make_resident(engine)
            token = [(3 + i) % vocab]
            pos = len(decoding)
            with engine.observe(note):
                t0 = time.perf_counter()
                decoding.feed(token)
                quiet = time.perf_counter() - t0
            decoding.crop(pos)  # drop the token again
            for layer, e in routed.items():
                if (layer, e) in core.entries:
                    core.remove((layer, e))
            misses0, stall0 = engine.stats_.misses, engine.stats_.stall_seconds
            with core.no_free_slots():  # a full cache: each miss evicts
                t0 = time.perf_counter()
                decoding.feed(token)
                busy = time.perf_counter() - t0
            misses, stall = engine.stats_.misses - misses0, engine.stats_.stall_seconds - stall0
            if misses:
                waits.append(stall / misses)
                others.append((busy - quiet - stall) / misses)
    _make_resident(engine)
    if not waits:
        return None
    return statistics.mean(waits), max(statistics.mean(others), 0.0)


def _make_resident(engine) -> bool:
    """Load every expert into the engine's cache if it holds them all (False if it does not)."""
    cache, ckpt = engine.cache, engine.checkpoint
    if cache.capacity < len(ckpt.experts):
        return False
    by_layer: dict[int, list[int]] = {}
    for layer, e in sorted(ckpt.experts):
        by_layer.setdefault(layer, []).append(e)
    for layer, experts in by_layer.items():
        for _ in cache.stream(layer, experts):
            pass
    return True
