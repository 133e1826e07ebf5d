"""Run statistics: cache lookups, hits and misses, prefetch outcomes, bytes read, stall time,
latency (TTFT, TPOT) and peak memory, for the whole run and per layer."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    stall_seconds: float = 0.0
    prefetch_issued: int = 0  # speculative loads started for this layer (the run-wide fields below, per target layer)
    prefetch_used: int = 0
    prefetch_late: int = 0
    prefetch_wasted: int = 0
    prefetch_cancelled: int = 0


@dataclass
class Stats:
    lookups: int = 0  # expert lookups: one per distinct expert a layer call needs
    hits: int = 0  # lookups that found the expert resident or already loading
    misses: int = 0  # lookups that started a demand load
    prefetch_issued: int = 0  # speculative loads started
    prefetch_used: int = 0  # speculative loads whose expert was then needed
    prefetch_late: int = 0  # ...of which the load had not finished when needed
    prefetch_wasted: int = 0  # speculative loads their layer did not need
    prefetch_cancelled: int = 0  # speculative loads cancelled before being read
    stall_seconds: float = 0.0  # time the computation waited for expert loads
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def layer(self, layer: int) -> LayerStats:
        ls = self.layers.get(layer)
        if ls is None:
            ls = self.layers[layer] = LayerStats()
        return ls

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = {str(k): asdict(v) for k, v in sorted(self.layers.items())}
        return d


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own memory since it started (exec).

    On Linux this is VmHWM from /proc/self/status. Not getrusage's ru_maxrss: the kernel carries
    ru_maxrss across exec, so a process started by a large parent (pytest, a notebook, a benchmark
    driver) reports the parent's peak as its own; Python's subprocess forks with vfork, which
    makes that the parent's whole peak. ru_maxrss is the fallback where /proc is absent.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # macOS reports bytes, Linux KiB


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return 0
