"""Checks of an engine after a run: slots, pins, bytes read and the I/O mode really used."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Record:
    task: object
    priority: int  # at submit time (a prefetch may be promoted later)
    copy: int = 0  # 0 the model's expert, 1 the miss copy's
    chunks: list[int] = field(default_factory=list)  # chunk indices read, in order


class LoadRecorder:
    """Records every load task an engine's loader is given and every chunk it reads, so the
    bytes-read accounting can be checked exactly. Install before running the engine."""

    def __init__(self, engine) -> None:
        self.engine = engine
        loader = engine.cache.loader
        self.records: dict[int, _Record] = {}
        self._lock = threading.Lock()
        submit_many = loader.submit_many  # loader.submit goes through it too

        def recording_submit_many(loads, priority, copy=0):
            tasks = submit_many(loads, priority, copy)
            with self._lock:
                for task in tasks:
                    self.records.setdefault(id(task), _Record(task, priority, copy))
            return tasks

        def on_chunk(task, i):  # runs on an I/O thread, under the loader's lock
            with self._lock:
                self.records.setdefault(id(task), _Record(task, task.priority)).chunks.append(i)

        loader.submit_many = recording_submit_many
        loader.on_chunk = on_chunk

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every recorded task is finished (done, failed or cancelled)."""
        for rec in list(self.records.values()):
            assert rec.task.event.wait(timeout), f"load of {rec.task.eid} never finished"

    def check_bytes(self) -> None:
        """bytes_read == (misses + prefetch_issued - prefetch_cancelled) * expert_bytes, exactly
        (with a miss copy: its loads at its expert size, and each upgrade a full expert).

        Every demand load and every prefetch reads all its chunks once, except a cancelled one,
        which reads none: Loader.cancel only succeeds on a task that has not read a chunk (a
        prefetch that yielded to a demand read between chunks is back in the queue, but cancel
        refuses it and it is read to the end). Were cancel ever to accept such a task again, its
        partial chunks would be read but its expert not; `partial` below is that excess, reported
        in the failure message."""
        from expertcache.ids import CANCELLED, DEMAND, DONE, PREFETCH, UPGRADE

        self.drain()
        eng = self.engine
        s = eng.stats()
        stores = (eng.store, eng.cache.low_store)
        recs = list(self.records.values())
        demand = [r for r in recs if r.priority == DEMAND]
        prefetch = [r for r in recs if r.priority == PREFETCH]
        upgrades = [r for r in recs if r.priority == UPGRADE]
        cancelled = [r for r in recs if r.task.state == CANCELLED]
        assert len(demand) == s["misses"], (len(demand), s["misses"])
        assert sum(r.copy for r in demand + prefetch) == s["low_loads"], (sum(r.copy for r in demand + prefetch), s["low_loads"])
        assert len(prefetch) == s["prefetch_issued"], (len(prefetch), s["prefetch_issued"])
        assert not any(r.copy for r in upgrades), "an upgrade read the miss copy"
        assert len(upgrades) == s["upgrades"] + s["upgrades_cancelled"], (len(upgrades), s["upgrades"], s["upgrades_cancelled"])
        assert len(cancelled) == s["prefetch_cancelled"] + s["upgrades_cancelled"], (len(cancelled), s["prefetch_cancelled"])
        assert all(r.priority != DEMAND for r in cancelled), "a demand load was cancelled"
        partial = 0
        for r in recs:
            store = stores[r.copy]
            n_chunks = len(store.plan(r.task.eid).chunks)
            assert len(r.chunks) == len(set(r.chunks)), f"{r.task.eid}: a chunk was read twice"
            if r.task.state == DONE:
                # every chunk once; I/O threads read one expert's chunks side by side, so in any order
                assert sorted(r.chunks) == list(range(n_chunks)), f"{r.task.eid}: chunks read {r.chunks}"
            else:
                assert r.task.state == CANCELLED, f"{r.task.eid}: load ended {r.task.state}"
                partial += sum(store.plan(r.task.eid).chunks[i].payload for i in r.chunks)
        expert_bytes = eng.checkpoint.expert_bytes
        low_bytes = eng.miss_copy.expert_bytes if eng.miss_copy is not None else 0
        expected = (s["misses"] + s["prefetch_issued"] - s["prefetch_cancelled"] + s["upgrades"]) * expert_bytes
        low_done = sum(1 for r in recs if r.copy and r.task.state != CANCELLED)  # the miss copy's loads read
        expected -= low_done * (expert_bytes - low_bytes)
        read = eng.cache.loader.bytes_read  # what the reader threads really read, chunk by chunk
        assert read == expected == s["bytes_read"], (
            f"read {read}, stats bytes_read {s['bytes_read']}, expected {expected} = (misses {s['misses']} + "
            f"prefetch_issued {s['prefetch_issued']} - prefetch_cancelled {s['prefetch_cancelled']} + upgrades "
            f"{s['upgrades']}) * {expert_bytes} - {low_done} miss-copy loads * ({expert_bytes} - {low_bytes}); "
            f"cancelled loads had read {partial} bytes"
        )


def check_engine_invariants(engine, recorder: LoadRecorder | None = None) -> None:
    """After a run: the cache never held more slots than it has; bytes read add up exactly; each
    cached expert is either ready or its load is accounted for."""
    cache = engine.cache
    assert cache.core.max_occupancy <= cache.capacity, (cache.core.max_occupancy, cache.capacity)
    assert len(cache.core.entries) + len(cache.core.free) == cache.capacity
    assert all(e.pins == 0 for e in cache.core.entries.values()), "an expert stayed pinned after the run"
    s = engine.stats()
    assert s["hits"] + s["misses"] == s["lookups"]
    assert s["max_slots_used"] <= s["cache_slots"]
    if recorder is not None:
        recorder.check_bytes()


def fd_flags(fd: int) -> int:
    """The open-file flags of a descriptor of this process, as the kernel reports them."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags in /proc/self/fdinfo/{fd}")


def check_io_mode(engine, io: str, direct_supported: bool) -> None:
    """io="direct" really reads through O_DIRECT descriptors where the filesystem allows it (the
    descriptors the store read with carry the flag); io="buffered" never does. Call after a run,
    before close (the store opens its files on first read)."""
    store = engine.store
    fds = list(store._fds.values())
    assert fds, "the store never opened a checkpoint file"
    if io == "direct" and direct_supported:
        assert store.io_effective == "direct"
        assert all(fd_flags(fd) & os.O_DIRECT for fd in fds), "io='direct' but a descriptor lacks O_DIRECT"
    elif io == "buffered":
        assert store.io_effective == "buffered"
        assert not any(fd_flags(fd) & os.O_DIRECT for fd in fds)


def min_budget(model_dir: Path) -> int:
    """The smallest budget the engine accepts: one layer's top-k experts."""
    from expertcache.checkpoint import Checkpoint

    ck = Checkpoint.open(model_dir)
    return ck.top_k * ck.expert_bytes
