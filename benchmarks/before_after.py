#!/usr/bin/env python
"""Behaviour before and after a change, measured in one run: the decode benchmark's paired ratio
(next-gate / none, both engines in one process, one step each in turn) and the demo model's
perplexity and multiple-choice accuracy, for this checkout and another one, rounds interleaved.

    git worktree add /tmp/before <commit>     # or: git archive <commit> | tar -x -C /tmp/before
    python benchmarks/before_after.py --before /tmp/before [--rounds 3] [--tokens 96] [--out results/before_after]

Each version runs in its own subprocesses with PYTHONPATH at its own root, through its own
benchmarks/decode.py worker and its own `python -m expertcache eval`; the 1 GB checkpoint is built
once (tests/helpers/synthetic.py) and shared. Writes before_after.json and before_after.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

sys.path.insert(0, str(REPO / "benchmarks"))

from helpers.synthetic import CkptSpec, build_checkpoint  # noqa: E402
from quantized import write_report  # noqa: E402


def _env(root: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                MKL_NUM_THREADS="1", EXPERTCACHE_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _run(root: Path, args: list[str], timeout: float = 3600) -> dict:
    p = subprocess.run([sys.executable, *args], env=_env(root), cwd=root, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{root}: {args[:3]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def paired(root: Path, ckpt: Path, budget: str, tokens: int, warmup: int) -> dict:
    args = {"ckpt": str(ckpt), "budget": budget, "tokens": tokens, "warmup": warmup}
    return _run(root, [str(root / "benchmarks" / "decode.py"), "--paired-worker", json.dumps(args)])


def quality(root: Path, text: Path, mc: Path, max_tokens: int, limit: int) -> dict:
    ppl = _run(root, ["-m", "expertcache", "eval", "--text", str(text), "--max-tokens", str(max_tokens), "--json"])
    acc = _run(root, ["-m", "expertcache", "eval", "--mc", str(mc), "--limit", str(limit), "--json"])
    return {"perplexity": ppl["perplexity"], "tokens": ppl["tokens"], "accuracy": acc["accuracy"], "items": acc["items"]}


@dataclass
class Version:
    root: str
    ratios: list[float] = field(default_factory=list)  # next-gate / none TPOT per round (paired)
    step_ratios: list[float] = field(default_factory=list)  # median of per-step ratios per round
    tpot_none_ms: list[float] = field(default_factory=list)
    tpot_next_gate_ms: list[float] = field(default_factory=list)
    same_tokens: list[bool] = field(default_factory=list)
    quality: dict = field(default_factory=dict)


def markdown(rep: dict) -> str:
    b, a = rep["before"], rep["after"]
    med = statistics.median
    lines = [
        f"Paired decode at {rep['budget']} on the 1 GB checkpoint ({rep['tokens']} tokens, {rep['rounds']} rounds, "
        f"versions interleaved); demo quality on {a['quality']['tokens']} tokens and {a['quality']['items']} items.",
        "",
        "| version | next-gate / none (median of rounds) | rounds | none TPOT ms | next-gate TPOT ms | perplexity | accuracy |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, v in (("before", b), ("after", a)):
        lines.append(
            f"| {name} (`{v['root']}`) | {med(v['ratios']):.3f} | {', '.join(f'{r:.3f}' for r in v['ratios'])} | "
            f"{med(v['tpot_none_ms']):.1f} | {med(v['tpot_next_gate_ms']):.1f} | {v['quality']['perplexity']:.4f} | "
            f"{100 * v['quality']['accuracy']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="root of the other checkout (its own benchmarks/ and expertcache/)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--data", default=os.environ.get("EXPERTCACHE_DATA", str(REPO.parent / "shared")))
    ap.add_argument("--max-tokens", type=int, default=4000, help="perplexity tokens of the TinyStories validation text")
    ap.add_argument("--limit", type=int, default=300, help="multiple-choice items")
    ap.add_argument("--out", default=str(REPO / "results" / "before_after"))
    args = ap.parse_args(argv)

    data = Path(args.data)
    text = data / "corpus" / "tinystories" / "tinystories_valid_cased.txt"
    mc = data / "corpus" / "eval" / "tinystories_valid_lastword_mc.jsonl"
    ckpt = build_checkpoint(None, CkptSpec())
    versions = {"before": Version(str(Path(args.before).resolve())), "after": Version(str(REPO))}
    for name, v in versions.items():
        v.quality = quality(Path(v.root), text, mc, args.max_tokens, args.limit)
        print(f"{name}: perplexity {v.quality['perplexity']:.4f}, accuracy {v.quality['accuracy']:.4f}", flush=True)
    for rnd in range(args.rounds):
        order = ("before", "after") if rnd % 2 == 0 else ("after", "before")
        for name in order:
            v = versions[name]
            r = paired(Path(v.root), ckpt, args.budget, args.tokens, args.warmup)
            v.ratios.append(r["ratio_vs_none"]["next-gate"])
            v.step_ratios.append(r["step_ratio_median_vs_none"]["next-gate"])
            v.tpot_none_ms.append(r["tpot_ms"]["none"])
            v.tpot_next_gate_ms.append(r["tpot_ms"]["next-gate"])
            v.same_tokens.append(r["same_tokens"])
            print(f"round {rnd} {name}: none {r['tpot_ms']['none']:.1f} ms, next-gate {r['tpot_ms']['next-gate']:.1f} ms, "
                  f"ratio {v.ratios[-1]:.3f}", flush=True)
    rep = {"budget": args.budget, "tokens": args.tokens, "rounds": args.rounds,
           **{name: asdict(v) for name, v in versions.items()}}
    write_report(Path(args.out), "before_after", rep, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
