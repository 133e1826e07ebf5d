#!/usr/bin/env python
"""Quantized experts benchmark: kernels, bytes and decode speed on the 1 GB checkpoint, quality on
the demo model; bf16 against int8 (one scale per row) and int4 (groups of 64), same run.

    python benchmarks/quantized.py [--out results/quantized] [--tokens N] [--skip-quality] [--quick]

- kernels: one expert of the 1 GB checkpoint's shape (hidden 1024, intermediate 2816: gate, up and
  down) on 1 and 8 tokens, bf16 (expertcache's exact or AMX kernel where it runs, and torch's F.linear) against the int8 and int4 kernels expertcache
  calls on the stored bytes (median of repeats, 1 thread); effective GB/s is the expert's stored
  bytes over the time; and the one-off repack a load pays (quant.QuantExperts.prepare).
- speed and bytes: benchmarks/decode.py's synthetic Mixtral checkpoint (64 experts of 17.3 MB bf16),
  quantized by `expertcache quantize` (cached beside it). One subprocess per budget holds the
  engines (bf16, int8 and int4 with dense weights kept, int8 dense, int4 dense too) at one budget: 100% or 50% of each
  one's own experts (the same share resident: bytes read fall with the expert size), or 50% of
  the bf16 experts' bytes for all (the same memory) and steps them in turn, one decode step each (order
  alternating), so each step sees the same machine load; each engine samples its own tokens
  (temperature 1, fixed seed). TPOT is the median step; the ratio is the median of per-step ratios.
  Decode bytes read per token and hit rates come from each engine's counters.
- quality: the demo model and its int8 / int4-g64 / int4-g32 copies, with int8 or int4 dense weights too, `expertcache eval`'s
  perplexity on TinyStories validation (first 10k tokens, window 256, stride 128) and last-word
  multiple-choice accuracy (1,000 items), at a 100% budget.
Writes quantized.json, quantized.md and quantized.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = {"bf16": None, "int8": (8, 0, "keep"), "int8+dense-int8": (8, 0, "int8"), "int4-g64": (4, 64, "keep"),
            "int4-g64+dense-int8": (4, 64, "int8"), "int4-g64+dense-int4": (4, 64, "int4")}
QUALITY = {"int8": (8, 0, "keep"), "int8+dense-int8": (8, 0, "int8"), "int4-g64": (4, 64, "keep"), "int4-g32": (4, 32, "keep"),
           "int4-g64+dense-int8": (4, 64, "int8"), "int4-g64+dense-int4": (4, 64, "int4")}


def kernels(experts: int = 12, repeats: int = 9) -> dict:
    """Per expert call, its weights coming from memory (a round over `experts` distinct experts,
    larger than the L3 cache), as in decoding: median seconds per expert over `repeats` rounds."""
    import torch
    import torch.nn.functional as F

    from expertcache import gemm
    from expertcache import kernels as ec_kernels
    from expertcache.config import AMX_ROWS
    from expertcache.qformat import Scheme
    from expertcache.quant import QuantExperts, quantize

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ec_kernels.available()  # built or loaded before anything is timed
    h, i = 1024, 2816
    shapes = ((i, h), (i, h), (h, i))
    ws = [torch.randn(s) * 0.02 for s in shapes]

    def med(f, n):
        f()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t0) / n)
        return statistics.median(ts)

    out = {}
    bf = [[(w + 1e-4 * e).to(torch.bfloat16) for w in ws] for e in range(experts)]
    bf_bytes = sum(w.numel() * 2 for w in bf[0])
    formats = (("int8", Scheme(8, None), None), ("int4-g64", Scheme(4, 64), None), ("int4-g32", Scheme(4, 32), None),
               ("int8 torch", Scheme(8, None), False), ("int4-g64 torch", Scheme(4, 64), False))
    packed = {}
    for name, scheme, native in formats:
        q = QuantExperts(scheme, shapes, native=native)
        one = []
        for w in ws:
            p, s = quantize(w, scheme, torch.bfloat16)
            one += [p.view(torch.uint8).view(w.shape[0], -1), s]
        copies = [[t.clone() for t in one] for _ in range(experts)]
        t0 = time.perf_counter()
        for c in copies:
            q.prepare(c)
        packed[name] = (q, copies, (time.perf_counter() - t0) / experts, sum(t.numel() * t.element_size() for t in one))
    for n in (1, 8, 16):
        x = torch.randn(n, h, dtype=torch.bfloat16)
        xi = torch.randn(n, i, dtype=torch.bfloat16)
        t = med(lambda: [(gemm.linear_pair(x, e[0], e[1]), gemm.linear(xi, e[2])) for e in bf], experts)
        ours = (["expertcache exact"] if gemm.exact_kernel(torch.bfloat16)
                else ["expertcache amx"] if gemm.amx_kernel(torch.bfloat16) and n <= AMX_ROWS else ["F.linear"])
        out[f"bf16_n{n}"] = {"ms": 1e3 * t, "bytes": bf_bytes, "gb_s": bf_bytes / t / 1e9, "kernels": ours}
        if ours != ["F.linear"]:  # torch's own loop, the same bits
            t = med(lambda: [(F.linear(x, e[0]), F.linear(x, e[1]), F.linear(xi, e[2])) for e in bf], experts)
            out[f"bf16 torch_n{n}"] = {"ms": 1e3 * t, "bytes": bf_bytes, "gb_s": bf_bytes / t / 1e9, "kernels": ["F.linear"],
                                       "vs_bf16": t / (out[f"bf16_n{n}"]["ms"] / 1e3)}
        for name, (q, copies, prep, nbytes) in packed.items():
            t = med(lambda: [(q.gate_up(x, c), q.linear(xi, c, 2)) for c in copies], experts)
            out[f"{name}_n{n}"] = {"ms": 1e3 * t, "bytes": nbytes, "gb_s": nbytes / t / 1e9, "kernels": list(q.kernels),
                                   "prepare_ms": 1e3 * prep, "vs_bf16": t / (out[f"bf16_n{n}"]["ms"] / 1e3)}
    return out


def checkpoints(root: Path | None) -> dict[str, Path]:
    from helpers.synthetic import CkptSpec, build_checkpoint

    from expertcache.tools.quantize import quantize_checkpoint

    root = Path(root or os.environ.get("EXPERTCACHE_BENCH_DIR") or REPO / "results" / "ckpt")
    base = build_checkpoint(root, CkptSpec())
    out = {"bf16": base}
    for name, v in VARIANTS.items():
        if v is None:
            continue
        d = base.with_name(base.name + "-" + name)
        if not (d / "config.json").exists():
            quantize_checkpoint(base, d, bits=v[0], group_size=v[1], dense=v[2])
            (d / "spec.json").write_text((base / "spec.json").read_text())
        out[name] = d
    return out


def paired(ckpts: dict[str, str], budget: str, tokens: int, warmup: int = 8) -> dict:
    """One engine per variant at `budget` (bytes, or "100%" of each one's experts), stepped in turn
    (decode.step_in_turn), each sampling its own tokens."""
    import torch

    torch.set_num_threads(1)
    import expertcache
    from decode import COUNTERS, drain, step_in_turn
    from helpers.synthetic import CkptSpec, prompt_ids

    spec = CkptSpec(**json.loads((Path(ckpts["bf16"]) / "spec.json").read_text()))
    prompt = prompt_ids(spec)
    engines = {}
    for v, path in ckpts.items():
        engines[v] = e = expertcache.load(path, expert_budget=budget, prefetch="next-gate", io="direct", num_threads=1)
        e.generate(prompt_ids(spec, 8, seed=99), max_new_tokens=warmup, stop_at_eos=False, greedy=False, seed=1)
        drain(e)
        e.reset_stats()
    st = step_in_turn(engines, prompt, tokens)
    base = next(iter(engines))
    out = {"budget": budget, "tokens": tokens, "variants": {}}
    for v, e in engines.items():
        s = e.stats()
        dec = {k: s[k] - st[v]["first"][k] for k in COUNTERS}
        n = len(st[v]["times"])
        out["variants"][v] = {
            "tpot_ms": 1e3 * statistics.median(st[v]["times"]),
            "ratio_vs_bf16": statistics.median(a / b for a, b in zip(st[v]["times"], st[base]["times"])),
            "hit_rate": dec["hits"] / dec["lookups"] if dec["lookups"] else None,
            "bytes_read_per_token": dec["bytes_read"] / n,
            "cache_slots": e.cache.capacity, "expert_bytes": e.checkpoint.expert_bytes,
            "budget_bytes": e.budget_bytes,
        }
        e.close()
    return out


def quality(max_tokens: int, limit: int | None, variants: list[str] | None = None, log: str | None = None) -> dict:
    """Perplexity and last-word accuracy of the demo model as `variants` (bf16 and QUALITY's names;
    None: all), each appended to `log` as a JSON line as soon as it is measured."""
    import expertcache
    from expertcache.demo.corpus import LASTWORD_MC, TINYSTORIES_VALID, corpus_path
    from expertcache.engine import demo_model_dir
    from expertcache.tools.quality import evaluate
    from expertcache.tools.quantize import quantize_checkpoint

    text, mc = corpus_path(TINYSTORIES_VALID), corpus_path(LASTWORD_MC)
    names = variants or ["bf16", *QUALITY]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            d = demo_model_dir()
            if name != "bf16":
                bits, g, dense = QUALITY[name]
                d = Path(tmp) / name
                quantize_checkpoint(demo_model_dir(), d, bits=bits, group_size=g, dense=dense, progress=False)
            with expertcache.load(d, expert_budget="100%", prefetch="none", num_threads=1) as eng:
                ppl = evaluate(eng, text=text, window=256, stride=128, max_tokens=max_tokens, progress=True)
                acc = evaluate(eng, mc=mc, limit=limit, progress=True)
                out[name] = {"perplexity": ppl.perplexity, "tokens": ppl.tokens, "accuracy": acc.accuracy,
                             "items": acc.items, "expert_bytes": eng.checkpoint.expert_bytes,
                             "dense_bytes": eng.checkpoint.dense_bytes}
            if log:
                with open(log, "a") as f:
                    f.write(json.dumps({name: out[name]}) + "\n")
    return out


def with_relative(q: dict) -> dict:
    """Quality figures with each variant's change against bf16's."""
    base = q["bf16"]
    return {name: {**r, "perplexity_vs_bf16": r["perplexity"] / base["perplexity"] - 1,
                   "accuracy_points_vs_bf16": 100 * (r["accuracy"] - base["accuracy"])} for name, r in q.items()}


def _spawn(args: list[str], script: str = __file__) -> dict:
    """Run `script`'s worker (one thread) and return the JSON its last line prints."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])))
    p = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"worker {args} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def markdown(rep: dict) -> str:
    lines = ["# Quantized experts", "", f"`python benchmarks/quantized.py` ({rep['when']}; 1 thread)", ""]
    k = rep["kernels"]
    lines += ["## One expert (gate, up, down: 1024 x 2816) per call, weights from memory", "",
              "| tokens | format | kernels | ms | stored MB | effective GB/s | vs bf16 | repack at load, ms |", "|---|---|---|---|---|---|---|---|"]
    for key, r in k.items():
        fmt, n = key.rsplit("_n", 1)
        lines.append(f"| {n} | {fmt} | {', '.join(sorted(set(r['kernels'])))} | {r['ms']:.3f} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['gb_s']:.1f} | {r.get('vs_bf16', 1.0):.2f}x | {r.get('prepare_ms', 0):.2f} |")
    for run in rep["speed"]:
        lines += ["", f"## Decode, budget {run['label']} ({run['tokens']} tokens, paired steps)", "",
                  "| format | TPOT ms | vs bf16 (median step ratio) | hit rate | MB read/token | slots | bytes/expert |", "|---|---|---|---|---|---|---|"]
        for v, r in run["variants"].items():
            hr = f"{100 * r['hit_rate']:.1f}%" if r["hit_rate"] is not None else "-"
            lines.append(f"| {v} | {r['tpot_ms']:.1f} | {r['ratio_vs_bf16']:.3f} | {hr} | {r['bytes_read_per_token'] / 1e6:.2f} | "
                         f"{r['cache_slots']} | {r['expert_bytes'] / 1e6:.2f} MB |")
    if rep.get("quality"):
        lines += ["", "## Quality on the demo model (100% budget)", "",
                  "| format | bytes/expert | perplexity (TinyStories valid) | vs bf16 | last-word accuracy | vs bf16 |", "|---|---|---|---|---|---|"]
        for v, r in rep["quality"].items():
            lines.append(f"| {v} | {r['expert_bytes'] / 1024:.0f} KiB | {r['perplexity']:.3f} | {100 * r['perplexity_vs_bf16']:+.2f}% | "
                         f"{100 * r['accuracy']:.1f}% ({r['items']}) | {r['accuracy_points_vs_bf16']:+.1f} pts |")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [r["label"] for r in rep["speed"]]
    variants = list(rep["speed"][0]["variants"])
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        ax.bar([i + j * width for i in range(len(labels))], [r["variants"][v]["tpot_ms"] for r in rep["speed"]], width, label=v)
    ax.set_xticks([i + width for i in range(len(labels))], labels)
    ax.set_ylabel("TPOT, ms (median)")
    ax.set_title("Decode on the 1 GB checkpoint, 1 thread")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "results" / "quantized"))
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per engine and budget (default 64)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--quality-json", default=None, help="take the quality figures from these files of JSON lines, comma-separated (quality(log=FILE))")
    ap.add_argument("--quick", action="store_true", help="16 tokens; quality on 2k tokens and 200 items")
    ap.add_argument("--ckpt-root", default=None)
    ap.add_argument("--kernels-only", action="store_true", help="re-measure the kernels into an existing quantized.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        w = json.loads(args.worker)
        print(json.dumps(globals()[w.pop("fn")](**w)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.kernels_only:
        rep = json.loads((out / "quantized.json").read_text())
        rep["kernels"] = _spawn(["--worker", json.dumps({"fn": "kernels"})])
        (out / "quantized.json").write_text(json.dumps(rep, indent=2))
        (out / "quantized.md").write_text(markdown(rep))
        print(markdown(rep))
        return 0
    tokens = 16 if args.quick else args.tokens
    rep = {"when": time.strftime("%Y-%m-%d %H:%M"), "kernels": _spawn(["--worker", json.dumps({"fn": "kernels"})])}
    ckpts = {k: str(v) for k, v in checkpoints(args.ckpt_root).items()}
    import expertcache.checkpoint as ck

    bf16_bytes = ck.Checkpoint.open(ckpts["bf16"]).total_expert_bytes
    rep["speed"] = []
    for label, budget in (("100% of each", "100%"), ("50% of each", "50%"), ("50% of bf16 bytes", str(bf16_bytes // 2))):
        r = _spawn(["--worker", json.dumps({"fn": "paired", "ckpts": ckpts, "budget": budget, "tokens": tokens})])
        r["label"] = label
        rep["speed"].append(r)
        print(json.dumps(r), flush=True)
    if args.quality_json:
        q = {}
        for path in args.quality_json.split(","):  # JSON lines of {variant: figures}, as `quality(log=...)` writes
            for line in Path(path).read_text().splitlines():
                q.update(json.loads(line))
        rep["quality"] = with_relative(q)
    elif not args.skip_quality:
        rep["quality"] = with_relative(quality(2000 if args.quick else 10000, 200 if args.quick else None))
    write_report(out, "quantized", rep, markdown, plot)
    return 0


def write_report(out: Path, name: str, rep: dict, markdown, plot=None) -> None:
    """NAME.json, NAME.md (printed too) and, given a plot, NAME.png in `out` (made if need be)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rep, indent=2))
    (out / f"{name}.md").write_text(markdown(rep))
    if plot is not None:
        plot(rep, out / f"{name}.png")
    print(markdown(rep))


if __name__ == "__main__":
    sys.exit(main())
