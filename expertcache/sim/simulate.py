"""Trace-driven cache simulator: a routing trace replayed, then priced on a hardware profile.

"reference" mode is the shared Qwen3 trace's own accounting (docs/techniques.md): byte budgets,
eviction after each call; there policy "lookahead-N" replays a pre-gate (Read-ME): the next N
tokens' routing known to eviction. "engine" mode drives the engine's own CacheCore through a
Reader that lands loads at once, so an engine run's trace replays to its exact hits and misses;
with `prefetch=True` the recorded guesses replay too, timed on a ClockedReader (clock.py).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import BudgetError, ExpertCacheError
from ..ids import ExpertId
from ..policies import POLICIES, LookaheadPolicy, lookahead_window, make_policy
from ..stats import Stats
from .clock import ClockedReader, InstantReader
from .hardware import Hardware
from .trace import Trace

log = logging.getLogger(__name__)

MODES = ("reference", "engine")
ALLOCATIONS = ("equal", "dp")
DEFAULT_POLICIES = ("belady", "lru", "lfu", "lfru", "layer", "layerlfu")
MIB = 2**20


@dataclass(frozen=True)
class Step:
    decode: bool
    layer: int
    lookups: tuple[ExpertId, ...]  # distinct experts, in order of their last use in the call
    touched: frozenset[ExpertId]  # the same, as a set: what eviction after the call must keep
    guesses: tuple[tuple[int, tuple[int, ...]], ...] | None = None  # recorded prefetch: (target layer, experts)
    token: int = -1  # decode calls: index of the decode token (forward) they belong to
    rows: int = 1  # tokens in the call: more than one computes each expert as it comes (the cache's `each`)


class Stream:
    """A trace's access stream prepared once for many replays."""

    def __init__(self, trace: Trace) -> None:
        self.shape = trace.shape
        self.layers = list(trace.shape.sparse_layers)
        self.expert_bytes = dict(trace.shape.expert_bytes)
        self.decode_tokens = trace.decode_tokens
        self.has_guesses = bool(trace.routes) and all(r.guesses is not None for r in trace.routes)
        first = self.layers[0] if self.layers else None
        steps, token = [], -1
        for b, r in zip(trace.batches(), trace.routes):
            last_use = list(dict.fromkeys(reversed(b.ids)))[::-1]
            lookups = tuple((b.layer, e) for e in last_use)
            guesses = tuple((t, tuple(es)) for t, es in r.guesses) if r.guesses is not None else None
            if b.decode and b.layer == first:
                token += 1
            steps.append(Step(b.decode, b.layer, lookups, frozenset(lookups), guesses, token if b.decode else -1, r.ids.shape[0]))
        self.steps = steps
        unknown = {s.layer for s in steps} - set(self.expert_bytes)
        if unknown:
            raise ExpertCacheError(f"the trace routes layer(s) {sorted(unknown)} that its header gives no expert_bytes for")


@dataclass
class Replay:
    """Counters of one (policy, budget) replay."""

    policy: str
    budget_bytes: int
    mode: str
    lookups: int = 0
    hits: int = 0
    decode_lookups: int = 0
    decode_hits: int = 0
    bytes_read: int = 0
    decode_loads: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (reads, bytes) per decode call
    decode_seconds: list[float] | None = field(default=None, repr=False)  # per decode call, from a timed (prefetch) replay
    decode_waits: list[float] | None = field(default=None, repr=False)  # ...of which waiting for loads
    hardware: Hardware | None = None  # the profile a timed replay ran on
    prefetch: dict | None = None  # prefetch counters of a prefetch replay (as the engine's stats)
    miss_copy: dict | None = None  # a miss-copy replay's counters (low_loads, low_share, upgrades, upgrades_cancelled)

    @property
    def misses(self) -> int:
        return self.lookups - self.hits

    @property
    def hit_pct(self) -> float:
        return 100.0 * self.hits / self.lookups if self.lookups else 0.0

    @property
    def hit_pct_decode(self) -> float:
        return 100.0 * self.decode_hits / self.decode_lookups if self.decode_lookups else 0.0

    def _count(self, decode: bool, hits: int, misses: int, nbytes: int) -> None:
        self.lookups += hits + misses
        self.hits += hits
        self.bytes_read += nbytes
        if decode:
            self.decode_lookups += hits + misses
            self.decode_hits += hits
            self.decode_loads.append((misses, nbytes))


def _policy(name: str, future: Sequence | None, seed: int, window: int = 0):
    if lookahead_window(name) is not None:
        return LookaheadPolicy(future, window), False
    try:
        return make_policy(name, future=future, seed=seed)
    except ValueError as e:
        raise ExpertCacheError(str(e)) from None


