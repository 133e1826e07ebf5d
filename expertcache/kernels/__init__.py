"""expertcache's own CPU kernels (qmm.cpp: int8/int4 weight-only products on pack-quantized bytes;
bf16/fp16 products bit for bit as torch computes them, faster), compiled with torch's extension
builder on first use and cached (~15 s once per torch version).

Where no compiler is at hand, or EXPERTCACHE_KERNELS=torch, `available()` is False: quant.py
uses torch's CPU kernels instead and gemm.py torch's F.linear: the same results, slower.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_lock = threading.Lock()


@functools.cache
def _build() -> bool:
    import torch

    if os.environ.get("EXPERTCACHE_KERNELS", "").lower() == "torch":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("expertcache kernels are x86-64 AVX2; using torch's kernels on %s", platform.machine())
        return False
    try:
        from torch.utils.cpp_extension import load

        with open("/proc/cpuinfo") as f:
            flags = f.read()
        if " avx2" not in flags or " fma" not in flags or " f16c" not in flags:
            return False
        if not _built_before("expertcache_qmm"):
            log.warning("building expertcache's CPU kernels (once, about 15 s; torch's extension cache keeps them)")
        load(name="expertcache_qmm", sources=[str(Path(__file__).with_name("qmm.cpp"))],
             extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c"], is_python_module=False, verbose=False)
        return hasattr(torch.ops.expertcache, "qmm")
    except Exception as e:  # no compiler, no ninja, a read-only cache: torch's kernels do the work
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("expertcache's CPU kernels did not build (%s); using torch's int8/int4 kernels", first[:200])
        return False


def _built_before(name: str) -> bool:
    """Whether torch's extension cache holds a build of `name` (it rebuilds if the source changed)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:
        return False


def available() -> bool:
    """Whether torch.ops.expertcache.qmm can run (built now if need be)."""
    with _lock:
        return _build()
