"""expertcache info: a checkpoint's experts, bytes and minimum budget."""

from __future__ import annotations

import argparse
import json

from .flags import fmt_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--families", action="store_true", help="list the model families expertcache runs, and their quirks")
    p.add_argument("--check", action="store_true",
                   help="also build transformers' model from config.json and check every tensor against it, as "
                        "loading does (a few seconds: imports torch); without it the figures come from config.json "
                        "and the safetensors headers")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from ..tools.info import families, model_info

    if args.families:
        rows = families()
        if args.json:
            print(json.dumps(rows))
        for r in [] if args.json else rows:
            print(f"{r['model_type']:<12} {r['quirks']}" + ("" if r["lossy_routing"] else " (exact routing only)"))
        return 0
    info = model_info(args.model, check=args.check)  # an unsupported directory: one line on what keeps it from running
    if args.json:
        print(json.dumps(info))
        return 0
    total = info["total_expert_bytes"]
    weights = {True: ", renormalised", False: "", None: ", non-softmax router"}[info["renormalize"]]
    rows = [
        ("supported", "yes"),
        ("family", info["family"]),
        ("layers (sparse)", f"{info['layers']} ({info['sparse_layers']})"),
        ("experts per layer, top-k", f"{info['experts_per_layer']}, top-{info['top_k']}{weights}"),
        ("expert layout, dtype", f"{info['expert_layout']}, {info['dtype']}"
                                 + (f" ({info['expert_precision']} experts)" if info["expert_precision"] != info["dtype"] else "")),
        ("bytes per expert", fmt_bytes(info["bytes_per_expert"])),
        ("dense bytes", fmt_bytes(info["dense_bytes"])),
        ("all expert bytes", fmt_bytes(total)),
        ("minimum budget", f"{fmt_bytes(info['min_budget_bytes'])} ({100 * info['min_budget_bytes'] / total:.2f}%)"),
        ("one token cycle", f"{fmt_bytes(info['token_cycle_bytes'])} ({100 * info['token_cycle_bytes'] / total:.1f}%)"),
        ("checked against", {"headers": "config.json and the safetensors headers (--check: transformers' model too)",
                             "model": "transformers' model built from config.json"}[info["checked"]]),
    ]
    for k, v in rows:
        print(f"{k:<26} {v}")
    print(
        f"advice: budgets below one token cycle ({fmt_bytes(info['token_cycle_bytes'])}) stream most experts every "
        "token; a frequency-aware policy (lfu, the default) keeps the hot experts resident where a global LRU falls to 0% hits"
    )
    return 0
