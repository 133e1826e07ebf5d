"""ExpertStore: the bytes of one expert, read from the checkpoint's safetensors files into a slot.

By default reads use O_DIRECT: aligned reads that bypass the OS page cache, so the expert budget
is the real memory the experts take (a page cache quietly holding them would make the budget a
fiction). Where the filesystem refuses O_DIRECT (tmpfs, some overlays) reads fall back to buffered
reads followed by POSIX_FADV_DONTNEED, and `io_effective` says so. `io="buffered"` asks for normal
reads. An expert's parts (gate, up, down) are read as spans of file-contiguous parts (one span
when the checkpoint keeps them side by side), each in aligned chunks of at most CHUNK_BYTES: the
loader's threads read one expert's chunks side by side, and a demand read can go between the
chunks of a speculative one.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from dataclasses import dataclass

import torch

from .checkpoint import ExpertParts
from .errors import ExpertLoadError
from .ids import ExpertId

log = logging.getLogger(__name__)

ALIGN = 4096  # O_DIRECT needs file offset, length and buffer address aligned to the block size
CHUNK_BYTES = 2 << 20  # one read: small enough that a demand read waits little behind a speculative
# one and that the I/O threads share an expert; large enough to keep the disk streaming (a multiple of ALIGN)


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Chunk:
    """One aligned read: `length` bytes at `file_offset` of `path` into slot bytes [slot_offset, +length)."""

    path: str
    file_offset: int
    length: int
    slot_offset: int
    payload: int  # bytes of tensor data the chunk carries (what counts as bytes read)
    need: int  # bytes the read must return: the alignment lead plus the payload (EOF may cut the rest)


@dataclass(frozen=True)
class ExpertPlan:
    """How one expert's parts are read into a slot and viewed from it."""

    chunks: tuple[Chunk, ...]
    views: tuple[tuple[int, tuple[int, ...], torch.dtype], ...]  # (slot offset, shape, dtype) per part
    slot_bytes: int  # slot memory the plan spans


