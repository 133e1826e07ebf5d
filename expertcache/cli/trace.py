"""expertcache trace: record the routing of a generation into a trace file."""

from __future__ import annotations

import argparse

from ..errors import ExpertCacheError
from .flags import add_engine_arguments, add_prompt_arguments, engine_config, generate, output_path, prompt_of, written


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--trace", dest="future_trace", default=None,
                   help="with --cache-policy belady: a trace of this same run, Belady's future")
    add_prompt_arguments(p, text=True)
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate after the prompt (default 32)")
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    p.add_argument("--logits", action="store_true", help="also record router logits")
    p.add_argument("--hidden-states", action="store_true", help="also record router logits and MoE-input hidden states (for training predictors)")


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine
    from ..sim.recorder import Recorder

    if args.max_new_tokens < 1:
        raise ExpertCacheError("--max-new-tokens must be at least 1")
    prompt = prompt_of(args)
    out = output_path(args.out, "--out")
    with Engine(engine_config(args)) as engine:
        with Recorder(engine, logits=args.logits or args.hidden_states, hidden_states=args.hidden_states) as rec:
            result = generate(engine, prompt, args.future_trace, max_new_tokens=args.max_new_tokens)
        stats = result.stats
        rec.trace.meta["run"] = {k: stats[k] for k in ("lookups", "hits", "misses", "bytes_read", "tokens")}
        with written(out, "--out") as tmp:
            rec.trace.save(tmp)
    n_pre = sum(1 for r in rec.trace.routes if not r.decode)
    print(
        f"wrote {out}: {len(rec.trace.routes)} layer calls ({n_pre} prefill, {len(rec.trace.routes) - n_pre} decode), "
        f"{stats['tokens']} tokens generated, hits {stats['hits']}/{stats['lookups']}"
    )
    return 0
