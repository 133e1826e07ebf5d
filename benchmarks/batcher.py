#!/usr/bin/env python
"""The continuous batcher alone, in one process (no HTTP, no client processes): where a server's
throughput goes.

    python benchmarks/batcher.py [--model DIR] [--budget 50%] [--clients 1,16] [--waits 0,100,200]
                                 [--requests 4] [--tokens 32] [--stagger 2] [--out results/batcher]

Each of N clients sends `--requests` requests of `--tokens` greedy tokens, one after the other (a
new one as soon as its last ends), on benchmarks/serve.py's prompts (~40-word passages of the
shared corpus, chosen per client and request as serve.py chooses them); client i starts `--stagger` steps after client i-1, so they run
out of step as real clients do (0: all start and end together, their prompts going in as one
forward). Per (clients, --prefill-wait in ms): tokens/s, x1 (over one client's at the same wait),
turns, how many of them fed a prompt and what those cost, mean batch. Writes OUT/batcher.json and
OUT/batcher.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def run(engine, prompts: list[list[list[int]]], clients: int, wait_ms: float, requests: int, tokens: int, stagger: int) -> dict:
    from expertcache.serve.batcher import Batcher, Request
    from serve import client_prompt

    b = Batcher(engine, max_batch=16, prefill_chunk=128, prefill_wait=wait_ms / 1000)
    b.eos = set()
    sent, done, steps = {i: 0 for i in range(clients)}, [], []
    b.on_step = steps.append

    def submit(i: int) -> None:
        if sent[i] < requests:
            prompt = client_prompt(prompts, i, sent[i])  # as serve.py's clients choose them
            sent[i] += 1
            b.submit(Request(prompt=prompt, max_tokens=tokens,
                             emit=lambda t, finish, i=i: finish is not None and done.append(i)))  # fmt: skip

    started, turns = 0, 0
    t0 = time.perf_counter()
    while started < clients or not b.idle():
        while started < clients and turns >= started * stagger:
            submit(started)
            started += 1
        b.turn()
        turns += 1
        while done:
            submit(done.pop())
    seconds = time.perf_counter() - t0
    fed = [s for s in steps if s["prefill_tokens"]]
    plain = [s for s in steps if not s["prefill_tokens"] and s["batch"]]
    return {"clients": clients, "wait_ms": wait_ms, "seconds": seconds, "tokens": clients * requests * tokens,
            "tokens_per_s": clients * requests * tokens / seconds, "turns": len(steps), "prompt_turns": len(fed),
            "prompt_turn_ms": 1e3 * statistics.mean(s["seconds"] for s in fed) if fed else None,
            "decode_turn_ms": 1e3 * statistics.mean(s["seconds"] for s in plain) if plain else None,
            "mean_batch": statistics.mean(s["batch"] for s in steps) if steps else 0.0}  # fmt: skip


def markdown(rep: dict) -> str:
    base = {r["wait_ms"]: r["tokens_per_s"] for r in rep["runs"] if r["clients"] == 1}
    lines = [f"Batcher alone (`python benchmarks/batcher.py`): {Path(rep['model']).name}, budget {rep['budget']}, {rep['requests']} requests "
             f"of {rep['tokens']} tokens per client, clients {rep['stagger']} steps apart, half_matmul {rep.get('half_matmul', 'exact')}, 1 thread.", "",
             "| clients | --prefill-wait ms | tokens/s | x1 | turns | turns with a prompt | ms, a turn with a prompt | ms, a decode turn | mean batch |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rep["runs"]:
        x1 = r["tokens_per_s"] / base[r["wait_ms"]] if r["wait_ms"] in base else None
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {r['clients']} | {r['wait_ms']:g} | {r['tokens_per_s']:.0f} | {f(x1)} | {r['turns']} | {r['prompt_turns']} | "
                     f"{f(r['prompt_turn_ms'])} | {f(r['decode_turn_ms'])} | {r['mean_batch']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "expertcache" / "demo"))
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--waits", default="0,100,200", help="--prefill-wait values, milliseconds")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--stagger", type=int, default=2, help="steps between one client's start and the next's")
    ap.add_argument("--half-matmul", default="exact", choices=("exact", "float32"), help="the engine's half_matmul")
    ap.add_argument("--out", default=str(REPO / "results" / "batcher"))
    args = ap.parse_args(argv)

    import torch

    import expertcache

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = {"model": args.model, "budget": args.budget, "requests": args.requests, "tokens": args.tokens, "stagger": args.stagger,
           "half_matmul": args.half_matmul, "runs": []}
    with expertcache.load(args.model, expert_budget=args.budget, half_matmul=args.half_matmul) as eng:
        from serve import demo_prompts

        prompts = [[eng.tokenizer.encode(text) for text in source] for source in demo_prompts()]
        run(eng, prompts, 2, 0, 1, 4, 0)  # warm-up
        for wait in (float(w) for w in args.waits.split(",")):
            for clients in (int(c) for c in args.clients.split(",")):
                r = run(eng, prompts, clients, wait, args.requests, args.tokens, args.stagger)
                print(json.dumps(r), flush=True)
                rep["runs"].append(r)
    (out / "batcher.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "batcher.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
