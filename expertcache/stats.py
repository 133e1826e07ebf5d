"""Run statistics: one Stats type for the engine and the simulator, run-wide and per layer, and
the process's own memory figures."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field, fields

@dataclass
class LayerStats:
    lookups: int = 0  # expert lookups: one per distinct expert a layer call needs
    hits: int = 0  # lookups that found the expert resident or already loading
    misses: int = 0  # lookups that started a demand load
    prefetch_issued: int = 0  # speculative loads started
    prefetch_used: int = 0  # speculative loads whose expert was then needed
    prefetch_late: int = 0  # ...of which the load had not finished when needed
    prefetch_wasted: int = 0  # speculative loads their layer did not need
    prefetch_cancelled: int = 0  # speculative loads cancelled before being read
    stall_seconds: float = 0.0  # time the computation waited for expert loads
    low_loads: int = 0  # loads of the miss copy's smaller expert (--miss-copy): decode misses (and guesses, --miss-copy-reads all)
    low_uses: int = 0  # expert calls computed on a miss copy's expert (each is lossy)
    upgrades: int = 0  # full copies read over a resident miss copy's expert
    upgrades_cancelled: int = 0  # ...of which cancelled before a byte was read (the expert was needed first)


@dataclass
class Stats(LayerStats):
    """The run's counters; `layers` holds the same counters per sparse layer."""

    bytes_read: int = 0  # expert bytes of the loads started and not cancelled
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def layer(self, layer: int) -> LayerStats:
        ls = self.layers.get(layer)
        if ls is None:
            ls = self.layers[layer] = LayerStats()
        return ls

    def count(self, layer: int, name: str, n: int | float = 1) -> None:
        """Add `n` to counter `name`, run-wide and for `layer`."""
        setattr(self, name, getattr(self, name) + n)
        ls = self.layer(layer)
        setattr(ls, name, getattr(ls, name) + n)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, {} if f.name == "layers" else type(getattr(self, f.name))())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = {str(k): asdict(v) for k, v in sorted(self.layers.items())}
        return d


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own memory since it started (exec).

    On Linux this is VmHWM from /proc/self/status. Not getrusage's ru_maxrss: the kernel carries
    ru_maxrss across exec, so a process started by a large parent (pytest, a notebook, a benchmark
    driver) reports the parent's peak as its own. ru_maxrss is the fallback where /proc is absent.
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