class ExpertStore:
    """Reads experts of one checkpoint; thread-safe (positional reads on shared descriptors)."""

    def __init__(self, experts: dict[ExpertId, ExpertParts], *, io: str = "direct") -> None:
        self.io_requested = io
        self.io_effective = io
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._retired: list[int] = []  # O_DIRECT descriptors replaced after a fallback
        self._plans = {eid: self._plan(parts) for eid, parts in experts.items()}
        self.slot_bytes = max(p.slot_bytes for p in self._plans.values())

    @staticmethod
    def _plan(parts: ExpertParts) -> ExpertPlan:
        # parts that follow each other in one file (a safetensors file keeps an expert's tensors
        # side by side) are read as one span: one read per span piece instead of one per part, and
        # no page read twice where an unaligned part ends and the next begins
        spans: list[list[int]] = []  # indices into parts.parts, file-contiguous, in file order
        for i in sorted(range(len(parts.parts)), key=lambda i: (parts.parts[i].path, parts.parts[i].offset)):
            ref, last = parts.parts[i], parts.parts[spans[-1][-1]] if spans else None
            if last is not None and ref.path == last.path and ref.offset == last.offset + last.nbytes:
                spans[-1].append(i)
            else:
                spans.append([i])
        chunks, views, pos = [], [None] * len(parts.parts), 0
        for span in spans:
            first = parts.parts[span[0]]
            nbytes = sum(parts.parts[i].nbytes for i in span)
            lead = first.offset % ALIGN
            start = first.offset - lead
            length = _round_up(lead + nbytes)
            end = lead + nbytes  # where the span's bytes end, from `start`
            for off in range(0, length, CHUNK_BYTES):  # aligned pieces the I/O threads read side by side
                n = min(CHUNK_BYTES, length - off)
                payload = min(off + n, end) - max(off, lead)  # tensor bytes in this piece
                chunks.append(Chunk(first.path, start + off, n, pos + off, payload, min(n, end - off)))
            for i in span:
                ref = parts.parts[i]
                views[i] = (pos + lead + ref.offset - first.offset, ref.shape, ref.dtype)
            pos += length + ALIGN  # room for the longest lead any expert of this shape can have
        return ExpertPlan(tuple(chunks), tuple(views), pos)

    @property
    def num_experts(self) -> int:
        return len(self._plans)

    def plan(self, eid: ExpertId) -> ExpertPlan:
        return self._plans[eid]

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is not None:
                return fd
            flags = os.O_RDONLY
            if self.io_effective == "direct":
                try:
                    fd = os.open(path, flags | os.O_DIRECT)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._fall_back(path)
            if fd is None:
                fd = os.open(path, flags)
            self._fds[path] = fd
            return fd

    def _fall_back(self, path: str) -> None:
        if self.io_effective == "direct":
            log.warning("%s: filesystem refuses O_DIRECT; using buffered reads dropped from the page cache", path)
            self.io_effective = "buffered+dontneed"
            # other reader threads may still be reading through the O_DIRECT descriptors: keep
            # them open (closed with the store) so a reused descriptor number never reads another file
            self._retired.extend(self._fds.values())
            self._fds.clear()

    def read_chunk(self, eid: ExpertId, chunk: Chunk, slot: memoryview) -> None:
        """Read one chunk of expert `eid` into `slot` (the expert's slot memory, ALIGN-aligned)."""
        dest = slot[chunk.slot_offset : chunk.slot_offset + chunk.length]
        try:
            n = self._pread(chunk, dest)
        except OSError as e:
            raise ExpertLoadError(f"reading expert {eid} from {chunk.path} failed: {e.strerror or e}") from None
        if n < chunk.need:
            raise ExpertLoadError(f"reading expert {eid} from {chunk.path}: file is shorter than its header says")

    def _pread(self, chunk: Chunk, dest: memoryview) -> int:
        fd = self._fd(chunk.path)
        try:
            n = os.preadv(fd, [dest], chunk.file_offset)
        except OSError as e:
            if e.errno != errno.EINVAL or self.io_effective != "direct":
                raise
            with self._lock:
                self._fall_back(chunk.path)
            n = os.preadv(self._fd(chunk.path), [dest], chunk.file_offset)
        if self.io_effective == "buffered+dontneed":
            os.posix_fadvise(self._fd(chunk.path), chunk.file_offset, chunk.length, os.POSIX_FADV_DONTNEED)
        return n

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._retired]:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()


class SlotArena:
    """All expert slots in one private anonymous, page-aligned mapping, allocated once.

    Private, not Python's default shared anonymous mapping: shared anonymous memory is shmem, which
    a memory cgroup counts as page cache and /proc as file-mapped; private memory is plain process
    memory (RSS), and transparent huge pages may back it (fewer TLB misses in expert matmuls).
    """

    def __init__(self, n_slots: int, slot_bytes: int) -> None:
        self.n_slots = n_slots
        self.stride = _round_up(slot_bytes)
        self._map = mmap.mmap(-1, max(self.stride * n_slots, ALIGN), flags=mmap.MAP_PRIVATE)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # kernels without THP refuse the advice; the arena works the same
                pass
        self._view = memoryview(self._map)
        self._tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        self._views: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (slot, plan.views) -> part tensors

    def slot(self, i: int) -> memoryview:
        return self._view[i * self.stride : (i + 1) * self.stride]

    def tensors(self, i: int, plan: ExpertPlan) -> tuple[torch.Tensor, ...]:
        """Views of slot i as the expert's part tensors (no copy). The arena never moves, so the
        views of a slot and layout are made once (a decode step asks for them on every expert
        call: nine tensor ops each time otherwise); a slot's few layouts differ only in lead."""
        key = (i, plan.views)
        out = self._views.get(key)
        if out is None:
            base = i * self.stride
            parts = []
            for offset, shape, dtype in plan.views:
                n = 1
                for s in shape:
                    n *= s
                raw = self._tensor[base + offset : base + offset + n * dtype.itemsize]
                parts.append(raw.view(dtype).view(shape))
            out = self._views[key] = tuple(parts)
        return out

    @property
    def nbytes(self) -> int:
        return self.stride * self.n_slots
