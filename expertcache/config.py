"""EngineConfig: everything that decides how a model runs, each default written once, here.

engine.py turns a config into objects; the CLI builds its engine flags from these fields (their
metadata carries the help text), and the Python API passes keywords straight through.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BudgetError, CheckpointError, ExpertCacheError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_BUDGET_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")

IO_MODES = ("direct", "buffered")
HALF_MATMUL = ("exact", "float32")
DECODE_STEPS = ("lean", "transformers")
ROUTING_PHASES = ("prefill", "decode", "both")
MISS_COPY_READS = ("misses", "all")
THREADS_ENV = "EXPERTCACHE_THREADS"
CALIBRATION_FILE = "adaptive_gating.json"  # adaptive-gating thresholds' default place, beside the model
DEMO_DIR = Path(__file__).parent / "demo"
PRECISION_WARMUP = 32  # a target layer's issued guesses before its precision gates anything
PRECISION_PROBE = 32  # one in this many gated decode calls still guesses, so the precision stays measured (8 let a blind predictor read 2.4x the bytes of none on 24 layers)
IDLE_GUESSES = 32  # a layer's decode guesses in a row that started no load before its guessing pauses (probed as above)
AMX_ROWS = 16  # rows up to which a bf16 product takes expertcache's AMX kernel where it gives oneDNN's bits (gemm.py; one tile of tokens)
AMX_MIN_INPUTS, AMX_MAX_INPUTS = 64, 4096  # ...and its inputs: oneDNN 3.12 takes 32 through another kernel and splits more than 4096 (measured)
KERNEL_ROWS = 16  # rows up to which a bf16/fp16 product stays in expertcache's exact kernel under half_matmul="float32" (gemm.py)
DENSE_ROWS = 16  # rows from which a quantized expert's half-precision product is dequantized and taken by torch's GEMM, where
# that GEMM is native (quant.py; measured crossover ~14 rows on an AVX-512/AMX Xeon: docs/quantized.md), but for bf16 rows
# qmm takes on AMX tiles (up to qmm_tile_rows: 32)
DENSE_ROWS_F32 = 48  # ...and a float32 one (crossover ~32 rows there)
UPCAST_ROWS = 2  # rows from which a bf16/fp16 matmul goes through float32 on CPUs without a native kernel (gemm.py)
RESERVE_CONTEXT = 4096  # tokens of KV cache --memory-limit keeps free by default: a long chat turn
RESERVE_WORKSPACE = 160 << 20  # a prompt's activations and allocator/oneDNN slack beside the KV cache: 123 MiB for 512 tokens measured (docs/memory.md)


def demo_model_dir() -> Path:
    """The bundled demo model's directory (shipped inside the package)."""
    if not (DEMO_DIR / "config.json").is_file():
        raise CheckpointError(f"the bundled demo model is missing from {DEMO_DIR}: pass --model DIR")
    return DEMO_DIR


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


