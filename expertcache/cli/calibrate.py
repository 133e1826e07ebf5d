"""expertcache calibrate: measure per-layer routing sensitivity and write adaptive-gating thresholds."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ..config import CALIBRATION_FILE
from ..errors import ExpertCacheError
from ..tools.settings import DEFAULT_TARGET_DROP
from .flags import add_engine_arguments, engine_config, output_path, written


def fraction(text: str) -> float:
    """'0.2' or '20%' -> 0.2."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.2) or a percentage (20%), got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p, expert_budget="100%", prefetch="none")
    p.add_argument("--text", type=Path, required=True, help="calibration text (held out from what you evaluate on)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target-drop", type=fraction, default=None,
                      help=f"share of expert activations to drop, e.g. 0.25 or 25%% (default {DEFAULT_TARGET_DROP:g})")
    goal.add_argument("--max-ppl-increase", type=fraction, default=None,
                      help="drop as much as keeps perplexity within this relative increase, e.g. 0.01 or 1%%")
    p.add_argument("--out", type=Path, default=None, help=f"where to write the thresholds (default: MODEL/{CALIBRATION_FILE})")
    p.add_argument("--max-tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--window", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--json", action="store_true", help="print the written record as JSON")


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine, demo_model_dir
    from ..tools.calibration import calibrate, read_ids, write_calibration

    if args.window < 2:
        raise ExpertCacheError(f"--window must be at least 2, got {args.window}")
    t0 = time.perf_counter()
    model_dir = Path(args.model) if args.model is not None else demo_model_dir()
    out = output_path(args.out if args.out is not None else model_dir / CALIBRATION_FILE, "--out")
    with Engine(engine_config(args)) as engine:
        ids = read_ids(engine, args.text, args.max_tokens)
        if len(ids) < 2:
            raise ExpertCacheError(f"{args.text}: fewer than 2 tokens")
        result = calibrate(engine, ids, target_drop=args.target_drop, max_ppl_increase=args.max_ppl_increase,
                           window=args.window, calibration_text=str(args.text), progress=not args.json)
    record = result.record
    with written(out, "--out") as tmp:
        write_calibration(tmp, record)
    if args.json:
        print(json.dumps(record))
        return 0
    base, ppl = result.perplexity_exact, result.perplexity
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s, {result.tokens} tokens)")
    print(f"c = {result.c:.4g}: drops {100 * result.dropped:.1f}% of expert activations, perplexity {base:.3f} -> {ppl:.3f} "
          f"({100 * (ppl / base - 1):+.2f}%) on the calibration text")
    for l, v in record["layers"].items():
        t = v["threshold"]
        print(f"  layer {l:>3}: fisher {v['fisher']:.3e}  threshold {t:.3f}" if math.isfinite(t) else f"  layer {l:>3}: threshold inf")
    return 0
