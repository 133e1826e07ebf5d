"""Loader: demand reads overtake queued speculative ones, a running speculative read yields to a
demand read between chunks, I/O threads share one expert's chunks, only unstarted tasks cancel,
read errors reach the waiting thread, and close() never hangs.

The store is a real ExpertStore over a hand-written file (no transformers needed); its
read_chunk is wrapped by a Gate that can hold every read until the test opens it, so the order
the single I/O thread serves tasks in is deterministic.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from expertcache.checkpoint import ExpertParts, TensorRef
from expertcache.errors import ExpertLoadError
from expertcache.ids import CANCELLED, DEMAND, DONE, FAILED, PREFETCH
from expertcache.loader import Loader
from expertcache.store import ExpertStore, SlotArena
from helpers.gates import ReadGate as Gate

TIMEOUT = 5.0  # seconds any wait may take before the test calls it a hang
SHAPE = (8, 16)  # each part: 8 x 16 float32 = 512 bytes
N_EXPERTS = 6


def write_experts(path: Path, n: int = N_EXPERTS) -> tuple[dict, dict]:
    """A file holding n experts of 3 parts each, at unaligned offsets and apart (a few bytes
    between parts, so each part is its own read: three chunks per expert); returns (experts for
    ExpertStore, the expected part tensors by expert id)."""
    g = torch.Generator().manual_seed(0)
    blob = bytearray(b"\xab" * 100)  # a header-like lead, so no part is block-aligned
    experts, expected = {}, {}
    for e in range(n):
        refs, tensors = [], []
        for _ in range(3):
            t = torch.randn(SHAPE, generator=g)
            raw = t.numpy().tobytes()
            refs.append(TensorRef(str(path), len(blob), len(raw), SHAPE, torch.float32))
            tensors.append(t)
            blob += raw + b"\xab" * 8
        experts[(0, e)] = ExpertParts(tuple(refs), fused=False)
        expected[(0, e)] = tensors
    path.write_bytes(bytes(blob))
    return experts, expected


@pytest.fixture
def rig(tmp_path):
    """(loader with one I/O thread, gate, arena, store, expected tensors, chunk log)."""
    experts, expected = write_experts(tmp_path / "experts.bin")
    store = ExpertStore(experts, io="buffered")
    arena = SlotArena(N_EXPERTS, store.slot_bytes)
    gate = Gate(store)
    loader = Loader(store, arena, threads=1)
    log: list[tuple] = []
    loader.on_chunk = lambda task, i: log.append((task.eid[1], i))
    yield loader, gate, arena, store, expected, log
    gate.open()
    loader.close()
    store.close()


def wait_all(*tasks) -> None:
    for t in tasks:
        assert t.event.wait(TIMEOUT), f"load of {t.eid} never finished"


def chunks_of(e: int, n: int = 3) -> list[tuple[int, int]]:
    return [(e, i) for i in range(n)]


# --------------------------------------------------------------------------------------------------
def test_loads_land_in_their_slots_and_count_bytes(rig):
    loader, gate, arena, store, expected, log = rig
    gate.open()
    tasks = [loader.submit((0, e), slot=N_EXPERTS - 1 - e, priority=DEMAND) for e in range(N_EXPERTS)]
    wait_all(*tasks)
    for e, t in enumerate(tasks):
        t.wait()
        assert t.state == DONE
        got = arena.tensors(t.slot, store.plan((0, e)))
        for a, b in zip(got, expected[(0, e)]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loader.chunks_read == 3 * N_EXPERTS
    assert loader.bytes_read == 3 * N_EXPERTS * 8 * 16 * 4


def test_demand_overtakes_queued_prefetch(rig):
    loader, gate, *_, log = rig
    p0 = loader.submit((0, 0), 0, PREFETCH)
    gate.wait_started(1)  # the only I/O thread is now inside p0's first chunk
    p1 = loader.submit((0, 1), 1, PREFETCH)
    p2 = loader.submit((0, 2), 2, PREFETCH)
    d = loader.submit((0, 3), 3, DEMAND)
    gate.open()
    wait_all(p0, p1, p2, d)
    # p0 yields after its running chunk; the demand read goes next, whole; then p0 resumes where
    # it left off, ahead of the later prefetches (first come first served within a priority)
    assert log == [(0, 0)] + chunks_of(3) + [(0, 1), (0, 2)] + chunks_of(1) + chunks_of(2)
    assert all(t.state == DONE for t in (p0, p1, p2, d))


def test_a_demand_read_waits_at_most_one_chunk(rig):
    loader, gate, *_, log = rig
    prefetches = [loader.submit((0, e), e, PREFETCH) for e in range(3)]
    gate.release(1)  # p0's first chunk goes through...
    gate.wait_started(2)  # ...and the thread is inside its second one
    d = loader.submit((0, 5), 5, DEMAND)
    gate.open()
    wait_all(d, *prefetches)
    # only the chunk that was running when the demand came is read before it
    assert log == [(0, 0), (0, 1)] + chunks_of(5) + [(0, 2)] + chunks_of(1) + chunks_of(2)


def test_demands_among_themselves_and_prefetches_among_themselves_are_fifo(rig):
    loader, gate, *_, log = rig
    block = loader.submit((0, 0), 0, DEMAND)
    gate.wait_started(1)
    p1 = loader.submit((0, 1), 1, PREFETCH)
    d2 = loader.submit((0, 2), 2, DEMAND)
    p3 = loader.submit((0, 3), 3, PREFETCH)
    d4 = loader.submit((0, 4), 4, DEMAND)
    gate.open()
    wait_all(block, p1, d2, p3, d4)
    order = list(dict.fromkeys(e for e, _ in log))
    assert order == [0, 2, 4, 1, 3]


def test_promote_moves_a_queued_prefetch_to_demand(rig):
    loader, gate, *_, log = rig
    p0 = loader.submit((0, 0), 0, PREFETCH)
    gate.wait_started(1)
    p1 = loader.submit((0, 1), 1, PREFETCH)
    p2 = loader.submit((0, 2), 2, PREFETCH)
    loader.promote(p2)
    assert p2.priority == DEMAND
    gate.open()
    wait_all(p0, p1, p2)
    assert log == [(0, 0)] + chunks_of(2) + [(0, 1), (0, 2)] + chunks_of(1)


def test_a_promoted_running_prefetch_no_longer_yields(rig):
    loader, gate, *_, log = rig
    p0 = loader.submit((0, 0), 0, PREFETCH)
    gate.wait_started(1)
    loader.promote(p0)  # running: now needed, so it must finish before the next demand
    d = loader.submit((0, 1), 1, DEMAND)
    gate.open()
    wait_all(p0, d)
    assert log == chunks_of(0) + chunks_of(1)


def test_cancel_works_only_for_queued_tasks(rig):
    loader, gate, *_, log = rig
    running = loader.submit((0, 0), 0, PREFETCH)
    gate.wait_started(1)
    queued = loader.submit((0, 1), 1, PREFETCH)
    assert loader.cancel(queued) is True
    assert queued.state == CANCELLED and queued.finished
    queued.wait()  # returns at once: a cancelled task is over, without an error
    assert loader.cancel(queued) is False  # already cancelled
    assert loader.cancel(running) is False  # a running read cannot be taken back
    gate.open()
    wait_all(running)
    assert running.state == DONE
    assert loader.cancel(running) is False  # nor a finished one
    later = loader.submit((0, 2), 2, DEMAND)
    wait_all(later)
    assert 1 not in {e for e, _ in log}, "a cancelled task was read"
    assert loader.chunks_read == 6


def test_a_prefetch_that_yielded_between_chunks_is_not_cancelled(rig):
    loader, gate, *_, log = rig
    p0 = loader.submit((0, 0), 0, PREFETCH)
    gate.wait_started(1)  # inside p0's first chunk
    d = loader.submit((0, 1), 1, DEMAND)
    gate.release(1)  # p0's first chunk completes, p0 yields...
    gate.wait_started(2)  # ...and the thread is inside the demand's first chunk
    assert p0.next_chunk == 1 and p0.state == "queued"
    # p0 has read a chunk: cancelling it now would waste that read, so it finishes instead
    assert loader.cancel(p0) is False
    gate.open()
    wait_all(p0, d)
    assert p0.state == DONE and p0.next_chunk == 3
    assert log == [(0, 0)] + chunks_of(1) + [(0, 1), (0, 2)]


def test_a_read_error_reaches_the_waiting_thread(rig):
    loader, gate, *_ = rig
    gate.fail[(0, 1)] = ExpertLoadError("disk on fire")
    gate.open()
    bad = loader.submit((0, 1), 1, DEMAND)
    caught: list[BaseException] = []

    def waiter():
        try:
            bad.wait()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            caught.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive(), "the waiting thread hangs on a failed read"
    assert len(caught) == 1 and isinstance(caught[0], ExpertLoadError) and "disk on fire" in str(caught[0])
    assert bad.state == FAILED
    # the I/O thread survived: the next load completes
    good = loader.submit((0, 2), 2, DEMAND)
    wait_all(good)
    good.wait()
    assert good.state == DONE


def test_any_exception_in_a_read_becomes_an_expert_load_error(rig):
    loader, gate, *_ = rig
    gate.fail[(0, 1)] = ValueError("unexpected")
    gate.open()
    bad = loader.submit((0, 1), 1, PREFETCH)
    wait_all(bad)
    with pytest.raises(ExpertLoadError, match="unexpected"):
        bad.wait()


def test_a_truncated_file_fails_the_load_not_the_process(tmp_path):
    experts, _ = write_experts(tmp_path / "experts.bin", n=2)
    data = (tmp_path / "experts.bin").read_bytes()
    (tmp_path / "experts.bin").write_bytes(data[: len(data) - 100])  # cuts expert 1's last part
    store = ExpertStore(experts, io="buffered")
    loader = Loader(store, SlotArena(2, store.slot_bytes), threads=1)
    try:
        bad, good = loader.submit((0, 1), 0, DEMAND), loader.submit((0, 0), 1, DEMAND)
        wait_all(bad, good)
        with pytest.raises(ExpertLoadError, match="shorter"):
            bad.wait()
        good.wait()
    finally:
        loader.close()
        store.close()


def test_threads_read_one_experts_chunks_side_by_side(tmp_path, monkeypatch):
    """Parts larger than CHUNK_BYTES are read in aligned pieces; two I/O threads are inside the
    same expert's chunks at once, and the bytes land exactly (unaligned parts, exact byte count)."""
    import expertcache.store as store_mod

    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 8192)
    g = torch.Generator().manual_seed(1)
    blob, refs, parts = bytearray(b"\xcd" * 300), [], []
    path = tmp_path / "big.bin"
    for _ in range(3):
        t = torch.randn(64, 64, generator=g)  # 16 KiB each, side by side: one span of seven 8 KiB pieces
        refs.append(TensorRef(str(path), len(blob), t.numel() * 4, (64, 64), torch.float32))
        parts.append(t)
        blob += t.numpy().tobytes()
    path.write_bytes(bytes(blob))
    store = ExpertStore({(0, 0): ExpertParts(tuple(refs), fused=False)}, io="buffered")
    assert len(store.plan((0, 0)).chunks) == 7  # round_up(300 + 3 * 16 KiB, 4 KiB) / 8 KiB
    arena = SlotArena(1, store.slot_bytes)
    gate = Gate(store)
    loader = Loader(store, arena, threads=2)
    try:
        task = loader.submit((0, 0), 0, DEMAND)
        gate.wait_started(2)  # both threads inside chunks of the one expert
        assert gate.started == [(0, 0), (0, 0)]
        gate.open()
        wait_all(task)
        task.wait()
        for got, want in zip(arena.tensors(0, store.plan((0, 0))), parts):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert loader.bytes_read == 3 * 64 * 64 * 4 and loader.chunks_read == 7
    finally:
        gate.open()
        loader.close()
        store.close()