# --- reference accounting -------------------------------------------------------------------------
def _replay_reference(stream: Stream, name: str, budget: int, allocation: str, seed: int) -> Replay:
    """The reference accounting: lookups, then eviction after the batch down to the budget."""
    tokens = lookahead_window(name)
    future = [s.lookups for s in stream.steps] if name == "belady" or tokens is not None else None
    partitioned = tokens is None and POLICIES[name][1]
    eb = stream.expert_bytes
    if partitioned:
        limits = layer_budgets(stream, budget, allocation)
        pools = {l: _policy(name, future, seed)[0] for l in stream.layers}
    else:  # lookahead-N: the next N tokens' layer calls are known (a call is one step of the stream)
        pool = _policy(name, future, seed, window=(tokens or 0) * len(stream.layers))[0]
        pools = {l: pool for l in stream.layers}
        limits = None
    used = {l: 0 for l in stream.layers} if partitioned else {None: 0}
    resident: set[ExpertId] = set()
    out = Replay(name, budget, "reference")
    for t, step in enumerate(stream.steps):
        layer = step.layer
        policy = pools[layer]
        hits = misses = 0
        for e in step.lookups:
            if e in resident:
                hits += 1
                policy.access(e, t)
            else:
                misses += 1
                resident.add(e)
                policy.insert(e, t)
        nbytes = misses * eb[layer]
        out._count(step.decode, hits, misses, nbytes)
        key = layer if partitioned else None
        used[key] += nbytes
        limit = limits[layer] if partitioned else budget
        if used[key] > limit:
            touched = step.touched
            allowed = lambda e: e not in touched  # noqa: E731
            while used[key] > limit:
                v = policy.victim(allowed, t)
                if v is None:
                    break
                policy.remove(v)
                resident.discard(v)
                used[key] -= eb[v[0]]
    return out


def layer_budgets(stream: Stream, budget: int, allocation: str = "equal") -> dict[int, float]:
    """Bytes each layer owns under a partitioned policy: budget / layers ("equal"), or the
    dynamic-programming split of `dp_allocation` (AdapMoE)."""
    if allocation == "equal":
        return {l: budget / len(stream.layers) for l in stream.layers}
    if allocation == "dp":
        slots = dp_allocation(stream, budget)
        return {l: slots[l] * stream.expert_bytes[l] for l in stream.layers}
    raise ExpertCacheError(f"unknown allocation {allocation!r}: choose one of {', '.join(ALLOCATIONS)}")


# --- engine accounting ----------------------------------------------------------------------------
def engine_capacity(stream: Stream, budget: int) -> int:
    """Slots the engine's cache would have for this budget (its minimum budget enforced)."""
    from ..cache import capacity_for

    return capacity_for(budget, max(stream.expert_bytes.values()), stream.shape.top_k,
                        stream.shape.num_experts * len(stream.layers))


def _replay_engine(stream: Stream, name: str, budget: int, allocation: str, seed: int,
                   hardware: Hardware | None = None, prefetch: bool = False, low_bytes: dict[int, int] | None = None,
                   upgrade_after: int = 2) -> Replay:
    """The engine's CacheCore over the stream: demand loads only (every load lands at once), or,
    with `prefetch`, the trace's recorded guesses too, on a simulated clock. `low_bytes`: a miss
    copy's expert sizes (--miss-copy): decode misses read those, and upgrades the full experts
    (timed on the link with `prefetch`; demand-only, they land at once and only their bytes count)
    after `upgrade_after` uses (CacheCore.upgrade_after)."""
    from ..cache import CacheCore, equal_quotas

    capacity = engine_capacity(stream, budget)
    needed = [sorted(e for _, e in s.lookups) for s in stream.steps]
    future = None
    if name == "belady":  # CacheCore ticks once per wave: Belady's future is indexed by each tick's `now`
        future = [tuple((s.layer, e) for e in ids[i : i + capacity])
                  for s, ids in zip(stream.steps, needed) for i in range(0, len(ids), capacity)]
    policy, partitioned = _policy(name, future, seed)
    quotas = None
    if partitioned:
        quotas = equal_quotas(capacity, stream.layers) if allocation == "equal" else dp_allocation(stream, budget, capacity)
    stats = Stats()
    reader = ClockedReader(hardware, stream.expert_bytes, low_bytes) if prefetch else InstantReader()
    core = CacheCore(capacity=capacity, policy=policy, reader=reader, stats=stats, expert_bytes=stream.expert_bytes,
                     layers=stream.layers, experts_per_layer=stream.shape.num_experts, quotas=quotas, low_bytes=low_bytes)
    core.upgrade_after = upgrade_after
    core.low_guesses = True  # as the engine's default (--miss-copy-reads all)
    out = Replay(name, budget, "engine")
    if prefetch:
        out.decode_seconds, out.decode_waits, out.hardware = [], [], hardware
    for step, ids in zip(stream.steps, needed):
        hits0, misses0, low0 = stats.hits, stats.misses, stats.low_loads
        core.miss_low = low_bytes is not None and step.decode
        if prefetch:
            _timed_call(core, reader, step, ids, out)
        else:
            for _ in core.stream(step.layer, ids, each=step.rows > 1):
                pass
        misses, low = stats.misses - misses0, stats.low_loads - low0
        nbytes = (misses - low) * stream.expert_bytes[step.layer] + (low * low_bytes[step.layer] if low else 0)
        out._count(step.decode, stats.hits - hits0, misses, nbytes)
    if low_bytes is not None:
        out.bytes_read = stats.bytes_read  # with the upgrades
        out.miss_copy = {"low_loads": stats.low_loads, "low_share": stats.low_uses / max(stats.lookups, 1),
                         "upgrades": stats.upgrades, "upgrades_cancelled": stats.upgrades_cancelled}
    if prefetch:
        out.bytes_read = stats.bytes_read  # demand and speculative reads (cancelled guesses are never read)
        out.prefetch = {k: getattr(stats, k) for k in ("prefetch_issued", "prefetch_used", "prefetch_late",
                                                       "prefetch_wasted", "prefetch_cancelled")}
    return out


