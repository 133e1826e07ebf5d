"""Loader: I/O threads that fill cache slots from the ExpertStore, demand reads first.

A priority queue orders tasks (DEMAND before PREFETCH, then first come first served). Tasks are
read chunk by chunk; between chunks a speculative task yields to a waiting demand task, so a
demand read waits at most one chunk behind a speculative one. A queued, unstarted task can be cancelled
(its slot is then free at once); a running one cannot. A read error is stored on the task and
raised in the thread that waits for it. Reads release the GIL, so loading overlaps compute.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable

from .checkpoint import ExpertId
from .errors import ExpertLoadError
from .store import ExpertStore, SlotArena

log = logging.getLogger(__name__)

DEMAND, PREFETCH = 0, 1  # lower value is served first

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


class LoadTask:
    """One expert being read into one slot."""

    __slots__ = ("eid", "slot", "priority", "seq", "state", "next_chunk", "error", "event")

    def __init__(self, eid: ExpertId, slot: int, priority: int, seq: int) -> None:
        self.eid = eid
        self.slot = slot
        self.priority = priority
        self.seq = seq
        self.state = QUEUED
        self.next_chunk = 0
        self.error: BaseException | None = None
        self.event = threading.Event()

    @property
    def finished(self) -> bool:
        return self.event.is_set()

    def wait(self) -> None:
        """Block until the read is over; raise its error if it failed."""
        self.event.wait()
        if self.error is not None:
            raise self.error


class Loader:
    """A pool of reader threads over one ExpertStore and one SlotArena."""

    def __init__(self, store: ExpertStore, arena: SlotArena, *, threads: int = 2) -> None:
        self._store = store
        self._arena = arena
        self._heap: list[tuple[int, int, LoadTask]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self.bytes_read = 0  # tensor bytes read (payload); a cancelled task has read none
        self.chunks_read = 0
        self.on_chunk: Callable[[LoadTask, int], None] | None = None  # test hook: (task, chunk index)
        self._threads = [threading.Thread(target=self._work, name=f"expertcache-io-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, eid: ExpertId, slot: int, priority: int) -> LoadTask:
        with self._cv:
            if self._closed:
                raise RuntimeError("loader is closed")
            task = LoadTask(eid, slot, priority, next(self._seq))
            heapq.heappush(self._heap, (priority, task.seq, task))
            self._cv.notify()
            return task

    def promote(self, task: LoadTask) -> None:
        """Raise a queued speculative task to demand priority (it is now needed)."""
        with self._cv:
            if task.priority != DEMAND:
                task.priority = DEMAND
                if task.state == QUEUED:
                    heapq.heappush(self._heap, (DEMAND, task.seq, task))
                    self._cv.notify()

    def cancel(self, task: LoadTask) -> bool:
        """Cancel a task that has not started; True if it will not run. A task that yielded between
        chunks is finished instead (its bytes are read), so bytes_read is exactly the loads that
        were not cancelled times the expert size."""
        with self._cv:
            if task.state != QUEUED or task.next_chunk > 0:
                return False
            task.state = CANCELLED
            task.event.set()
            return True

    def _pop(self) -> LoadTask | None:
        while self._heap:
            prio, _, task = heapq.heappop(self._heap)
            if task.state == QUEUED and prio == task.priority:
                return task
        return None

    def _work(self) -> None:
        while True:
            with self._cv:
                task = self._pop()
                while task is None:
                    if self._closed:
                        return
                    self._cv.wait()
                    task = self._pop()
                task.state = RUNNING
            self._run(task)

    def _run(self, task: LoadTask) -> None:
        try:
            plan = self._store.plan(task.eid)
            slot = self._arena.slot(task.slot)
        except Exception as e:  # e.g. an expert the store does not have: fail the task, keep the thread
            self._finish(task, FAILED, ExpertLoadError(f"cannot load expert {task.eid}: {e!r}"))
            return
        while True:
            i = task.next_chunk
            chunk = plan.chunks[i]
            try:
                self._store.read_chunk(task.eid, chunk, slot)
            except ExpertLoadError as e:
                self._finish(task, FAILED, e)
                return
            except Exception as e:  # anything else is still the waiting computation's to see
                self._finish(task, FAILED, ExpertLoadError(f"reading expert {task.eid} failed: {e}"))
                return
            with self._cv:
                self.bytes_read += chunk.payload
                self.chunks_read += 1
                task.next_chunk = i + 1
                if self.on_chunk is not None:
                    self.on_chunk(task, i)
                if task.next_chunk == len(plan.chunks):
                    task.state = DONE
                    task.event.set()
                    return
                if task.priority == PREFETCH and self._heap and self._heap[0][0] < task.priority:
                    # yield to a waiting demand read; this task resumes from its next chunk
                    task.state = QUEUED
                    heapq.heappush(self._heap, (task.priority, task.seq, task))
                    self._cv.notify()
                    return

    def _finish(self, task: LoadTask, state: str, error: BaseException | None) -> None:
        with self._cv:
            task.state = state
            task.error = error
            task.event.set()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for _, _, task in self._heap:
                if task.state == QUEUED:
                    task.state = CANCELLED
                    task.event.set()
            self._heap.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)
