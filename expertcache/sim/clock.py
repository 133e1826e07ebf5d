"""The simulator's Readers: expert reads on a simulated clock, or landing at once.

ClockedReader times decode calls (simulate.py drives the engine's own CacheCore through it):
- a call starts at `now`; the core submits its misses at demand priority, then its guesses;
- one link serves one read at a time, each `latency + bytes / bandwidth`, demand before queued
  guesses (a late guess that is needed is promoted); a started read runs to its end and cannot be
  cancelled (the engine's chunk-level yield is not modelled);
- waiting for a read moves `now` to its finish; simulate.py then adds the call's compute.
Untimed (prefill) calls: every load lands at once, after everything queued has.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..ids import CANCELLED, DEMAND, DONE, QUEUED, RUNNING, ExpertId
from .hardware import Hardware


@dataclass(eq=False)
class Read:
    """One expert read on the simulated link."""

    eid: ExpertId
    priority: int
    seq: int
    submit: float
    seconds: float
    start: float | None = None
    finish: float | None = None
    cancelled: bool = False


class Link:
    """One read at a time, by (priority, submission) among the reads already submitted."""

    def __init__(self) -> None:
        self.queue: list[Read] = []
        self.free_at = 0.0

    def _start_next(self, before: float | None) -> Read | None:
        """Start the next read if it starts before `before` (None: whenever it starts)."""
        if not self.queue:
            return None
        t0 = max(self.free_at, min(r.submit for r in self.queue))
        if before is not None and t0 >= before:
            return None
        r = min((r for r in self.queue if r.submit <= t0), key=lambda r: (r.priority, r.seq))
        self.queue.remove(r)
        r.start, r.finish = t0, t0 + r.seconds
        self.free_at = r.finish
        return r

    def advance(self, t: float) -> None:
        """Start every read that starts before `t`."""
        while self._start_next(t) is not None:
            pass

    def finish(self, r: Read) -> float:
        """Serve the queue until `r` has finished; its finish time."""
        while r.finish is None:
            if self._start_next(None) is None:  # cannot happen: an unfinished read is queued
                raise RuntimeError("a read waited for is not on the link")
        return r.finish

    def flush(self) -> None:
        while self._start_next(None) is not None:
            pass


class ClockedReader:
    """A Reader (cache.py) whose reads take time on one simulated link."""

    def __init__(self, hardware: Hardware, expert_bytes: dict[int, int], low_bytes: dict[int, int] | None = None) -> None:
        self.hardware = hardware
        self.expert_bytes = expert_bytes
        self.low_bytes = low_bytes  # a miss copy's expert sizes (copy 1), when the run has one
        self.link = Link()
        self.now = 0.0
        self.timed = True  # False: loads land at once (untimed prefill calls)
        self._seq = itertools.count()

    def submit_many(self, loads: list[tuple[ExpertId, int]], priority: int, copy: int = 0) -> list[Read]:
        sizes = self.low_bytes if copy else self.expert_bytes
        out = []
        for eid, _slot in loads:
            seconds = self.hardware.load_seconds(1, sizes[eid[0]]) if self.timed else 0.0
            r = Read(eid, priority, next(self._seq), self.now, seconds)
            if self.timed:
                self.link.queue.append(r)
            else:
                r.start = r.finish = self.now
            out.append(r)
        return out

    def promote(self, r: Read) -> None:
        r.priority = DEMAND

    def cancel(self, r: Read) -> bool:
        self.link.advance(self.now)
        if r.start is not None:
            return False
        self.link.queue.remove(r)
        r.cancelled = True
        return True

    def state(self, r: Read) -> str:
        if r.cancelled:
            return CANCELLED
        self.link.advance(self.now)
        if r.finish is not None and r.finish <= self.now:
            return DONE
        return RUNNING if r.start is not None else QUEUED

    def error(self, r: Read) -> None:
        return None

    def wait(self, r: Read) -> float:
        t = self.link.finish(r)
        waited = max(0.0, t - self.now)
        self.now += waited
        return waited

    def arrival(self, r: Read) -> tuple:
        self.link.advance(self.now)
        return (0, r.finish, 0) if r.finish is not None else (1, r.priority, r.seq)

    def flush(self) -> None:
        """Everything queued lands now (before and after an untimed call)."""
        self.link.flush()
        self.now = max(self.now, self.link.free_at)


class InstantReader:
    """Every load lands the moment it is submitted: counts without a clock (demand-only replays)."""

    LANDED = object()

    def submit_many(self, loads: list[tuple[ExpertId, int]], priority: int, copy: int = 0) -> list:
        return [self.LANDED] * len(loads)

    def promote(self, load) -> None:
        pass

    def cancel(self, load) -> bool:
        return False

    def state(self, load) -> str:
        return DONE

    def error(self, load) -> None:
        return None

    def wait(self, load) -> float:
        return 0.0

    def arrival(self, load) -> tuple:
        return (0,)
