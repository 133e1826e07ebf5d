"""Memory limits: read the limit this process runs under, and run a process under a limit of our own.

`limit_bytes()` is what `--memory-limit auto` sizes the expert budget from: the tightest cgroup
memory limit above this process (v1 `memory.limit_in_bytes` or v2 `memory.max`), else the
machine's MemAvailable. `MemoryCgroup` makes a child cgroup under this process's own, with a limit
that counts the page cache, starts processes inside it (they are moved in before exec, so every
page they touch is charged there) and reports its peak usage (RSS + page cache), failcnt and OOM
kills; benchmarks and tests use it to measure under a real limit. Torch-free.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from pathlib import Path

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


def limit_bytes() -> int:
    """The memory this process may use: the tightest cgroup limit over its cgroup and its
    ancestors, or MemAvailable when none is set (or cgroups cannot be read)."""
    limits = []
    try:
        version, d = _own_memory_cgroup()
        name = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        while True:
            v = _read(d / name, "max")
            if v != "max" and int(v) < _UNLIMITED:
                limits.append(int(v))
            if d.parent == d or not (d.parent / name).exists():
                break
            d = d.parent
    except (CgroupUnavailable, ValueError):
        pass
    avail = _meminfo("MemAvailable")
    return min(limits) if limits else avail


def _meminfo(key: str) -> int:
    for line in _read(Path("/proc/meminfo"), "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return _UNLIMITED


class MemoryCgroup:
    """A child memory cgroup with `limit` bytes (page cache counted), removed by `close()`.

        with MemoryCgroup(900 << 20) as cg:
            proc = cg.popen([sys.executable, "bench.py"])
            ...
            cg.peak_bytes, cg.failcnt, cg.oom_kills
    """

    def __init__(self, limit: int, *, name: str | None = None) -> None:
        self.version, parent = _own_memory_cgroup()
        self.path = parent / (name or f"expertcache-{os.getpid()}-{next(_serial)}")
        try:
            self.path.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            raise CgroupUnavailable(f"cannot create a cgroup under {parent} ({e.strerror})") from None
        self.limit = int(limit)
        try:
            if self.version == "v1":
                # without swap the memsw limit changes nothing; the plain one counts RSS + page cache
                self._write("memory.limit_in_bytes", self.limit)
            else:
                self._write("memory.max", self.limit)
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

    def enter(self, pid: int = 0) -> None:
        """Move process `pid` (0: the caller) into the cgroup. Pages it touched before stay charged
        where they were; `popen` moves a child before exec, so all of its pages count here."""
        (self.path / "cgroup.procs").write_text(str(pid or os.getpid()))

    def popen(self, args, **kw) -> subprocess.Popen:
        """subprocess.Popen, the child moved into the cgroup before it execs."""
        procs = str(self.path / "cgroup.procs")

        def move() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

        return subprocess.Popen(args, preexec_fn=move, **kw)

    # ---- figures ---------------------------------------------------------------------------
    @property
    def usage_bytes(self) -> int:
        return int(_read(self.path / ("memory.usage_in_bytes" if self.version == "v1" else "memory.current")))

    @property
    def peak_bytes(self) -> int:
        """Peak usage (RSS + page cache + kernel memory charged here) since creation or reset_peak()."""
        if self.version == "v1":
            return int(_read(self.path / "memory.max_usage_in_bytes"))
        return int(_read(self.path / "memory.peak", "0"))

    def reset_peak(self) -> None:
        if self.version == "v1":
            self._write("memory.max_usage_in_bytes", 0)
            self._write("memory.failcnt", 0)
        else:
            self._write("memory.peak", 0, missing_ok=True)

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
        MemoryCgroup(_UNLIMITED >> 4).close()
    except CgroupUnavailable as e:
        return str(e)
    return None