def _timed_call(core, reader: ClockedReader, step: Step, needed: list[int], out: Replay) -> None:
    """One layer call as the engine makes it: the lead guess requested before it, the call's own
    guesses after its first wave's demand loads; decode calls then compute for the profile's time
    per layer plus read_cpu per read submitted (prefill calls are untimed: loads land at once)."""
    stats, hw = core.stats, reader.hardware
    reader.timed = step.decode
    if not step.decode:
        reader.flush()
    start, reads0 = reader.now, stats.misses + stats.prefetch_issued
    guesses = [(t, list(es)) for t, es in step.guesses or () if t != step.layer]
    for t, experts in step.guesses or ():
        if t == step.layer:  # requested before the call (the engine's first-layer guess)
            core.request_lead(t, list(experts))
    for _ in core.stream(step.layer, needed, (lambda: guesses) if guesses else None, each=step.rows > 1):
        pass
    if not step.decode:
        reader.flush()
        reader.now = start
        return
    waited = reader.now - start
    reads = stats.misses + stats.prefetch_issued - reads0
    reader.now = start + waited + hw.layer_compute_seconds + reads * hw.read_cpu_seconds
    out.decode_seconds.append(reader.now - start)
    out.decode_waits.append(waited)


# --- per-layer allocation (AdapMoE) ---------------------------------------------------------------
def layer_miss_curves(stream: Stream) -> dict[int, list[int]]:
    """misses[l][s]: the misses layer l would take with s slots of its own under LRU, for
    s = 0..experts, from LRU stack distances of the stream (exact for a per-layer LRU that
    evicts after each call)."""
    n = stream.shape.num_experts
    hist = {l: [0] * (n + 2) for l in stream.layers}  # hist[d]: lookups at stack depth d (n+1 = cold)
    stacks: dict[int, list[int]] = {l: [] for l in stream.layers}
    for s in stream.steps:
        stack, h = stacks[s.layer], hist[s.layer]
        depths = []
        for _, e in s.lookups:
            depths.append(stack.index(e) if e in stack else n + 1)
        for (_, e), d in zip(s.lookups, depths):
            h[d] += 1
        for _, e in s.lookups:  # most recent last use at the front
            if e in stack:
                stack.remove(e)
        stack[:0] = [e for _, e in reversed(s.lookups)]
    curves = {}
    for l, h in hist.items():
        total = sum(h)
        curve, hit = [], 0
        for slots in range(n + 1):
            curve.append(total - hit)
            hit += h[slots]
        curves[l] = curve
    return curves


