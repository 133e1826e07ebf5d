"""Memory limits: read the limit this process runs under, and run a process under a limit of our own.

`plan()` splits a total memory limit into what is in use, a reserve and the expert budget, for
`--memory-limit`; with `auto` the limit is the tightest constraint over this process (`free_bytes`:
each cgroup above it, v1 `memory.limit_in_bytes` or v2 `memory.max`, less its usage; the machine's
MemAvailable). `MemoryCgroup` makes a child cgroup under this process's own, with a limit
that counts the page cache, starts processes inside it (they are moved in before exec, so every
page they touch is charged there) and reports its peak usage (RSS + page cache), failcnt and OOM
kills; benchmarks and tests use it to measure under a real limit. Torch-free.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .stats import current_rss_bytes

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # v1 reports "no limit" as a page-rounded 2^63 - 1
_serial = itertools.count()


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup here (not Linux, not root, or no memory controller)."""


def _own_memory_cgroup() -> tuple[str, Path]:
    """("v1" | "v2", directory of this process's memory cgroup)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError as e:
        raise CgroupUnavailable(f"no /proc/self/cgroup ({e.strerror})") from None
    unified = None
    for line in lines:
        num, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = CGROUP_ROOT / "memory" / path.lstrip("/")
            if d.is_dir():
                return "v1", d
        if num == "0" and controllers == "":
            unified = path
    if unified is not None:
        for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
            d = base / unified.lstrip("/")
            if "memory" in _read(base / "cgroup.controllers", "").split() and d.is_dir():
                return "v2", d
    raise CgroupUnavailable("no memory cgroup controller is mounted for this process")


def _read(path: Path, default: str | None = None) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        if default is None:
            raise
        return default


def free_bytes() -> tuple[int, int, str]:
    """(limit, free now, where the limit comes from) under the tightest constraint on this process:
    each cgroup over it with a limit (free = limit - its usage, page cache included, every process
    in it counted) and the machine (MemAvailable)."""
    best = (_meminfo("MemTotal"), _meminfo("MemAvailable"), "MemAvailable")
    try:
        version, d = _own_memory_cgroup()
    except CgroupUnavailable:
        return best
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes") if version == "v1" else ("memory.max", "memory.current")
    while (d / names[0]).exists():
        try:
            lim, use = _read(d / names[0]), int(_read(d / names[1]))
        except (OSError, ValueError):
            break
        if lim != "max" and int(lim) < _UNLIMITED and int(lim) - use < best[1]:
            best = (int(lim), int(lim) - use, f"cgroup {d}")
        if d.parent == d:
            break
        d = d.parent
    return best


@dataclass(frozen=True)
class MemoryPlan:
    """How a total memory limit splits, decided once the model's dense part is in memory."""

    limit_bytes: int  # the limit: stated, or the tightest cgroup's, or the machine's
    source: str  # "stated", "cgroup <dir>" or "MemAvailable"
    in_use_bytes: int  # what already counts against it: the runtime, the dense weights (other processes in the cgroup too)
    reserve_bytes: int  # kept free of experts: KV cache and activations
    budget_bytes: int  # what is left for experts

    @property
    def in_use_by(self) -> str:
        return "this process: runtime and dense weights" if self.source == "stated" else "everything under the limit"

    def describe(self) -> str:
        return (f"memory limit {_mib(self.limit_bytes)} ({self.source}) = in use {_mib(self.in_use_bytes)} ({self.in_use_by}) + "
                f"reserve {_mib(self.reserve_bytes)} (KV cache, activations) + experts {_mib(self.budget_bytes)}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def plan(limit: int | None, reserve: int) -> MemoryPlan:
    """Split `limit` bytes of this process (None: whatever the tightest constraint leaves free,
    `free_bytes`) into what is in use now, `reserve`, and the expert budget (may be <= 0: the
    caller says what is missing)."""
    if limit is None:
        total, free, source = free_bytes()
        in_use = total - free
    else:
        total, source, in_use = limit, "stated", current_rss_bytes()  # shared library pages included: conservative
    return MemoryPlan(total, source, in_use, reserve, total - in_use - reserve)


def _meminfo(key: str) -> int:
    for line in _read(Path("/proc/meminfo"), "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return _UNLIMITED


class MemoryCgroup:
    """A child memory cgroup with a limit of `limit` bytes (page cache counted; None: no limit, to
    measure), removed by `close()`.

        with MemoryCgroup(900 << 20) as cg:
            done = cg.run([sys.executable, "bench.py"], capture_output=True, timeout=600)
            cg.peak_bytes, cg.failcnt, cg.oom_kills
    """

    def __init__(self, limit: int | None) -> None:
        self.version, parent = _own_memory_cgroup()
        self.path = parent / f"expertcache-{os.getpid()}-{next(_serial)}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot create a cgroup under {parent} ({e.strerror})") from None
        self.limit = limit
        self._procs = str(self.path / "cgroup.procs")  # made here: the child that writes it only forked
        try:
            if limit is not None:  # v1's plain limit counts RSS + page cache (without swap, memsw adds nothing)
                self._write("memory.limit_in_bytes" if self.version == "v1" else "memory.max", limit)
            if self.version == "v2":
                self._write("memory.swap.max", 0, missing_ok=True)
        except OSError as e:
            self.close()
            raise CgroupUnavailable(f"cannot set a memory limit on {self.path} ({e.strerror})") from None

    def _write(self, name: str, value, *, missing_ok: bool = False) -> None:
        try:
            (self.path / name).write_text(str(value))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _move_here(self) -> None:  # in the child, between fork and exec: plain system calls only
        fd = os.open(self._procs, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    def popen(self, args, **kw) -> subprocess.Popen:
        """subprocess.Popen, the child moved into the cgroup before it execs (every page it touches counts here)."""
        return subprocess.Popen(args, preexec_fn=self._move_here, **kw)

    def run(self, args, **kw) -> subprocess.CompletedProcess:
        """subprocess.run (timeout kills and raises as there), the child moved in before it execs."""
        return subprocess.run(args, preexec_fn=self._move_here, **kw)

    # ---- figures ---------------------------------------------------------------------------
    @property
    def peak_bytes(self) -> int:
        """Peak usage (RSS + page cache + kernel memory charged here) since creation."""
        if self.version == "v1":
            return int(_read(self.path / "memory.max_usage_in_bytes"))
        return int(_read(self.path / "memory.peak", "0"))

    @property
    def failcnt(self) -> int:
        """How often usage hit the limit (v1; v2: memory.events "max")."""
        if self.version == "v1":
            return int(_read(self.path / "memory.failcnt"))
        return self.events().get("max", 0)

    @property
    def oom_kills(self) -> int:
        if self.version == "v1":
            return self._keyed("memory.oom_control").get("oom_kill", 0)
        return self.events().get("oom_kill", 0)

    def events(self) -> dict[str, int]:
        return self._keyed("memory.events")

    def stat(self) -> dict[str, int]:
        """memory.stat: v1 "cache", "rss", "pgpgin", "pgmajfault", ...; v2 "file", "anon", ..."""
        return self._keyed("memory.stat")

    def _keyed(self, name: str) -> dict[str, int]:
        out = {}
        for line in _read(self.path / name, "").splitlines():
            k, _, v = line.partition(" ")
            try:
                out[k] = int(v)
            except ValueError:
                pass
        return out

    def figures(self) -> dict:
        """What a benchmark records beside its timings."""
        st = self.stat()
        return {"limit_bytes": self.limit, "peak_bytes": self.peak_bytes, "failcnt": self.failcnt,
                "oom_kills": self.oom_kills, "cgroup": self.version,
                "cache_bytes": st.get("cache", st.get("file", 0)), "rss_bytes": st.get("rss", st.get("anon", 0)),
                "pgmajfault": st.get("pgmajfault", st.get("total_pgmajfault", 0))}

    def close(self) -> None:
        """Remove the cgroup once its processes are gone (waits up to 5 s for them to exit).
        Its page-cache charges move to the parent."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + 5
        while _read(self.path / "cgroup.procs", "") and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.version == "v1":
            try:
                self._write("memory.force_empty", 0)
            except OSError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass


def available() -> str | None:
    """None when a MemoryCgroup can be made here, else the reason it cannot (for a test's skip)."""
    try:
        MemoryCgroup(None).close()
    except CgroupUnavailable as e:
        return str(e)
    return None
