"""Engine configuration: one frozen dataclass, validated on construction.

engine.py is the one place where the names in an EngineConfig become objects; the CLI and the
Python API both build an EngineConfig and hand it over.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import BudgetError, ExpertCacheError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_BUDGET_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")

IO_MODES = ("direct", "buffered")
DEFAULT_CACHE_POLICY = "lfu"  # lfru falls to 0% hits below one token cycle, as a global LRU (tests/test_policies.py)
DEFAULT_IO_THREADS = 2


def parse_budget(budget: str | int | float, total_expert_bytes: int) -> int:
    """Turn "50%", "512MiB", "2GB", 123456 or "123456" into a byte count (not yet checked
    against the model's minimum, which the cache does)."""
    if isinstance(budget, bool):
        raise BudgetError(f"expert budget {budget!r} is not a size: use e.g. 50%, 512MiB, 2GB or a byte count")
    if isinstance(budget, (int, float)):
        value = float(budget)
        unit = ""
    else:
        m = _BUDGET_RE.match(str(budget))
        if m is None:
            raise BudgetError(
                f"cannot parse expert budget {budget!r}: use a percentage of all expert bytes (50%), "
                "a size (512MiB, 2GB) or a byte count"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < value <= 100:
            raise BudgetError(f"expert budget {budget!r} must be a percentage in (0, 100]")
        return int(total_expert_bytes * value / 100)
    if unit not in _UNITS:
        raise BudgetError(f"unknown unit {unit!r} in expert budget {budget!r}: use %, B, KB, MB, GB, KiB, MiB or GiB")
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise BudgetError(f"expert budget {budget!r} must be positive")
    return nbytes


@dataclass(frozen=True)
class EngineConfig:
    """Everything that decides how a model runs; engine.build() turns it into objects."""

    model: str | None = None  # checkpoint directory; None = the bundled demo model
    expert_budget: str | int = "50%"  # bytes of experts kept in memory: "50%", "512MiB", or an int
    cache_policy: str = DEFAULT_CACHE_POLICY  # eviction policy name (policies.POLICIES)
    future_trace: str | None = None  # cache_policy "belady": a trace of these same calls, its future (None: generate() records one)
    prefetch: str = "next-gate"  # predictor name (predictors.PREDICTORS); "none" = load on demand only
    prefetch_depth: int = 1  # how many layers ahead the predictor looks
    prefetch_max: int | None = None  # most experts prefetched per target layer in a decode step (bounds wasted bytes); None = the predictor's whole guess
    predictor: str | None = None  # file from `expertcache train-predictor` (default-vector, estimator, learned); None = MODEL/predictor-<kind>.pt
    io: str = "direct"  # "direct" = O_DIRECT reads that bypass the page cache; "buffered" = normal reads
    io_threads: int = DEFAULT_IO_THREADS  # reader threads; reads release the GIL and overlap compute
    device: str = "cpu"  # compute device; experts are staged in host memory either way
    num_threads: int | None = None  # torch intra-op threads; None = leave torch's setting alone
    dtype: str | None = None  # override the checkpoint's dtype ("float32", "bfloat16"); None = as saved
    routing: str = "exact"  # routing policy (routing.ROUTINGS); anything but "exact" trades quality for speed
    calibration: str | None = None  # adaptive-gating thresholds (expertcache calibrate); None = MODEL/adaptive_gating.json
    cache_lambda: float = 0.2  # cache-aware: bias toward resident experts, in units of the layer's logit range
    cache_protect_top: int = 2  # cache-aware(-max-rank): the router's top-J choices are never displaced
    cache_max_rank: int = 4  # cache-aware-max-rank: a resident expert may replace a choice if ranked within this
    routing_applies_to: str | None = None  # "prefill", "decode" or "both"; None = the routing policy's default

    def __post_init__(self) -> None:
        if self.io not in IO_MODES:
            raise ExpertCacheError(f"unknown --io {self.io!r}: choose one of {', '.join(IO_MODES)}")
        if self.io_threads < 1:
            raise ExpertCacheError(f"io_threads must be at least 1, got {self.io_threads}")
        if self.prefetch_depth < 1:
            raise ExpertCacheError(f"prefetch_depth must be at least 1, got {self.prefetch_depth}")
        if self.prefetch_max is not None and self.prefetch_max < 1:
            raise ExpertCacheError(f"prefetch_max must be at least 1, got {self.prefetch_max}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ExpertCacheError(f"unknown device {self.device!r}: use cpu or cuda[:N]")
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ExpertCacheError(f"model must be a directory path, got {type(self.model).__name__}")
        if self.cache_lambda < 0:
            raise ExpertCacheError(f"cache_lambda must be >= 0, got {self.cache_lambda}")
        if self.cache_protect_top < 0:
            raise ExpertCacheError(f"cache_protect_top must be >= 0, got {self.cache_protect_top}")
        if self.cache_max_rank < 1:
            raise ExpertCacheError(f"cache_max_rank must be at least 1, got {self.cache_max_rank}")
        if self.routing_applies_to not in (None, "prefill", "decode", "both"):
            raise ExpertCacheError(f"unknown routing phases {self.routing_applies_to!r}: use prefill, decode or both")