def dp_allocation(stream: Stream, budget: int, capacity: int | None = None) -> dict[int, int]:
    """AdapMoE's adaptive caching: per-layer slot counts minimising the stream's expected
    on-demand bytes, by dynamic programming over layers, within the byte budget (or within
    `capacity` slots when given). The per-layer predictability is each layer's own LRU miss
    curve on the trace (an offline profile of the same routing)."""
    import numpy as np

    curves = layer_miss_curves(stream)
    layers = stream.layers
    if capacity is not None:
        unit, cost = 1, {l: 1 for l in layers}
        total = capacity
    else:
        unit = math.gcd(*stream.expert_bytes.values())
        cost = {l: stream.expert_bytes[l] // unit for l in layers}
        total = budget // unit
    total = min(total, sum(cost[l] * stream.shape.num_experts for l in layers))
    inf = float("inf")
    best = np.zeros(total + 1)  # best[b]: least missed bytes of the layers so far within b units
    choice = []
    for l in layers:
        c, miss = cost[l], curves[l]
        new = np.full(total + 1, inf)
        arg = np.zeros(total + 1, dtype=np.int64)
        for s in range(len(miss)):
            if s * c > total:
                break
            cand = np.full(total + 1, inf)
            cand[s * c :] = best[: total + 1 - s * c] + miss[s] * stream.expert_bytes[l]
            better = cand < new
            new[better] = cand[better]
            arg[better] = s
        best = new
        choice.append(arg)
    slots, b = {}, int(np.argmin(best))
    for l, arg in zip(reversed(layers), reversed(choice)):
        s = int(arg[b])
        slots[l] = s
        b -= s * cost[l]
    return {l: slots[l] for l in layers}


# --- running and reporting ------------------------------------------------------------------------
def replay(
    trace: Trace | Stream,
    policy: str,
    budget_bytes: int,
    *,
    mode: str = "reference",
    allocation: str = "equal",
    seed: int = 0,
    prefetch: bool = False,
    hardware: Hardware | None = None,
    low_bytes: dict[int, int] | None = None,
    upgrade_after: int = 2,
) -> Replay:
    """Replay `trace` through cache policy `policy` under `budget_bytes`. `prefetch` (engine mode)
    also replays the trace's recorded predictor guesses, timed on `hardware`; `low_bytes` (engine
    mode) gives decode misses a miss copy of these expert sizes, upgraded after `upgrade_after` uses."""
    stream = trace if isinstance(trace, Stream) else Stream(trace)
    if lookahead_window(policy) is not None:
        if mode != "reference" or prefetch:
            raise ExpertCacheError(f"{policy}: lookahead (pre-gate) replays run in reference mode, without prefetch")
    elif policy not in POLICIES:
        raise ExpertCacheError(f"unknown cache policy {policy!r}: choose one of {', '.join(POLICIES)} "
                               "(or lookahead-N: the routing of the next N tokens known, as a pre-gate gives it)")
    if budget_bytes <= 0:
        raise BudgetError(f"budget {budget_bytes} must be positive")
    if allocation not in ALLOCATIONS:
        raise ExpertCacheError(f"unknown allocation {allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
    if prefetch:
        if mode != "engine":
            raise ExpertCacheError("prefetch is replayed in engine mode only (the reference accounting has no prefetch)")
        if not stream.has_guesses:
            raise ExpertCacheError("the trace has no recorded prefetch guesses: record it with a --prefetch predictor on")
        if hardware is None:
            raise ExpertCacheError("a prefetch replay needs a hardware profile (its loads are timed)")
    if low_bytes is not None and mode != "engine":
        raise ExpertCacheError("a miss copy is replayed in engine mode only (--mode engine)")
    if mode == "reference":
        return _replay_reference(stream, policy, budget_bytes, allocation, seed)
    if mode == "engine":
        return _replay_engine(stream, policy, budget_bytes, allocation, seed, hardware, prefetch, low_bytes, upgrade_after)
    raise ExpertCacheError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")


def _call_seconds(r: Replay, hw: Hardware, overlap: float) -> list[float]:
    """Modelled seconds of each decode call: the timed replay's own (prefetch), else compute plus
    the call's loads with `overlap` of them hidden (hardware.py's cost model)."""
    if r.decode_seconds is not None:
        return r.decode_seconds
    return [hw.layer_seconds(n, b, overlap) for n, b in r.decode_loads]


def modeled_tpot(r: Replay, stream: Stream, hw: Hardware, overlap: float = 0.0) -> float | None:
    """Modelled seconds per output token of a replay (hardware.py's cost model; a prefetch replay
    is priced on its own timeline, on the profile it ran on)."""
    if not stream.decode_tokens:
        return None
    return sum(_call_seconds(r, hw, overlap)) / stream.decode_tokens


def modeled_token_seconds(r: Replay, stream: Stream, hw: Hardware, overlap: float = 0.0) -> list[float]:
    """Modelled seconds of each decode token (forward), in order."""
    calls = _call_seconds(r, hw, overlap)
    tokens = [s.token for s in stream.steps if s.decode]
    out = [0.0] * (max(tokens) + 1 if tokens else 0)
    for t, sec in zip(tokens, calls):
        out[t] += sec
    return out


def _row(r: Replay, stream: Stream, hw: Hardware, overlap: float) -> dict:
    return {
        "budget_bytes": r.budget_bytes,
        "policy": r.policy,
        "hit_pct": round(r.hit_pct, 4),
        "hit_pct_decode": round(r.hit_pct_decode, 4),
        "bytes_read": r.bytes_read,
        "modeled_tpot_seconds": modeled_tpot(r, stream, hw, overlap),
        "modeled_tpot_median_seconds": _median(modeled_token_seconds(r, stream, hw, overlap)),
        "lookups": r.lookups,
        "hits": r.hits,
        "misses": r.misses,
        **(r.prefetch or {}),
        **(r.miss_copy or {}),
    }


def _median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def simulate(
    trace: Trace,
    budgets: Sequence[int],
    policies: Sequence[str],
    *,
    mode: str = "reference",
    hardware: Hardware,
    overlap: float = 0.0,
    allocation: str = "equal",
    seed: int = 0,
    progress: bool = False,
    prefetch: bool = False,
    miss_copy: str | None = None,
    miss_copy_upgrade: int = 2,
) -> dict:
    """Every (budget, policy) replay, priced on `hardware`, with two bounds: compute only (no
    loads at all) and, per budget, Belady's misses with loads perfectly overlapped. `prefetch`
    (engine mode) replays the trace's recorded guesses on a simulated clock; `miss_copy` (engine
    mode) a precision whose smaller experts decode misses read (`--miss-copy`), upgraded after
    `miss_copy_upgrade` uses as the engine does (2 by default; 0 never)."""
    from tqdm.auto import tqdm

    if not 0.0 <= overlap <= 1.0:
        raise ExpertCacheError(f"overlap must be between 0 and 1, got {overlap}")
    stream = Stream(trace)
    low_bytes = None
    if miss_copy is not None:
        try:
            low_bytes = trace.at_precision(miss_copy).shape.expert_bytes
        except ValueError as e:
            raise ExpertCacheError(f"--miss-copy: {e}") from None
        if any(low_bytes[l] >= b for l, b in trace.shape.expert_bytes.items()):
            raise ExpertCacheError(f"--miss-copy {miss_copy} is not smaller than the trace's experts "
                                   f"({trace.meta.get('precision', 'bfloat16')}): name fewer bits, e.g. int4-g64")
    results, belady = [], {}
    bar = tqdm(total=len(budgets) * len(policies), unit="replay", desc="simulate", disable=not progress)
    for budget in budgets:
        for name in policies:
            r = replay(stream, name, budget, mode=mode, allocation=allocation, seed=seed, prefetch=prefetch, hardware=hardware,
                       low_bytes=low_bytes, upgrade_after=miss_copy_upgrade)
            results.append(_row(r, stream, hardware, overlap))
            if name == "belady" and not prefetch:
                belady[budget] = r
            bar.update(1)
        if budget not in belady:
            belady[budget] = replay(stream, "belady", budget, mode=mode)
    bar.close()
    decode_calls = sum(1 for s in stream.steps if s.decode)
    compute_only = decode_calls * hardware.layer_compute_seconds / stream.decode_tokens if stream.decode_tokens else None
    bounds = {
        "compute_only_tpot_seconds": compute_only,
        "belady_perfect_overlap": [
            {k: v for k, v in _row(belady[b], stream, hardware, 1.0).items() if k != "policy"} for b in budgets
        ],
    }
    return {
        "trace": {"model": trace.shape.model, "layer_calls": len(stream.steps), "decode_tokens": stream.decode_tokens,
                  "total_expert_bytes": trace.shape.total_expert_bytes},
        "mode": mode,
        "allocation": allocation,
        "overlap": overlap,
        "prefetch": "trace" if prefetch else "none",
        "miss_copy": miss_copy,
        "hardware": hardware.to_dict(),
        "results": results,
        "bounds": bounds,
    }


def plot(report: dict, path: str) -> None:
    """Hit rate vs budget, one line per policy (and Belady's bound), as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExpertCacheError("--plot needs matplotlib: pip install matplotlib") from None
    by_policy: dict[str, list[tuple[float, float]]] = OrderedDict()
    for r in report["results"]:
        by_policy.setdefault(r["policy"], []).append((r["budget_bytes"] / MIB, r["hit_pct"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in by_policy.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("expert budget (MiB)")
    ax.set_ylabel("hit rate (% of lookups)")
    ax.set_title(f"{report['mode']} replay of {report['trace']['model']}"[:80], fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as e:
        raise ExpertCacheError(f"cannot write --plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