def test_a_failed_load_ends_only_when_no_thread_still_reads_into_its_slot(tmp_path):
    """Two threads inside one expert's chunks; one read fails. The task must not finish (its slot
    would be freed for another expert) while the other thread still writes into the slot, and no
    further chunk of it is read."""
    experts, _ = write_experts(tmp_path / "experts.bin", n=1)
    store = ExpertStore(experts, io="buffered")
    assert len(store.plan((0, 0)).chunks) == 3  # three parts apart: three reads
    gate = Gate(store)
    loader = Loader(store, SlotArena(1, store.slot_bytes), threads=2)
    try:
        gate.fail[(0, 0)] = ExpertLoadError("disk on fire")
        task = loader.submit((0, 0), 0, DEMAND)
        gate.wait_started(2)  # both threads inside its chunks
        gate.release(1)  # one read fails; the other is still inside
        time.sleep(0.2)
        assert not task.finished, "a failed load ended while another read still wrote into its slot"
        gate.open()
        wait_all(task)
        assert task.state == FAILED and "disk on fire" in str(task.error)
        assert len(gate.started) == 2 and loader.chunks_read == 0  # nothing more of it was read
    finally:
        gate.open()
        loader.close()
        store.close()


def test_an_unknown_expert_fails_its_task_instead_of_killing_the_thread(rig):
    loader, gate, *_ = rig
    gate.open()
    bad = loader.submit((7, 7), 0, DEMAND)  # not in the store: no plan
    assert bad.event.wait(TIMEOUT), "the task never finished: its I/O thread died"
    with pytest.raises(ExpertLoadError):
        bad.wait()
    good = loader.submit((0, 1), 1, DEMAND)
    wait_all(good)


