"""memlimit: the limit a process runs under, and child cgroups whose limit counts the page cache.

The cgroup tests need a writable memory cgroup (root, Linux, a memory controller): they skip with
the reason otherwise. Each makes its own child cgroup and removes it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from expertcache import memlimit
from expertcache.stats import current_rss_bytes

MiB = 2**20
REASON = memlimit.available()
needs_cgroup = pytest.mark.skipif(REASON is not None, reason=f"no writable memory cgroup: {REASON}")


def _run(cg: memlimit.MemoryCgroup, code: str) -> subprocess.CompletedProcess:
    return cg.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_free_bytes_is_within_the_machine():
    limit, free, source = memlimit.free_bytes()
    assert 0 < free <= limit <= max(memlimit._meminfo("MemTotal"), limit) and source


@needs_cgroup
def test_a_child_sees_its_cgroup_limit_and_usage():
    with memlimit.MemoryCgroup(300 * MiB) as cg:
        r = _run(cg, "from expertcache import memlimit; b = bytearray(50 * 2**20); b[::4096] = b'1' * (len(b) // 4096)\n"
                     "print(*memlimit.free_bytes()[:2])")
        assert r.returncode == 0, r.stderr
        limit, free = map(int, r.stdout.split())
        assert limit == 300 * MiB
        assert free <= 250 * MiB, "the child's own 50 MiB is not counted as used"


def test_plan_splits_a_stated_limit_into_use_reserve_and_budget():
    p = memlimit.plan(4 << 30, reserve=100 * MiB)
    assert p.source == "stated" and 0 < p.in_use_bytes <= current_rss_bytes() + 64 * MiB
    assert p.in_use_bytes + p.reserve_bytes + p.budget_bytes == 4 << 30
    assert "reserve 100 MiB" in p.describe()


@needs_cgroup
def test_anonymous_memory_over_the_limit_is_oom_killed_and_counted():
    with memlimit.MemoryCgroup(64 * MiB) as cg:
        r = _run(cg, "b = bytearray(200 * 2**20); b[::4096] = b'1' * (len(b) // 4096); print('survived')")
        assert r.returncode != 0 and "survived" not in r.stdout
        assert cg.oom_kills >= 1
        assert cg.peak_bytes <= 64 * MiB


@needs_cgroup
def test_page_cache_counts_against_the_limit_and_is_reclaimed(tmp_path):
    """A buffered read of a file larger than the limit succeeds (the cache is reclaimed, failcnt
    rises); usage, page cache included, never passes the limit."""
    f = tmp_path / "big.bin"
    with open(f, "wb") as fh:
        for _ in range(160):
            fh.write(b"\1" * MiB)
        fh.flush()
        os.fsync(fh.fileno())  # clean pages can leave the cache: the child reads from disk, charged to its cgroup
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    code = f"f = open({str(f)!r}, 'rb', buffering=0)\nwhile f.read(1 << 20): pass\nprint('read')"
    with memlimit.MemoryCgroup(96 * MiB) as cg:
        r = _run(cg, code)
        assert r.returncode == 0 and "read" in r.stdout, r.stderr
        fig = cg.figures()
        assert fig["peak_bytes"] <= 96 * MiB
        assert fig["failcnt"] > 0 and fig["oom_kills"] == 0
    assert not cg.path.exists(), "the cgroup was not removed"


def test_the_slot_arena_is_process_memory_not_shared_memory():
    """Shared anonymous memory is shmem: a cgroup counts it as page cache. The arena must be
    private (RssAnon), so a limit sees the experts as the process's own memory."""
    from expertcache.store import SlotArena

    def shmem_kib() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
        pytest.skip("no RssShmem in /proc/self/status")

    before = shmem_kib()
    arena = SlotArena(4, 8 * MiB)
    for i in range(4):
        arena.slot(i)[::4096] = b"\1" * (8 * MiB // 4096)  # touch every page
    assert shmem_kib() - before < 1024, "the slot arena is shared memory (counted as page cache)"


@needs_cgroup
def test_dense_tensors_read_leave_no_page_cache_behind(tmp_path):
    """Checkpoint reads of dense tensors copy them into process memory and drop their file pages."""
    from safetensors.torch import save_file
    import torch

    f = tmp_path / "dense.safetensors"
    save_file({"a": torch.ones(24 * MiB // 4), "b": torch.zeros(16 * MiB // 2, dtype=torch.bfloat16)}, str(f))
    with open(f, "rb") as fh:
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    code = (
        "from pathlib import Path\n"
        "from expertcache.checkpoint import read_tensors, _read_all\n"
        f"got = _read_all(read_tensors(Path({str(tmp_path)!r})))\n"
        "assert float(got['a'].sum()) == 24 * 2**20 // 4\n"
        "line = [l for l in open('/proc/self/cgroup') if ':memory:' in l][0].split(':', 2)[2].strip()\n"
        "st = dict(l.split() for l in open('/sys/fs/cgroup/memory' + line + '/memory.stat'))\n"
        "print(st['cache'])\n"
    )
    with memlimit.MemoryCgroup(1 << 30) as cg:
        if cg.version != "v1":
            pytest.skip("the check reads cgroup v1's memory.stat")
        r = _run(cg, code)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout.split()[-1]) < 8 * MiB, f"{int(r.stdout.split()[-1]) / MiB:.0f} MiB of page cache left by 40 MiB of dense tensors"
