"""expertcache eval: perplexity of a text or multiple-choice accuracy through the offloaded engine."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .flags import add_engine_arguments, engine_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, help="text file: token-level perplexity")
    src.add_argument("--mc", type=Path, help="jsonl of {context, choices, label}: multiple-choice accuracy")
    p.add_argument("--window", type=int, default=256, help="perplexity window in tokens (default 256)")
    p.add_argument("--stride", type=int, default=128, help="window advance in tokens (default 128)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens of --text")
    p.add_argument("--limit", type=int, default=None, help="use at most this many --mc items")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine
    from ..tools.quality import evaluate

    with Engine(engine_config(args)) as engine:
        result = evaluate(engine, text=args.text, mc=args.mc, window=args.window, stride=args.stride,
                          max_tokens=args.max_tokens, limit=args.limit, progress=not args.json)
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    if result.perplexity is not None:
        print(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens (window {result.window}, stride {result.stride})")
    else:
        print(f"accuracy {100 * result.accuracy:.1f}% over {result.items} items")
    print(f"experts/token {result.experts_per_token:.2f} | misses/token {result.misses_per_token:.3f} | "
          f"bytes read/token {result.bytes_read_per_token / 1e6:.2f} MB")
    busy = result.busiest_expert_share
    if busy:
        print(f"busiest expert's share of a layer's activations: {100 * min(busy):.1f}-{100 * max(busy):.1f}% over the "
              f"sparse layers ({100 / engine.checkpoint.num_experts:.1f}% is even)")
    return 0