def test_close_cancels_queued_tasks_and_does_not_hang(rig):
    loader, gate, *_ = rig
    running = loader.submit((0, 0), 0, PREFETCH)
    gate.wait_started(1)
    queued = [loader.submit((0, e), e, p) for e, p in ((1, PREFETCH), (2, DEMAND), (3, PREFETCH))]
    closer = threading.Thread(target=loader.close)
    closer.start()
    for t in queued:  # cancelled at once, while the running read is still held
        assert t.event.wait(TIMEOUT)
        assert t.state == CANCELLED
    assert closer.is_alive()  # close() waits for the running read...
    t0 = time.monotonic()
    gate.open()
    closer.join(TIMEOUT)
    assert not closer.is_alive(), "close() hangs"
    assert time.monotonic() - t0 < 2.0
    assert running.state == DONE  # ...which completes
    with pytest.raises(RuntimeError, match="closed"):
        loader.submit((0, 4), 4, DEMAND)


def test_close_of_an_idle_loader_is_prompt(tmp_path):
    experts, _ = write_experts(tmp_path / "experts.bin", n=1)
    store = ExpertStore(experts, io="buffered")
    loader = Loader(store, SlotArena(1, store.slot_bytes), threads=2)
    t0 = time.monotonic()
    loader.close()
    assert time.monotonic() - t0 < 1.0
    store.close()


