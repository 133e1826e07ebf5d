"""ReadGate: holds an ExpertStore's reads until a test lets them through, to order events."""

from __future__ import annotations

import threading

GATE_TIMEOUT = 5.0  # seconds a gated read may wait before the test calls it a hang


class ReadGate:
    """Wraps store.read_chunk: each read takes a permit and blocks until one is given (release)
    or the gate is opened for good; `started` lists the reads begun, in order."""

    def __init__(self, store) -> None:
        self._real = store.read_chunk
        self._cv = threading.Condition()
        self._permits = 0
        self._open = False
        self.started: list[tuple] = []
        self.fail: dict[tuple, BaseException] = {}  # eid -> exception its reads raise
        store.read_chunk = self.read_chunk

    def read_chunk(self, eid, chunk, slot):
        with self._cv:
            self.started.append(eid)
            self._cv.notify_all()
            assert self._cv.wait_for(lambda: self._open or self._permits > 0, GATE_TIMEOUT), "read held forever"
            if not self._open:
                self._permits -= 1
        if eid in self.fail:
            raise self.fail[eid]
        self._real(eid, chunk, slot)

    def wait_started(self, n: int) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.started) >= n, GATE_TIMEOUT), f"{n} reads never started"

    def release(self, n: int = 1) -> None:
        with self._cv:
            self._permits += n
            self._cv.notify_all()

    def open(self) -> None:
        with self._cv:
            self._open = True
            self._cv.notify_all()
