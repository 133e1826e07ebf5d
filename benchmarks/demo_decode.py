#!/usr/bin/env python
"""The demo model's decode step with every expert resident, for this checkout and others, in one
run: each version in its own subprocess (PYTHONPATH at its root), rounds interleaved, 1 thread.

    git worktree add /tmp/before <commit>
    python benchmarks/demo_decode.py --versions /tmp/before [--rounds 5] [--tokens 64] [--out results/demo-decode]

Each worker loads the bundled demo model at a 100 % expert budget, warms up, then generates
`--tokens` greedy tokens after a fixed prompt three times and reports the median step time (TPOT)
and the tokens (they must agree across versions: the decode step is exact). Writes
demo_decode.json and demo_decode.md with each version's median TPOT over rounds, its spread, and
its ratio to this checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quantized import write_report  # noqa: E402

PROMPT = "Once upon a time there was a little girl who"

WORKER = """
import json, sys
import expertcache
tokens = int(sys.argv[1])
engine = expertcache.load(None, expert_budget="100%")
engine.generate({prompt!r}, max_new_tokens=16, stop_at_eos=False)
runs = [engine.generate({prompt!r}, max_new_tokens=tokens, stop_at_eos=False) for _ in range(3)]
tpots = sorted(r.stats["tpot_seconds"] for r in runs)
print(json.dumps({{"tpot_ms": 1e3 * tpots[1], "tokens": runs[0].token_ids, "decode_step": runs[0].stats.get("decode_step"),
                  "half_kernel": runs[0].stats.get("half_kernel")}}))
""".format(prompt=PROMPT)


def _env(root: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EXPERTCACHE_THREADS="1",
                TOKENIZERS_PARALLELISM="false")


def run(root: Path, tokens: int) -> dict:
    p = subprocess.run([sys.executable, "-c", WORKER, str(tokens)], env=_env(root), cwd=root, capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"{root}: the worker failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def markdown(rep: dict) -> str:
    here = statistics.median(rep["versions"][str(REPO)]["tpot_ms"])
    lines = [f"Demo model, every expert resident, {rep['tokens']} greedy tokens, 1 thread, {rep['rounds']} rounds interleaved "
             f"(median of 3 generations a round).", "",
             "| version | TPOT ms, median (min-max) | ratio to this checkout | decode step | same tokens |", "|---|---:|---:|---|---|"]
    for root, v in rep["versions"].items():
        t = v["tpot_ms"]
        lines.append(f"| `{root}` | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | {statistics.median(t) / here:.2f} | "
                     f"{v['decode_step']} | {v['same_tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", default="", help="comma-separated roots of other checkouts (their own expertcache/)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "results" / "demo-decode"))
    args = ap.parse_args(argv)
    roots = [str(REPO)] + [str(Path(r).resolve()) for r in args.versions.split(",") if r]
    versions = {r: {"tpot_ms": [], "tokens": None, "decode_step": None, "same_tokens": True} for r in roots}
    for rnd in range(args.rounds):
        for root in roots if rnd % 2 == 0 else roots[::-1]:
            r = run(Path(root), args.tokens)
            v = versions[root]
            v["tpot_ms"].append(r["tpot_ms"])
            v["decode_step"] = r.get("decode_step") or "transformers"
            v["tokens"] = v["tokens"] or r["tokens"]
            v["same_tokens"] = v["same_tokens"] and r["tokens"] == versions[roots[0]]["tokens"]
            print(f"round {rnd} {root}: {r['tpot_ms']:.2f} ms", flush=True)
    rep = {"tokens": args.tokens, "rounds": args.rounds, "prompt": PROMPT, "versions": versions}
    write_report(Path(args.out), "demo_decode", rep, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
