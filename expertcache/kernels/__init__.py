"""expertcache's own CPU kernels (qmm.cpp: int8/int4 weight-only products on pack-quantized bytes;
bf16/fp16 products bit for bit as torch computes them, faster), compiled with torch's extension
builder on first use into expertcache's cache folder (~15 s once per source and torch version), then
loaded as built.

Where no compiler is at hand, or EXPERTCACHE_KERNELS=torch, `available()` is False: quant.py
uses torch's CPU kernels instead and gemm.py torch's F.linear: the same results, slower.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
_lock = threading.Lock()


SOURCE = Path(__file__).with_name("qmm.cpp")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c"]
STALE_LOCK_S = 300  # a build lock older than this was left by a killed build (a build takes ~15 s)


def _name() -> str:
    """The build's name: the source, the flags, torch's and Python's versions hashed, so two
    checkouts or versions never rebuild over each other."""
    import torch

    key = SOURCE.read_bytes() + " ".join([*CFLAGS, torch.__version__, sys.version]).encode()
    return f"expertcache_qmm_{hashlib.sha256(key).hexdigest()[:12]}"


def build_dir(name: str) -> Path:
    """Where a build lives: $EXPERTCACHE_KERNEL_DIR, else expertcache's folder in the user's cache."""
    root = os.environ.get("EXPERTCACHE_KERNEL_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "expertcache" / "kernels"
    return Path(root) / name


@functools.cache
def _build() -> bool:
    import torch

    if os.environ.get("EXPERTCACHE_KERNELS", "").lower() == "torch":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("expertcache kernels are x86-64 AVX2; using torch's kernels on %s", platform.machine())
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        if " avx2" not in flags or " fma" not in flags or " f16c" not in flags:
            return False
        name = _name()
        where = build_dir(name)
        built = where / f"{name}.so"
        if built.exists():  # built before: loaded as it is (no compiler, no extension machinery)
            torch.ops.load_library(str(built))
            return hasattr(torch.ops.expertcache, "qmm")
        from torch.utils.cpp_extension import load

        log.warning("building expertcache's CPU kernels into %s (once, about 15 s)", where)
        where.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(where / "lock")
        load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS,
             build_directory=str(where), is_python_module=False, verbose=False)
        return hasattr(torch.ops.expertcache, "qmm")
    except Exception as e:  # no compiler, no ninja, a read-only cache: torch's kernels do the work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("expertcache's CPU kernels did not build (%s); using torch's kernels", first[:200])
        return False


def _clear_stale_lock(lock: Path) -> None:
    """torch's builder waits, without end, for another build's lock file to go; a build killed
    midway leaves it. A lock older than STALE_LOCK_S is removed."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing a stale kernel-build lock %s (a build was interrupted)", lock)
            lock.unlink()
    except FileNotFoundError:
        pass



def available() -> bool:
    """Whether torch.ops.expertcache.qmm can run (built now if need be)."""
    with _lock:
        return _build()


VERDICTS = "verdicts.json"  # in the build's folder: the answers of remembered checks, by check and machine


def remembered(check):
    """functools.cache for a check that a kernel gives torch's bits here, whose answer also outlives
    the process: kept beside the build (so a new source, flags, torch or Python start afresh), keyed
    by the check, its arguments, the machine (CPU model and flags, torch's CPU capability, oneDNN's
    and ATen's environment) and torch's thread count. The same build on the same machine gives the same answer,
    so only a first load runs the checks: their random inputs and first products cost a load
    memory that stays (docs/memory.md). Without the kernels the check runs (and says no)."""

    @functools.cache
    @functools.wraps(check)
    def wrapper(*args):
        if not available():
            return check(*args)
        key = f"{check.__module__}.{check.__qualname__}{args!r}@{_machine()}/{_threads()}"
        path = build_dir(_name()) / VERDICTS
        known = _read_verdicts(path)
        if isinstance(known.get(key), bool):
            return known[key]
        ok = bool(check(*args))
        _write_verdict(path, key, ok)
        return ok

    wrapper.__wrapped__ = check  # the check itself, run again (tests)
    return wrapper


def _threads() -> int:
    """torch's compute threads: a product's bits may depend on how its work is split."""
    import torch

    return torch.get_num_threads()


@functools.cache
def _machine() -> str:
    import torch

    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("ONEDNN_", "DNNL_", "ATEN_CPU_CAPABILITY")))
    key = repr((lines, torch.__version__, torch.backends.cpu.get_cpu_capability(), env)).encode()
    return hashlib.sha256(key).hexdigest()[:16]


def _read_verdicts(path: Path) -> dict:
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_verdict(path: Path, key: str, ok: bool) -> None:
    """Add one answer, written whole and renamed into place (a reader never sees half a file; two
    writers at once may lose one answer, asked again next time). A read-only folder keeps none."""
    known = {**_read_verdicts(path), key: ok}
    tmp = path.with_name(f"{VERDICTS}.{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
