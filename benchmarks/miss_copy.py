#!/usr/bin/env python
"""Mixed precision on miss (`--miss-copy`, after HOBBIT): speed and bytes on the 1 GB checkpoint,
quality on the demo model; the same run, engines stepped in turn.

    python benchmarks/miss_copy.py [--out results/miss-copy] [--tokens N] [--budgets 25,50] [--skip-quality] [--quick]

- speed and bytes: benchmarks/decode.py's synthetic Mixtral checkpoint (64 experts of 17.3 MB
  bf16) and its int4-g64 copy by `expertcache quantize` (cached beside it, as benchmarks/quantized.py
  caches it). One subprocess per budget (a share of the bf16 experts' bytes) holds the engines:
  bf16 alone; bf16 with the int4 copy as its miss copy (demand misses alone read it,
  --miss-copy-reads misses; misses and guesses, the default, upgraded after a second use, and
  never upgraded); int8 alone at the same bytes (the all-lossy alternative: every expert smaller,
  so more of them fit). Prefetch next-gate (the default), 1 thread, O_DIRECT. They step
  in turn, one decode step each, order alternating (decode.step_in_turn: a step is charged the
  reads it leaves in flight, upgrades included); each samples its own tokens (temperature 1,
  fixed seed). TPOT is the median step; the ratio the median of per-step ratios against bf16.
  From each engine's counters: hit rate, MB read per token, the share of expert calls computed
  on the miss copy, upgrades per token.
- quality: the demo model and its int4-g64 copy, `expertcache tradeoff`'s decode-mode perplexity
  (TinyStories validation) and last-word accuracy at each budget: exact against the miss copy
  (misses only; the default, misses and guesses; never upgraded, the bound where every read stays int4).
Writes miss_copy.json, miss_copy.md and miss_copy.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def checkpoints(root: str | None) -> dict[str, str]:
    """The 1 GB checkpoint and its quantized copies (benchmarks/quantized.py builds and caches them)."""
    import quantized

    return {k: str(v) for k, v in quantized.checkpoints(root).items()}


def engines_for(ckpts: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """label -> (checkpoint, engine options)."""
    low = ckpts["int4-g64"]
    return {
        "bf16": (ckpts["bf16"], {}),
        "bf16 + int4 miss copy, misses only": (ckpts["bf16"], {"miss_copy": low, "miss_copy_reads": "misses"}),
        "bf16 + int4 miss copy": (ckpts["bf16"], {"miss_copy": low}),
        "bf16 + int4 miss copy, no upgrade": (ckpts["bf16"], {"miss_copy": low, "miss_copy_upgrade": 0}),
        "int8": (ckpts["int8"], {}),
    }


def paired(ckpts: dict[str, str], budget_bytes: int, tokens: int, warmup: int = 8) -> dict:
    import torch

    torch.set_num_threads(1)
    import expertcache
    from decode import COUNTERS, drain, step_in_turn
    from helpers.synthetic import CkptSpec, prompt_ids

    spec = CkptSpec(**json.loads((Path(ckpts["bf16"]) / "spec.json").read_text()))
    prompt = prompt_ids(spec)
    engines = {}
    for label, (path, opts) in engines_for(ckpts).items():
        engines[label] = e = expertcache.load(path, expert_budget=budget_bytes, prefetch="next-gate", io="direct",
                                              num_threads=1, **opts)
        e.generate(prompt_ids(spec, 8, seed=99), max_new_tokens=warmup, stop_at_eos=False, greedy=False, seed=1)
        drain(e)
        e.reset_stats()
    st = step_in_turn(engines, prompt, tokens)
    counters = (*COUNTERS, "low_loads", "low_uses", "upgrades", "upgrades_cancelled")
    out = {"budget_bytes": budget_bytes, "tokens": tokens, "engines": {}}
    for label, e in engines.items():
        s = e.stats()
        dec = {k: s[k] - st[label]["first"][k] for k in counters}
        n = len(st[label]["times"])
        out["engines"][label] = {
            "tpot_ms": 1e3 * statistics.median(st[label]["times"]),
            "ratio_vs_bf16": statistics.median(a / b for a, b in zip(st[label]["times"], st["bf16"]["times"])),
            "hit_rate": dec["hits"] / dec["lookups"] if dec["lookups"] else None,
            "mb_read_per_token": dec["bytes_read"] / n / 1e6,
            "stall_ms_per_token": 1e3 * dec["stall_seconds"] / n,
            "low_share": dec["low_uses"] / dec["lookups"] if dec["lookups"] else 0.0,
            "upgrades_per_token": dec["upgrades"] / n,
            "upgrades_cancelled_per_token": dec["upgrades_cancelled"] / n,
            "cache_slots": e.cache.capacity,
            "expert_bytes": e.checkpoint.expert_bytes,
        }
        e.close()
    return out


def quality(budgets: list[int], max_tokens: int, limit: int) -> list[dict]:
    """tradeoff's decode-mode figures on the demo model: exact against its int4-g64 miss copy."""
    from dataclasses import asdict

    from expertcache.config import EngineConfig
    from expertcache.demo.corpus import LASTWORD_MC, TINYSTORIES_VALID, corpus_path
    from expertcache.engine import demo_model_dir
    from expertcache.tools.quantize import quantize_checkpoint
    from expertcache.tools.tradeoff import tradeoff

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        low = Path(tmp) / "demo-int4-g64"
        quantize_checkpoint(demo_model_dir(), low, bits=4, group_size=64, dense="keep", progress=False)
        for budget in budgets:
            rows = {}
            for label, reads, upgrade in (("miss copy, misses only", "misses", 2), ("miss copy", "all", 2),
                                          ("miss copy, no upgrade", "all", 0)):
                cfg = EngineConfig(expert_budget=f"{budget}%", num_threads=1, miss_copy=str(low), miss_copy_reads=reads,
                                   miss_copy_upgrade=upgrade)
                res = tradeoff(cfg, text=corpus_path(TINYSTORIES_VALID), mc=corpus_path(LASTWORD_MC), out_dir=Path(tmp) / "t",
                               max_tokens=max_tokens, limit=limit, policies=["exact"], progress=False)
                for r in res.rows:  # exact runs beside each: the first is the table's, the others its spread
                    if r.policy == "exact":
                        rows.setdefault("exact", asdict(r))
                        rows.setdefault("exact runs", []).append(r.perplexity)
                    else:
                        rows[label] = asdict(r)
            out.append({"budget": budget, "rows": rows, "tokens": max_tokens, "items": limit})
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def _spawn(args: list[str]) -> dict:
    import quantized

    return quantized._spawn(args, script=__file__)


