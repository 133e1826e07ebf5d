"""Loader: I/O threads that fill cache slots from the ExpertStore, demand reads first; the
engine's `Reader` (cache.py).

Tasks are served DEMAND before PREFETCH, then first come first served, in chunks (store.py): each
free thread claims the next unread chunk of the first task, so threads read one expert side by
side and a demand read waits at most one chunk behind a speculative one. A task none of whose
chunks was claimed can be cancelled; a read error is raised to the waiter once no thread still
writes into the task's slot. Reads release the GIL, so loading overlaps compute.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from .errors import ExpertLoadError
from .ids import CANCELLED, DEMAND, DONE, FAILED, QUEUED, RUNNING, ExpertId
from .store import ExpertStore, SlotArena

log = logging.getLogger(__name__)



class LoadTask:
    """One expert being read into one slot. state: QUEUED (no thread reading it now; chunks left),
    RUNNING (a thread is inside one of its chunks), DONE, FAILED or CANCELLED."""

    __slots__ = ("eid", "slot", "copy", "priority", "seq", "state", "next_chunk", "chunks", "done_chunks", "active", "error", "event")

    def __init__(self, eid: ExpertId, slot: int, priority: int, seq: int, copy: int = 0) -> None:
        self.eid = eid
        self.slot = slot
        self.copy = copy  # which store it reads: 0 the model's, 1 its miss copy's (cache.py)
        self.priority = priority
        self.seq = seq
        self.state = QUEUED
        self.next_chunk = 0  # the next chunk no thread has claimed
        self.chunks = 0  # how many it has (known once a thread first claims one)
        self.done_chunks = 0
        self.active = 0  # threads reading one of its chunks now
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

    def __init__(self, store: ExpertStore, arena: SlotArena, *, threads: int = 2,
                 prepare: Callable[[tuple], None] | None = None, copies: tuple = ()) -> None:
        # (store, prepare) per copy a task may read: the model's own, then `copies` (a miss copy);
        # prepare runs on an expert's part tensors when its last chunk is read, before it is ready
        self._copies = ((store, prepare), *copies)
        self._arena = arena
        self._heap: list[tuple[int, int, LoadTask]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._idle = 0  # threads waiting for work
        self.bytes_read = 0  # tensor bytes read (payload); a cancelled task has read none
        self.chunks_read = 0
        self.on_chunk: Callable[[LoadTask, int], None] | None = None  # test hook: (task, chunk index)
        self._threads = [threading.Thread(target=self._work, name=f"expertcache-io-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, eid: ExpertId, slot: int, priority: int, copy: int = 0) -> LoadTask:
        return self.submit_many([(eid, slot)], priority, copy)[0]

    def submit_many(self, loads: list[tuple[ExpertId, int]], priority: int, copy: int = 0) -> list[LoadTask]:
        """Queue (expert, slot) loads of one copy in this order under one lock and one wake-up: a
        prefetch of several experts costs the compute thread one hand-over to the I/O threads, not
        one each; a woken thread wakes the next while chunks are left."""
        if not 0 <= copy < len(self._copies):
            raise ValueError(f"no copy {copy}: this loader reads {len(self._copies)}")
        with self._cv:
            if self._closed:
                raise RuntimeError("loader is closed")
            tasks = []
            for eid, slot in loads:
                task = LoadTask(eid, slot, priority, next(self._seq), copy)
                heapq.heappush(self._heap, (priority, task.seq, task))
                tasks.append(task)
            if tasks and self._idle:  # one idle thread; it wakes the next if chunks are left (_work):
                self._cv.notify(1)  # a wake-up costs its caller (the compute thread) time: docs/prefetch-experiments.md
            return tasks

    def promote(self, task: LoadTask) -> None:
        """Raise a queued speculative task to demand priority (it is now needed)."""
        with self._cv:
            if task.priority != DEMAND:
                task.priority = DEMAND
                if task.state in (QUEUED, RUNNING) and (task.chunks == 0 or task.next_chunk < task.chunks):
                    heapq.heappush(self._heap, (DEMAND, task.seq, task))  # its chunks left, now first in line
                    self._cv.notify_all()

    # --- the Reader protocol (cache.py) ----------------------------------------------------------
    def state(self, task: LoadTask) -> str:
        return task.state

    def error(self, task: LoadTask) -> BaseException | None:
        return task.error

    def wait(self, task: LoadTask) -> float:
        """Block until the task is over; the seconds waited."""
        if task.event.is_set():
            return 0.0
        t0 = time.perf_counter()
        task.event.wait()
        return time.perf_counter() - t0

    def arrival(self, task: LoadTask) -> tuple[int, int, int]:
        """Sorts loads by when they will be ready: being read, then queued in the order served."""
        if task.event.is_set():
            return (0, 0, 0)
        return (1 if task.state == RUNNING else 2, task.priority, task.seq)

    def cancel(self, task: LoadTask) -> bool:
        """Cancel a task no chunk of which has been claimed; True if it will not run. A partly
        read task is finished instead (its bytes are read), so bytes_read is exactly the loads
        that were not cancelled times the expert size."""
        with self._cv:
            if task.state != QUEUED or task.next_chunk > 0:
                return False
            task.state = CANCELLED
            task.event.set()
            return True

    def _claim(self) -> tuple[LoadTask, int] | None:
        """The next unclaimed chunk of the first task in priority order (under the lock)."""
        while self._heap:
            prio, _, task = self._heap[0]
            if prio != task.priority or task.state not in (QUEUED, RUNNING) or task.error is not None:
                heapq.heappop(self._heap)  # promoted (a newer entry stands for it), over, or failing
                continue
            if task.chunks == 0:
                try:
                    task.chunks = len(self._copies[task.copy][0].plan(task.eid).chunks)
                except Exception as e:  # e.g. an expert the store does not have: fail the task, keep the thread
                    heapq.heappop(self._heap)
                    self._end(task, FAILED, ExpertLoadError(f"cannot load expert {task.eid}: {e!r}"))
                    continue
            i = task.next_chunk
            task.next_chunk += 1
            if task.next_chunk == task.chunks:
                heapq.heappop(self._heap)  # every chunk claimed
            task.active += 1
            task.state = RUNNING
            return task, i
        return None

    def _work(self) -> None:
        while True:
            with self._cv:
                claim = self._claim()
                while claim is None:
                    if self._closed:
                        return
                    self._idle += 1
                    self._cv.wait()
                    self._idle -= 1
                    claim = self._claim()
                if self._heap and self._idle:  # chunks may be left: the next idle thread reads beside this one
                    self._cv.notify(1)
            self._read(*claim)

    def _read(self, task: LoadTask, i: int) -> None:
        error = None
        store, prepare = self._copies[task.copy]
        try:
            chunk = store.plan(task.eid).chunks[i]
            store.read_chunk(task.eid, chunk, self._arena.slot(task.slot))
        except ExpertLoadError as e:
            error = e
        except Exception as e:  # anything else is still the waiting computation's to see
            error = ExpertLoadError(f"reading expert {task.eid} failed: {e}")
        with self._cv:
            task.active -= 1
            if error is not None:
                task.error = task.error or error  # no chunk of it is claimed from now on (_claim)
            else:
                self.bytes_read += chunk.payload
                self.chunks_read += 1
                task.done_chunks += 1
                if self.on_chunk is not None:
                    self.on_chunk(task, i)
            if task.active > 0:
                return  # another thread is inside one of its chunks: the task ends with that read,
                # so a failed load's slot is never reused while a read still writes into it
            if task.error is not None:
                self._end(task, FAILED, task.error)
                return
            if task.done_chunks < task.chunks:
                task.state = QUEUED  # chunks left, none being read: resumes when it is first in line
                return
            if prepare is None:
                self._end(task, DONE, None)
                return
        try:  # every chunk is read and no other thread holds the task: its bytes are this thread's
            prepare(self._arena.tensors(task.slot, store.plan(task.eid)))
        except Exception as e:
            error = ExpertLoadError(f"preparing expert {task.eid} failed: {e}")
        with self._cv:
            self._end(task, DONE if error is None else FAILED, error)

    def _end(self, task: LoadTask, state: str, error: BaseException | None) -> None:
        """Finish a task (under the lock); its waiters wake."""
        if task.state in (DONE, FAILED, CANCELLED):
            return
        task.state = state
        task.error = error
        task.event.set()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for _, _, task in self._heap:
                if task.state == QUEUED:
                    self._end(task, CANCELLED, None)
            # a task being read is read to the end (its waiter gets the expert); the rest go
            self._heap = [entry for entry in self._heap if entry[2].state == RUNNING]
            heapq.heapify(self._heap)
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)
