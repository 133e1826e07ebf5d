"""Hardware profiles for the simulator's cost model: how fast experts move and layers compute.

A profile is a link (read bandwidth plus a fixed latency per expert read), the compute time of one
sparse layer for one decode token, and the compute each read adds on a CPU host (`read_cpu`; 0 in
the presets, whose reads are DMA). Per layer call that misses n experts of B bytes in all:
    load = n * latency + B / bandwidth;  time = compute + n * read_cpu + load - overlap * min(compute, load)
overlap 0 is demand loading, 1 perfect prefetch. A prefetch replay times reads on clock.py's link.
The "measured" profile is calibrated on this machine (measure.py).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace


log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    bandwidth_bytes_per_s: float  # sustained reads from the slow tier into expert slots
    latency_seconds: float  # fixed cost per expert read (request setup, command latency)
    layer_compute_seconds: float  # one decode token through one sparse layer (attention + experts)
    read_cpu_seconds: float = 0.0  # compute time one expert read takes from the computation beside it

    def load_seconds(self, reads: int, nbytes: int) -> float:
        return reads * self.latency_seconds + nbytes / self.bandwidth_bytes_per_s

    def layer_seconds(self, reads: int, nbytes: int, overlap: float = 0.0) -> float:
        """One layer call: compute plus the loads of its misses, `overlap` of them hidden."""
        load = self.load_seconds(reads, nbytes) if reads else 0.0
        c = self.layer_compute_seconds
        return c + reads * self.read_cpu_seconds + load - overlap * min(c, load)

    def with_compute(self, seconds: float) -> "Hardware":
        return replace(self, layer_compute_seconds=seconds)

    def to_dict(self) -> dict:
        return asdict(self)


GB = 1e9
# Links are typical sustained figures (not the interface's raw rate); compute is the per-layer
# decode time of a ~3B-active MoE (Qwen3-30B-A3B class, 4-bit) on the compute that usually sits
# behind that link: a discrete GPU for PCIe, a desktop CPU for NVMe, a phone SoC for UFS.
PRESETS: dict[str, Hardware] = {
    "pcie4": Hardware("pcie4", "PCIe 4.0 x16 host->GPU copies (~25 GB/s of 31.5 raw), GPU compute", 25 * GB, 10e-6, 100e-6),
    "pcie5": Hardware("pcie5", "PCIe 5.0 x16 host->GPU copies (~50 GB/s of 63 raw), GPU compute", 50 * GB, 10e-6, 100e-6),
    "nvme4": Hardware("nvme4", "NVMe gen4 SSD (~7 GB/s sequential, ~80 us per read), desktop CPU compute", 7 * GB, 80e-6, 800e-6),
    "ufs4": Hardware("ufs4", "UFS 4.0 phone flash (~4 GB/s sequential, ~120 us per read), phone SoC compute", 4 * GB, 120e-6, 1.6e-3),
}
HARDWARE_NAMES = (*PRESETS, "measured")  # "measured": calibrated on this machine (measure.py)