def parse_size(value: str | int, what: str) -> int:
    """"2GiB", "512MB", "123456" or 123456 as a positive byte count; `what` names it in the error."""
    m = _BUDGET_RE.match(str(value)) if not isinstance(value, bool) else None
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise BudgetError(f"cannot read {what} {value!r} as a size: use e.g. 2GiB, 512MB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def option(default, why: str, **cli):
    """A config field: its default, its one-line why (also the CLI's help), and how the CLI offers
    it (flag=..., type=..., choices=..., group=..., cli=False to leave it out)."""
    return field(default=default, metadata={"help": why, **cli})


@dataclass(frozen=True)
class EngineConfig:
    """How a model runs; engine.Engine(config) builds it."""

    model: str | None = option(None, "checkpoint directory (default: the bundled demo model)")
    expert_budget: str | int = option("50%", "memory for experts: 50%, 512MiB, 2GB or a byte count", type=str)
    memory_limit: str | None = option(None, "total memory for the engine, instead of an expert budget: auto (what this process's "
                                            "cgroup, else the machine, leaves free) or a size (2GiB); experts get what the runtime, "
                                            "the dense weights and the reserve leave", type=str)
    memory_reserve: str | None = option(None, "with --memory-limit, memory kept free of experts for the KV cache and activations "
                                              f"(default: the KV cache of {RESERVE_CONTEXT} tokens + {RESERVE_WORKSPACE >> 20} MiB)", type=str)
    cache_policy: str = option("lfu", "eviction policy: lru, lfu, lfru, layer, layerlfu, random, or belady "
                                      "(the offline optimum, for measurement); lfru falls to 0% hits below one token cycle, as a global LRU")
    prefetch: str = option("next-gate", "predictor for speculative loads: none, next-gate, default-vector, estimator, learned, history, "
                                           "pregate")
    prefetch_depth: int = option(1, "sparse layers ahead the predictor guesses")
    prefetch_max: int | None = option(None, "most experts prefetched per target layer in a decode step (bounds wasted bytes); "
                                            "default: the predictor's whole guess", type=int)
    prefetch_min_precision: float = option(0.5, "decode guesses stop for layers whose measured prefetch precision "
                                                 f"(used / issued, after {PRECISION_WARMUP} issued) is below this, but for one "
                                                 f"call in {PRECISION_PROBE}: a blind predictor costs compute and reads for "
                                                 "nothing; 0 never stops", type=float)
    predictor: str | None = option(None, "predictor file from `expertcache train-predictor` (default: MODEL/predictor-<kind>.pt)")
    half_matmul: str = option("exact", "bf16/fp16 matmuls of 2+ rows (prefill, batched decoding) and attention: exact (torch's kernels, as "
                                       "transformers computes) or float32 (converted and multiplied in float32: several times faster "
                                       "prefill, and decode attention over a long context, on CPUs without a native half GEMM; rounds "
                                       "differently from transformers, within the dtype's precision)",
                              choices=HALF_MATMUL)
    decode_step: str = option("lean", "one-token decode steps: lean (the model's own operations and bits, its layers walked by "
                                      "expertcache without transformers' module calls: Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, GLM-4.5) or transformers "
                                      "(the model's forward; other families always)", choices=DECODE_STEPS)
    model_build: str = option("native", "who builds the model: native (expertcache's own modules for Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE and GLM-4.5, "
                                        "transformers' operations and bits without importing transformers, a smaller fixed memory cost (docs/memory.md); "
                                        "other families, rope scaling, sliding windows and --decode-step transformers use "
                                        "transformers') or transformers", choices=("native", "transformers"))
    miss_copy: str | None = option(None, "a smaller copy of the same model (`expertcache quantize MODEL --bits 4 --out DIR`): in decode "
                                         "steps a miss loads that copy's expert, a smaller read, and the full one is read over it at the "
                                         "lowest priority, when the link is idle (HOBBIT's mixed precision); lossy: measure it with "
                                         "`expertcache tradeoff --policies miss-copy`", type=str)
    miss_copy_upgrade: int = option(2, "with --miss-copy: calls on a miss copy's expert after which its full copy is read over it "
                                       "(1: at once; 2: once used again, so an expert evicted after one use costs no full read; "
                                       "0: never)", type=int)
    miss_copy_reads: str = option("all", "with --miss-copy: which decode reads take the miss copy: all (demand loads and guesses: a "
                                         "late guess stalls like a miss) or misses (demand loads only)", choices=MISS_COPY_READS)
    io: str = option("direct", "direct: O_DIRECT reads that bypass the page cache; buffered: page-cache reads", choices=IO_MODES)
    io_threads: int = option(2, "reader threads; reads release the GIL and overlap compute")
    num_threads: int | None = option(None, f"torch compute threads (default: ${THREADS_ENV} or 1)", flag="--threads", type=int)
    dtype: str | None = option(None, "compute dtype override, e.g. float32 or bfloat16 (default: as saved)")
    device: str = option("cpu", "compute device; only cpu for now (GPU compute is a planned seam: docs/ARCHITECTURE.md)", cli=False)
    routing: str = option("exact", "routing policy: exact, adaptive-gating, cache-aware, cache-aware-max-rank, speculative, "
                                   "pregate (with --prefetch pregate); "
                                   "all but exact trade measured quality for speed", group="routing")
    calibration: str | None = option(None, f"adaptive-gating thresholds from `expertcache calibrate` (default: MODEL/{CALIBRATION_FILE})",
                                     group="routing", aliases=("--routing-config",))
    cache_lambda: float = option(0.2, "cache-aware: bias toward resident experts, in units of the layer's logit range", group="routing")
    cache_protect_top: int = option(2, "cache-aware: the router's top-J choices are never displaced", group="routing")
    cache_max_rank: int = option(4, "cache-aware-max-rank: a resident expert may replace a choice if ranked within this", group="routing")
    routing_applies_to: str | None = option(None, "phases the routing policy runs in (default: the policy's own)",
                                            choices=ROUTING_PHASES, group="routing")

    def __post_init__(self) -> None:
        if self.half_matmul not in HALF_MATMUL:
            raise ExpertCacheError(f"unknown half_matmul {self.half_matmul!r}: choose one of {', '.join(HALF_MATMUL)}")
        if self.decode_step not in DECODE_STEPS:
            raise ExpertCacheError(f"unknown decode_step {self.decode_step!r}: choose one of {', '.join(DECODE_STEPS)}")
        if self.model_build not in ("native", "transformers"):
            raise ExpertCacheError(f"unknown model_build {self.model_build!r}: choose native or transformers")
        if self.io not in IO_MODES:
            raise ExpertCacheError(f"unknown io {self.io!r}: choose one of {', '.join(IO_MODES)}")
        for name, low in (("io_threads", 1), ("prefetch_depth", 1), ("cache_max_rank", 1), ("cache_protect_top", 0)):
            if getattr(self, name) < low:
                raise ExpertCacheError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.miss_copy_reads not in MISS_COPY_READS:
            raise ExpertCacheError(f"unknown miss_copy_reads {self.miss_copy_reads!r}: choose one of {', '.join(MISS_COPY_READS)}")
        if self.miss_copy_upgrade < 0:
            raise ExpertCacheError(f"miss_copy_upgrade must be at least 0, got {self.miss_copy_upgrade}")
        for name in ("prefetch_max", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ExpertCacheError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.device != "cpu":
            raise ExpertCacheError(f"device {self.device!r} is not supported: expertcache computes on the cpu for now")
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ExpertCacheError(f"model must be a directory path, got {type(self.model).__name__}")
        if not 0 <= self.prefetch_min_precision <= 1:
            raise ExpertCacheError(f"prefetch_min_precision must be within [0, 1], got {self.prefetch_min_precision}")
        if self.cache_lambda < 0:
            raise ExpertCacheError(f"cache_lambda must be >= 0, got {self.cache_lambda}")
        if self.routing_applies_to not in (None, *ROUTING_PHASES):
            raise ExpertCacheError(f"unknown routing phases {self.routing_applies_to!r}: use prefill, decode or both")

    def threads(self) -> int:
        """Compute threads: num_threads, else $EXPERTCACHE_THREADS, else 1 (small matmuls on a few
        shared cores only spin and contend with more; docs/ARCHITECTURE.md)."""
        if self.num_threads is not None:
            return self.num_threads
        env = os.environ.get(THREADS_ENV, "1").strip()
        if not env.isdigit() or int(env) < 1:
            raise ExpertCacheError(f"{THREADS_ENV} must be a whole number of at least 1, got {env!r}")
        return int(env)