def markdown(rep: dict) -> str:
    lines = ["# Mixed precision on miss", "", f"`python benchmarks/miss_copy.py` ({rep['when']}; 1 thread, O_DIRECT, prefetch next-gate)", ""]
    for r in rep["speed"]:
        lines += [f"## 1 GB checkpoint, budget {r['label']} ({r['tokens']} tokens, paired steps)", "",
                  "| engine | slots | TPOT ms | vs bf16 | hit rate | MB read/token | stall ms/token | on miss copy | upgrades/token |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, e in r["engines"].items():
            lines.append(f"| {label} | {e['cache_slots']} | {e['tpot_ms']:.1f} | {e['ratio_vs_bf16']:.2f} | {100 * e['hit_rate']:.1f}% | "
                         f"{e['mb_read_per_token']:.1f} | {e['stall_ms_per_token']:.1f} | {100 * e['low_share']:.1f}% | "
                         f"{e['upgrades_per_token']:.2f} |")
        lines.append("")
    for q in rep.get("quality", []):
        lines += [f"## Quality on the demo model, budget {q['budget']}% (decode mode, {q['tokens']} tokens, {q['items']} items)", "",
                  "| engine | perplexity | vs exact | last-word accuracy | vs exact (pts) | on miss copy | MB read/token | TPOT ms |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        base = q["rows"]["exact"]
        for label, r in q["rows"].items():
            if label == "exact runs":
                continue
            lines.append(f"| {label} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% | "
                         f"{100 * r['accuracy']:.1f}% | {100 * (r['accuracy'] - base['accuracy']):+.1f} | "
                         f"{100 * (r['low_share'] or 0):.1f}% | {r['bytes_read_per_token'] / 1e6:.2f} | {r['tpot_ms']:.2f} |")
        runs = q["rows"].get("exact runs", [])
        if len(runs) > 1:
            lines.append(f"\nexact's perplexity in the {len(runs)} sweeps: {min(runs):.3f}-{max(runs):.3f} (deterministic: the same figure each time)")
        lines.append("")
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(rep["speed"][0]["engines"])
    budgets = [r["label"] for r in rep["speed"]]
    for ax, key, title in ((axes[0], "tpot_ms", "TPOT (ms)"), (axes[1], "mb_read_per_token", "MB read per token")):
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ax.bar([j + i * width for j in range(len(budgets))], [r["engines"][label][key] for r in rep["speed"]], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(budgets))], budgets)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("mixed precision on miss, 1 GB checkpoint (budgets as shares of the bf16 experts' bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "results" / "miss-copy"))
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per engine and budget (default 64)")
    ap.add_argument("--budgets", default="25,50", help="budgets, percent of the bf16 experts' bytes (default 25,50)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--quick", action="store_true", help="16 tokens; quality on 1k tokens and 100 items")
    ap.add_argument("--ckpt-root", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        w = json.loads(args.worker)
        print(json.dumps(globals()[w.pop("fn")](**w)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    tokens = 16 if args.quick else args.tokens
    ckpts = checkpoints(args.ckpt_root)
    import expertcache.checkpoint as ck

    bf16_bytes = ck.Checkpoint.open(ckpts["bf16"]).total_expert_bytes
    rep = {"when": time.strftime("%Y-%m-%d %H:%M"), "speed": []}
    for b in budgets:
        r = _spawn(["--worker", json.dumps({"fn": "paired", "ckpts": ckpts, "budget_bytes": bf16_bytes * b // 100, "tokens": tokens})])
        r["label"] = f"{b}%"
        rep["speed"].append(r)
        print(json.dumps(r), flush=True)
    if not args.skip_quality:
        rep["quality"] = _spawn(["--worker", json.dumps({"fn": "quality", "budgets": budgets, "max_tokens": 1000 if args.quick else 5000,
                                                         "limit": 100 if args.quick else 300})])
    import quantized

    quantized.write_report(out, "miss_copy", rep, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