@pytest.mark.parametrize("gap", [0, 100, 5000])
def test_file_contiguous_parts_are_read_as_one_span(tmp_path, gap):
    """An expert whose parts lie side by side in the file is one read; parts apart are read apart
    (the bytes between are never read into a part), and every part lands exactly either way."""
    g = torch.Generator().manual_seed(2)
    blob, refs, parts = bytearray(b"\xab" * 1000), [], []
    path = tmp_path / "parts.bin"
    for shape in [(8, 16), (16, 8), (8, 16)]:
        t = torch.randn(*shape, generator=g)
        refs.append(TensorRef(str(path), len(blob), t.numel() * 4, shape, torch.float32))
        parts.append(t)
        blob += t.numpy().tobytes() + b"\xef" * gap
    path.write_bytes(bytes(blob))
    # listed out of file order, as a fused or renamed layout may list them
    order = [2, 0, 1]
    store = ExpertStore({(0, 0): ExpertParts(tuple(refs[i] for i in order), fused=False)}, io="buffered")
    assert len(store.plan((0, 0)).chunks) == (1 if gap == 0 else 3)
    arena = SlotArena(1, store.slot_bytes)
    loader = Loader(store, arena, threads=2)
    try:
        task = loader.submit((0, 0), 0, DEMAND)
        task.wait()
        for got, want in zip(arena.tensors(0, store.plan((0, 0))), [parts[i] for i in order]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert loader.bytes_read == sum(t.numel() * 4 for t in parts)
    finally:
        loader.close()
        store.close()
