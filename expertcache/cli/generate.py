"""expertcache generate: stream text through the offloaded engine, then a one-line summary."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import ExpertCacheError
from .flags import add_engine_arguments, add_prompt_arguments, engine_config, fmt_bytes, generate, prompt_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--trace", dest="future_trace", default=None,
                   help="with --cache-policy belady: a trace of this same run (expertcache trace), Belady's future; "
                        "without it generate runs twice, recording the future first")
    add_prompt_arguments(p, default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (implied by --temperature, --top-p, --seed)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature, >= 0 (default 1; 0 is greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print {text, token_ids, stats} as JSON")


def summary(stats: dict) -> str:
    hr = f"{100 * stats['hit_rate']:.1f}%" if stats.get("hit_rate") is not None else "-"
    tpot = f"{1000 * stats['tpot_seconds']:.1f} ms" if stats.get("tpot_seconds") else "-"
    ttft = f"{stats['ttft_seconds']:.2f} s" if stats.get("ttft_seconds") is not None else "-"
    return (
        f"[expertcache] {stats['tokens']} tokens | TTFT {ttft} | TPOT {tpot} | hits {hr} "
        f"({stats['hits']}/{stats['lookups']}) | read {fmt_bytes(stats['bytes_read'])} | "
        f"stall {stats['stall_seconds']:.2f} s | prefetch used {stats['prefetch_used']}/{stats['prefetch_issued']} | "
        f"peak RSS {fmt_bytes(stats['peak_rss_bytes'])}"
        + (f" | experts {fmt_bytes(stats['budget_bytes'])} of a {fmt_bytes(plan['limit_bytes'])} limit"
           if (plan := stats.get("memory_plan")) else "")
        + (f" | on the {copy['precision']} miss copy {stats['low_uses']}/{stats['lookups']}, upgraded {stats['upgrades']}"
           if (copy := stats.get("miss_copy")) else "")
    )


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine, check_sampling

    if args.max_new_tokens < 1:
        raise ExpertCacheError("--max-new-tokens must be at least 1")
    # any sampling flag means sampling; the values follow the API's rules (engine.check_sampling)
    greedy = not (args.sample or any(v is not None for v in (args.temperature, args.top_p, args.seed)))
    temperature = 1.0 if args.temperature is None else args.temperature
    top_p = 1.0 if args.top_p is None else args.top_p
    check_sampling(temperature=temperature, top_p=top_p, seed=args.seed)
    prompt = prompt_of(args)
    if not args.json and sys.stderr.isatty():  # loading takes seconds: say so on a terminal
        print(f"[expertcache] loading {args.model or 'the demo model'} ...", file=sys.stderr, flush=True)
    with Engine(engine_config(args)) as engine:
        streamed: list[int] = []
        shown = [0]

        def stream(tok: int) -> None:
            streamed.append(tok)
            if engine.tokenizer is None:
                return
            text = engine.tokenizer.decode(streamed)
            sys.stdout.write(text[shown[0] :])
            sys.stdout.flush()
            shown[0] = len(text)

        if not args.json and engine.tokenizer is not None and isinstance(prompt, str):
            sys.stdout.write(prompt)
        result = generate(
            engine, prompt, args.future_trace, max_new_tokens=args.max_new_tokens, greedy=greedy,
            temperature=temperature, top_p=top_p, seed=args.seed, on_token=None if args.json else stream,
        )  # fmt: skip
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats}))
    else:
        if engine.tokenizer is None:
            print(" ".join(map(str, result.token_ids)), end="")
        print()
        print(summary(result.stats), file=sys.stderr if os.environ.get("EXPERTCACHE_SUMMARY_STDERR") else sys.stdout)
    return 0
