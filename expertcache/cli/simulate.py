"""expertcache simulate: replay a routing trace through the cache policies with a cost model."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import parse_budget
from ..errors import ExpertCacheError
from ..policies import POLICIES, lookahead_window
from ..sim.hardware import HARDWARE_NAMES
from ..sim.simulate import ALLOCATIONS, DEFAULT_POLICIES, MODES, plot, simulate
from ..sim.trace import Trace
from .flags import fmt_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="trace file: an expertcache .npz or a reference route.csv")
    p.add_argument("--budget", required=True, help="expert budget(s), comma-separated: 10%%, 2GiB, 250MiB or bytes")
    p.add_argument("--policy", default=",".join(DEFAULT_POLICIES), help=f"cache policies, comma-separated (default {','.join(DEFAULT_POLICIES)}); lookahead-N "
                        "replays a pre-gate (the next N tokens' routing known to eviction)")
    p.add_argument("--mode", default="reference", choices=MODES, help="reference (byte budget, evict after each call) or engine (the engine's slots)")
    p.add_argument("--allocation", default="equal", choices=ALLOCATIONS, help="per-layer shares of partitioned policies: equal, or AdapMoE's dp")
    p.add_argument("--hardware", default="nvme4", help=f"cost model: {', '.join(HARDWARE_NAMES)} (default nvme4)")
    p.add_argument("--model", default=None, help="checkpoint to calibrate --hardware measured on (default: the bundled demo)")
    p.add_argument("--layer-compute-ms", type=float, default=None, help="override the profile's per-layer decode compute time")
    p.add_argument("--overlap", type=float, default=0.0, help="share of loads hidden behind compute, 0 (demand loading, default) to 1")
    p.add_argument("--prefetch", default="none", choices=["none", "trace"],
                   help="trace: replay the predictor guesses recorded in the trace, timed on --hardware (engine mode; --overlap does not apply)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    p.add_argument("--precision", default=None,
                   help="price the experts as stored at this precision: bfloat16, float16, float32, int8-channel, "
                        "int4-g32/g64/g128, mxfp4 (default: as the trace was recorded; a trace without one is 16-bit)")
    p.add_argument("--miss-copy", default=None, metavar="PRECISION",
                   help="engine mode: decode misses and guesses read a copy of the experts at this smaller precision (e.g. int4-g64), "
                        "upgraded to the full one after a second use, as `generate --miss-copy DIR` runs")
    p.add_argument("--miss-copy-upgrade", type=int, default=2, metavar="N",
                   help="with --miss-copy: uses of a miss copy's expert after which the full one is read (default 2; 0 never)")
    p.add_argument("--plot", default=None, help="write hit rate vs budget, one line per policy, to this PNG")
    p.add_argument("--json", action="store_true", help="print {results, bounds} as JSON")


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    from ..sim.measure import get_hardware  # the "measured" profile runs an engine

    trace = Trace.load(args.trace)
    if args.precision is not None:
        try:
            trace = trace.at_precision(args.precision)
        except ValueError as e:
            raise ExpertCacheError(f"--precision: {e}") from None
    policies = _split(args.policy)
    for name in policies:
        if name not in POLICIES and lookahead_window(name) is None:
            raise ExpertCacheError(f"unknown cache policy {name!r}: choose one of {', '.join(POLICIES)}")
    budgets = [parse_budget(b, trace.shape.total_expert_bytes) for b in _split(args.budget)]
    if not budgets or not policies:
        raise ExpertCacheError("give at least one --budget and one --policy")
    if args.miss_copy_upgrade < 0:
        raise ExpertCacheError(f"--miss-copy-upgrade must be at least 0, got {args.miss_copy_upgrade}")
    hw = get_hardware(args.hardware, model=args.model)
    if args.layer_compute_ms is not None:
        if args.layer_compute_ms < 0:
            raise ExpertCacheError("--layer-compute-ms must not be negative")
        hw = hw.with_compute(args.layer_compute_ms / 1000)
    report = simulate(trace, budgets, policies, mode=args.mode, hardware=hw, overlap=args.overlap,
                      allocation=args.allocation, seed=args.seed, progress=sys.stderr.isatty(),
                      prefetch=args.prefetch == "trace", miss_copy=args.miss_copy, miss_copy_upgrade=args.miss_copy_upgrade)
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1000 * s:.2f}"


def _print(report: dict) -> None:
    hw = report["hardware"]
    t = report["trace"]
    print(f"trace   {t['model']}: {t['layer_calls']} layer calls, {t['decode_tokens']} decode tokens")
    how = "recorded prefetch guesses, timed" if report.get("prefetch") == "trace" else f"overlap {report['overlap']:g}"
    print(f"model   {report['mode']} accounting, {report['allocation']} allocation; {hw['name']}: {hw['description']}; {how}")
    low = report.get("miss_copy") is not None
    if low:
        print(f"miss copy {report['miss_copy']}: decode misses read it; 'on copy': share of lookups computed on it")
    print(f"{'budget':>12} {'policy':>10} {'hit%':>7} {'decode%':>8} {'read':>11} {'TPOT ms':>9}" + (f" {'on copy':>8}" if low else ""))
    for r in report["results"]:
        print(f"{fmt_bytes(r['budget_bytes']):>12} {r['policy']:>10} {r['hit_pct']:>7.2f} {r['hit_pct_decode']:>8.2f} "
              f"{fmt_bytes(r['bytes_read']):>11} {_ms(r['modeled_tpot_seconds']):>9}"
              + (f" {100 * r['low_share']:>7.1f}%" if low else ""))
    b = report["bounds"]
    print(f"bound   compute only: TPOT {_ms(b['compute_only_tpot_seconds'])} ms")
    for r in b["belady_perfect_overlap"]:
        print(f"bound   belady, perfect overlap @ {fmt_bytes(r['budget_bytes'])}: decode hit {r['hit_pct_decode']:.2f}%, "
              f"TPOT {_ms(r['modeled_tpot_seconds'])} ms")
