#!/usr/bin/env python
"""Decode benchmark: TPOT, hit rate, prefetch precision/recall, bytes read, stall share and peak
RSS at expert budgets of 25%, 50% and 100%, with prefetch "none" vs "next-gate".

    python benchmarks/decode.py [--out results/decode] [--tokens N] [--rounds R] [--no-paired] [--quick]
    python benchmarks/decode.py --memory-limit peak[+SIZE]|SIZE [--budgets 25,50]   (limited vs unlimited)
    python benchmarks/decode.py --fine [--routing-trace real]   (many small experts; a real trace's routing)

The checkpoint
--------------
A synthetic Mixtral-family checkpoint (hidden 1024, intermediate 2816, 8 layers, 8 experts, top-2,
vocab 4096, GQA 8/2 heads): 64 experts of 17.3 MB = 1.11 GB of bf16 experts, ~45 MB of dense
tensors. It is built once, one safetensors file per layer (never more than one layer in memory),
into $EXPERTCACHE_BENCH_DIR or results/ckpt (gitignored), under a name keyed by every parameter,
and reused. `build_checkpoint` is also used by tests/test_memory.py.

Random weights route like uniform noise, which no trained model does. Three things give this one
a trained model's structure (documented in CkptSpec):
- a persistent residual stream: token embeddings have std 1 while every layer's update (attention
  and experts, init std 0.02) is a fraction of that, so adjacent MoE layers see similar inputs
  (measured cosine ~0.98), which is what the next-gate predictor relies on in real models (it
  picks ~89% of the next layer's experts here);
- favoured experts: every embedding shares a common direction c (weight `common`), and each router
  row has a component along c sized by the expert's popularity (normal quantiles x `popularity`,
  per-layer permutation; the token-dependent part of the router is orthogonal to c), so some
  experts are chosen more often: a layer's 4 most used experts take ~68% of its picks (50% would
  be uniform), measured over 200 decode tokens; the benchmark reports it as top_half_expert_share;
- correlated routers: layer l's router (token part and popularity part) is an AR(1) step
  `rho * W[l-1] + sqrt(1 - rho^2) * fresh` of layer l-1's, rho = `router_rho`.
The workload: a fixed 32-token prompt, then sampled decoding (temperature 1, fixed seed) so the
token stream does not collapse into a greedy loop of a random model; exact routing means every
configuration decodes the very same tokens.

`--fine` takes FINE_SPEC instead: Qwen3-MoE-shaped, 24 layers x 64 experts of 3 MiB (intermediate
512), top-8, 4.8 GB of bf16 experts, built the same way (~20 s). `--routing-trace real` forces the
routing of ../shared/traces/qwen3-30b-a3b/route.csv (Qwen3-30B-A3B, 48 layers x 128 experts,
top-6) onto it, mapped as expertcache/sim/forced.py documents (layer i of 24 <- trace layer 2i,
expert e <- e // 2, slots left take the model's own best): hits and reads see real locality; the
predictors, which read the model's routers, guess blind (next-gate precision ~0.3).

The measurement
---------------
Every configuration runs in its own subprocess (its VmHWM is that configuration's peak RSS),
with 1 torch thread, OMP_NUM_THREADS=1, OMP_WAIT_POLICY=PASSIVE and io="direct" (O_DIRECT: the
page cache never serves an expert). A throwaway configuration runs first (warm disk, CPU, imports);
inside each subprocess a short warm-up generation (another prompt) precedes the measured one,
whose counters are then zeroed (the cache keeps what the warm-up loaded, as in steady serving).
Decode-phase figures (after the first token) are reported; TTFT separately. Configurations are
interleaved over `--rounds` rounds (prefetch order alternating) and each figure is the median over
rounds; the next-gate/none TPOT ratio is taken per round (adjacent runs) and its median reported.

Runs minutes apart see different machine load (2 shared cores: one run's median TPOT can move by
+-25%), so the ratio is also measured paired (run_paired): per budget, one subprocess holds a
"none" and a "next-gate" engine and decodes the same tokens with both, one step each in turn, so
each pair of steps sees the same load. The 0.85 target at 50% is judged on that paired ratio; the
separate-run ratio is reported beside it. The column "compute-thread CPU/token" (CPU time the main
thread got per step) shows how much of a TPOT was waiting for a core rather than working.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic checkpoint's builder lives with the tests
sys.path.append(str(REPO))  # this checkout's engine unless PYTHONPATH names another copy

from helpers.synthetic import FINE_SPEC, CkptSpec, DiskSpaceError, build_checkpoint, prompt_ids  # noqa: E402


# ------------------------------------------------------------------------------------------------
# one configuration (runs in its own subprocess)
# ------------------------------------------------------------------------------------------------
COUNTERS = ("lookups", "hits", "misses", "prefetch_issued", "prefetch_used", "prefetch_late",
            "prefetch_wasted", "prefetch_cancelled", "stall_seconds", "bytes_read")


def drain(engine) -> None:
    """Wait until no expert read is in flight (so bytes_read is final)."""
    for ent in list(engine.cache.core.entries.values()):
        if ent.load is not None:
            ent.load.event.wait()


def force_routing(eng, trace_path: str) -> None:
    """Make `eng` route as the real trace did (expertcache.sim.forced; mapping documented there)."""
    from expertcache.sim.forced import TraceRouting
    from expertcache.sim.trace import read_route_csv

    ck = eng.checkpoint
    eng.runtime.routing = TraceRouting(read_route_csv(trace_path), layers=list(ck.sparse_layers), num_experts=ck.num_experts,
                                       top_k=ck.top_k, rule=ck.family.weight_rule(ck.config))


def default_trace() -> str:
    data = Path(os.environ.get("EXPERTCACHE_DATA") or REPO.parent / "shared")
    path = data / "traces" / "qwen3-30b-a3b" / "route.csv"
    if not path.is_file():
        sys.exit(f"decode.py: --routing-trace real needs {path} (set EXPERTCACHE_DATA)")
    return str(path)


def run_config(ckpt: str, budget: str, prefetch: str, tokens: int, warmup: int, seed: int = 0,
               prompt: list[int] | None = None, profile: str | None = None, routing_trace: str | None = None) -> dict:
    """Load, warm up, decode `tokens` tokens, report decode-phase figures and peak RSS."""
    import torch

    torch.set_num_threads(1)
    import expertcache
    from expertcache.stats import peak_rss_bytes

    eng = expertcache.load(ckpt, expert_budget=budget, prefetch=prefetch, io="direct", num_threads=1)
    if routing_trace:
        force_routing(eng, routing_trace)
    spec = CkptSpec(**{k: v for k, v in json.loads((Path(ckpt) / "spec.json").read_text()).items()})
    prompt = prompt or prompt_ids(spec)
    if warmup:
        eng.generate(prompt_ids(spec, 8, seed=99), max_new_tokens=warmup, stop_at_eos=False, greedy=False, seed=seed + 1)
    drain(eng)
    eng.reset_stats()

    counts = torch.zeros(spec.layers, spec.experts, dtype=torch.long)
    first: dict = {}
    stamps: list[float] = []

    def observe(layer, x, logits, weights, ids):
        if first:  # decode phase only
            counts[layer] += torch.bincount(ids.flatten(), minlength=spec.experts)

    def on_token(tok):
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            s = eng.stats()
            first.update({k: s[k] for k in COUNTERS})
            first["main_cpu"] = time.thread_time()
            first["proc_cpu"] = time.process_time()

    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    with eng.observe(observe):
        res = eng.generate(prompt, max_new_tokens=tokens, stop_at_eos=False, greedy=False, seed=seed, on_token=on_token)
    main_cpu, proc_cpu = time.thread_time() - first["main_cpu"], time.process_time() - first["proc_cpu"]
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    s = eng.stats()
    drain(eng)
    bytes_total = eng.cache.loader.bytes_read  # what the reader threads really read
    eb = eng.checkpoint.expert_bytes
    identity = (s["misses"] + s["prefetch_issued"] - s["prefetch_cancelled"]) * eb
    dec = {k: s[k] for k in COUNTERS}
    dec["bytes_read"] = bytes_total
    dec = {k: dec[k] - first[k] for k in COUNTERS}
    decode_seconds = stamps[-1] - stamps[0]
    top_half = counts.sort(dim=1, descending=True).values[:, : spec.experts // 2].sum() / max(int(counts.sum()), 1)
    out = {
        "budget": budget,
        "prefetch": prefetch,
        "tokens": len(res.token_ids),
        "token_ids_sha1": hashlib.sha1(json.dumps(res.token_ids).encode()).hexdigest()[:12],
        "tpot_ms": 1e3 * s["tpot_seconds"],
        "tpot_mean_ms": 1e3 * s["tpot_mean_seconds"],
        "ttft_ms": 1e3 * s["ttft_seconds"],
        "decode_seconds": decode_seconds,
        # CPU the main (compute) thread and the whole process (I/O threads included) got while
        # decoding: wall time minus stall minus main CPU is time spent waiting for a core
        "main_cpu_ms_per_token": 1e3 * main_cpu / max(len(stamps) - 1, 1),
        "process_cpu_ms_per_token": 1e3 * proc_cpu / max(len(stamps) - 1, 1),
        **{f"decode_{k}": v for k, v in dec.items()},
        "hit_rate": dec["hits"] / dec["lookups"] if dec["lookups"] else None,
        "prefetch_precision": dec["prefetch_used"] / dec["prefetch_issued"] if dec["prefetch_issued"] else None,
        "prefetch_recall": dec["prefetch_used"] / dec["lookups"] if dec["lookups"] else None,
        "stall_share": dec["stall_seconds"] / decode_seconds if decode_seconds > 0 else None,
        "bytes_identity": {"bytes_read": bytes_total, "expected": identity, "exact": bytes_total == identity},
        "top_half_expert_share": float(top_half),
        "peak_rss_bytes": peak_rss_bytes(),  # VmHWM: ru_maxrss would carry the driver's peak across exec
        "budget_bytes": eng.budget_bytes,
        "arena_bytes": eng.cache.arena.nbytes,
        "cache_slots": eng.cache.capacity,
        "dense_bytes": eng.checkpoint.dense_bytes,
        "expert_bytes": eb,
        "total_expert_bytes": eng.checkpoint.total_expert_bytes,
        "io": eng.store.io_effective,
        "engine": str(Path(expertcache.__file__).parent),
    }
    eng.close()
    return out


def run_paired(ckpt: str, budget: str, tokens: int, warmup: int, seed: int = 0,
               variants: tuple[str, ...] = ("none", "next-gate"), prompt: list[int] | None = None,
               setup=None, routing_trace: str | None = None) -> dict:
    """One engine per prefetch variant in one process, all decoding the same tokens, one step each
    in turn (order alternating every step). The machine's load drifts over seconds, so a step of
    each variant, a fraction of a second apart, sees the same load: the TPOT ratio of paired steps
    is far less noisy than one of runs minutes apart. A step is charged the time to let its own
    reads still in flight finish (wrong guesses), so no variant's I/O spills into another's step.
    `setup(label, engine)` may adjust an engine before the run (experiments)."""
    import torch

    torch.set_num_threads(1)
    import expertcache

    spec = CkptSpec(**json.loads((Path(ckpt) / "spec.json").read_text()))
    prompt = prompt or prompt_ids(spec)
    engines = {}
    for v in variants:
        prefetch = v.split(":")[0]  # "next-gate:label" = next-gate with a setup hook
        engines[v] = eng = expertcache.load(ckpt, expert_budget=budget, prefetch=prefetch, io="direct", num_threads=1)
        if routing_trace:
            force_routing(eng, routing_trace)
        if setup is not None:
            setup(v, eng)
        if warmup:
            eng.generate(prompt_ids(spec, 8, seed=99), max_new_tokens=warmup, stop_at_eos=False, greedy=False, seed=seed + 1)
        drain(eng)
        eng.reset_stats()
    st = step_in_turn(engines, prompt, tokens, seed)
    base = variants[0]
    out = {"budget": budget, "tokens": tokens, "variants": list(variants),
           "same_tokens": all(st[v]["ids"] == st[base]["ids"] for v in variants),
           "tpot_ms": {v: 1e3 * statistics.median(st[v]["times"]) for v in variants},
           "drain_ms_mean": {v: 1e3 * statistics.fmean(st[v]["drain"]) for v in variants},
           "stats": {v: {k: e.stats()[k] for k in COUNTERS} for v, e in engines.items()}}
    out["ratio_vs_" + base] = {v: out["tpot_ms"][v] / out["tpot_ms"][base] for v in variants[1:]}
    out["step_ratio_median_vs_" + base] = {
        v: statistics.median(a / b for a, b in zip(st[v]["times"], st[base]["times"])) for v in variants[1:]}
    for e in engines.values():
        e.close()
    return out


def step_in_turn(engines: dict, prompt: list[int], tokens: int, seed: int = 0) -> dict[str, dict]:
    """Decode `tokens` sampled steps (temperature 1, as Engine.generate samples) with every engine,
    one step each in turn, the order alternating every step. A step is charged the time to let its
    own reads still in flight finish (wrong guesses), so no engine's I/O spills into another's step.
    Per engine: "times" and "drain" (seconds, step 0, the prefill, left out), "ids", and "first":
    its stats after step 0."""
    import torch

    from expertcache.decoding import Decoding

    st = {v: {"decoding": Decoding(e.model), "inputs": list(prompt), "gen": torch.Generator().manual_seed(seed),
              "times": [], "drain": [], "ids": [], "first": None} for v, e in engines.items()}
    order = list(engines)
    with torch.inference_mode():
        for step in range(tokens):
            for v in order if step % 2 == 0 else order[::-1]:
                e, s = engines[v], st[v]
                t0 = time.perf_counter()
                logits = s["decoding"].feed(s["inputs"])[-1]
                probs = torch.softmax(logits.float(), dim=-1)
                nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=s["gen"]))
                t1 = time.perf_counter()
                drain(e)
                t2 = time.perf_counter()
                if step > 0:
                    s["times"].append(t2 - t0)
                    s["drain"].append(t2 - t1)
                else:
                    s["first"] = dict(e.stats())
                s["ids"].append(nxt)
                s["inputs"] = [nxt]
    return st


def _spawn(args: list[str], timeout: float = 1800, *, cgroup: bool = False, limit: int | None = None) -> dict:
    """Run a worker; with `cgroup`, inside a memory cgroup of its own with `limit` bytes (None: no
    limit), whose figures (peak usage with page cache, failcnt, OOM kills) come back as "cgroup"."""
    # a PYTHONPATH given by the caller comes first (to benchmark another copy of the engine)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])))
    run = dict(env=env, capture_output=True, text=True, timeout=timeout)
    cmd = [sys.executable, __file__, *args]
    figures = None
    if cgroup:
        from expertcache.memlimit import MemoryCgroup

        with MemoryCgroup(limit) as cg:
            p = cg.run(cmd, **run)
            figures = cg.figures()
    else:
        p = subprocess.run(cmd, **run)
    if p.returncode != 0:
        if figures and figures["oom_kills"]:
            return {"oom_killed": True, "cgroup": figures}
        raise RuntimeError(f"worker {args} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if figures is not None:
        out["cgroup"] = figures
    return out


def spawn_config(ckpt: Path, budget: str, prefetch: str, tokens: int, warmup: int, *, cgroup: bool = False,
                 limit: int | None = None, **kw) -> dict:
    job = {"ckpt": str(ckpt), "budget": budget, "prefetch": prefetch, "tokens": tokens, "warmup": warmup, **kw}
    return _spawn(["--worker", json.dumps(job)], cgroup=cgroup, limit=limit)


def spawn_paired(ckpt: Path, budget: str, tokens: int, warmup: int, **kw) -> dict:
    job = {"ckpt": str(ckpt), "budget": budget, "tokens": tokens, "warmup": warmup, **kw}
    return _spawn(["--paired-worker", json.dumps(job)])


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    budget: str
    prefetch: str
    tpot_ms: float  # median over rounds of each run's median TPOT
    tpot_mean_ms: float
    ttft_ms: float
    hit_rate: float
    prefetch_precision: float | None
    prefetch_recall: float | None
    bytes_read: int  # decode phase, median over rounds
    stall_share: float
    peak_rss_bytes: int
    main_cpu_ms_per_token: float  # CPU the compute thread got per decode step
    cache_slots: int
    runs: list[dict] = field(default_factory=list)


@dataclass
class Report:
    checkpoint: str
    engine: str  # the expertcache package the workers imported
    spec: dict
    expert_bytes: int
    total_expert_bytes: int
    dense_bytes: int
    tokens: int
    rounds: int
    warmup: int
    machine: dict
    rows: list[Row]
    tpot_ratio_next_gate_vs_none: dict[str, dict]  # budget -> {"median": r, "per_round": [...]} (subprocess runs)
    paired: dict[str, dict]  # budget -> run_paired's result (both variants in one process, steps interleaved)
    target: dict


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def markdown(rep: Report) -> str:
    lines = [
        f"Decode benchmark: {rep.checkpoint}",
        f"{rep.total_expert_bytes / 1e9:.2f} GB of bf16 experts ({rep.expert_bytes / 1e6:.1f} MB each), "
        f"{rep.dense_bytes / 1e6:.0f} MB dense; {rep.tokens} decode tokens per run, {rep.rounds} round(s), median over "
        f"rounds; io=O_DIRECT, 1 torch thread; counters are decode-phase (after the first token); one subprocess per "
        f"row (peak RSS is the row's own). Load average at the end: {', '.join(f'{x:.1f}' for x in rep.machine['loadavg'])}.",
        "",
        "| budget | prefetch | slots | TPOT median (ms) | TPOT mean (ms) | TTFT (ms) | hit rate | prefetch precision | prefetch recall | bytes read (MB) | stall share | compute-thread CPU/token (ms) | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    for r in rep.rows:
        lines.append(
            f"| {r.budget} | {r.prefetch} | {r.cache_slots} | {r.tpot_ms:.1f} | {r.tpot_mean_ms:.1f} | {r.ttft_ms:.0f} | "
            f"{f(r.hit_rate, '.3f')} | {f(r.prefetch_precision, '.3f')} | {f(r.prefetch_recall, '.3f')} | "
            f"{r.bytes_read / 1e6:.0f} | {f(r.stall_share, '.3f')} | {r.main_cpu_ms_per_token:.0f} | {r.peak_rss_bytes / 2**20:.0f} |"
        )
    lines.append("")
    lines.append("next-gate / none TPOT:")
    lines.append("")
    lines.append("| budget | separate runs (median of per-round ratios) | per round | paired, interleaved steps (ratio of medians) | paired (median of step ratios) | paired TPOT none / next-gate (ms) |")
    lines.append("|---|---:|---|---:|---:|---|")
    for b, v in rep.tpot_ratio_next_gate_vs_none.items():
        pr = rep.paired.get(b)
        lines.append(
            f"| {b} | {v['median']:.3f} | {', '.join(f'{x:.3f}' for x in v['per_round'])} | "
            + (f"{pr['ratio_vs_none']['next-gate']:.3f} | {pr['step_ratio_median_vs_none']['next-gate']:.3f} | "
               f"{pr['tpot_ms']['none']:.1f} / {pr['tpot_ms']['next-gate']:.1f} |" if pr else "- | - | - |")
        )
    t = rep.target
    lines.append("")
    lines.append(
        f"Target at 50%: next-gate TPOT <= 0.85 x none: {'MET' if t['met'] else 'MISSED'} "
        f"(paired {f(t['ratio_paired'], '.3f')}, separate runs {f(t['ratio_separate'], '.3f')}; judged on "
        f"{t['judged_on']})."
    )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# under a memory limit (--memory-limit)
# ------------------------------------------------------------------------------------------------
def parse_limit(text: str) -> tuple[bool, int]:
    """"peak", "peak+64MiB" or a size: (relative to the unlimited run's peak?, bytes)."""
    from expertcache.config import parse_size

    rel = text.startswith("peak")
    rest = text[4:].lstrip("+") if rel else text
    return rel, parse_size(rest, "memory limit") if rest else 0


def run_limited(ckpt: Path, budgets: list[str], prefetches: tuple[str, ...], tokens: int, warmup: int, rounds: int,
                limit: str) -> dict:
    """Each configuration in a memory cgroup without a limit and with one (`limit`: a size, or
    "peak[+SIZE]": the unlimited run's cgroup peak, RSS + page cache, plus SIZE), in turn, the
    order alternating by round; the limited/unlimited TPOT ratio is taken per round."""
    rel, extra = parse_limit(limit)
    res: dict[str, dict] = {}
    for rnd in range(rounds):
        for b in budgets:
            for pf in prefetches:
                key = f"{b} {pf}"
                ent = res.setdefault(key, {"budget": b, "prefetch": pf, "limit_bytes": None, "unlimited": [], "limited": []})
                for mode in ("unlimited", "limited") if rnd % 2 == 0 or ent["limit_bytes"] is None else ("limited", "unlimited"):
                    if mode == "limited" and ent["limit_bytes"] is None:
                        ent["limit_bytes"] = (ent["unlimited"][0]["cgroup"]["peak_bytes"] if rel else 0) + extra
                    r = spawn_config(ckpt, b, pf, tokens, warmup, cgroup=True,
                                     limit=None if mode == "unlimited" else ent["limit_bytes"])
                    ent[mode].append(r)
                    cg = r["cgroup"]
                    what = "OOM-killed" if r.get("oom_killed") else (
                        f"TPOT {r['tpot_ms']:.1f} ms, stall {r['decode_stall_seconds']:.2f} s, VmHWM {r['peak_rss_bytes'] / 2**20:.0f} MiB")
                    print(f"round {rnd} {key:>14} {mode:>9}: {what}, cgroup peak {cg['peak_bytes'] / 2**20:.0f} MiB, "
                          f"failcnt {cg['failcnt']}", flush=True)
    for ent in res.values():
        ok = [(l, u) for l, u in zip(ent["limited"], ent["unlimited"]) if not l.get("oom_killed")]
        ratios = [l["tpot_ms"] / u["tpot_ms"] for l, u in ok]
        ent["tpot_ratio_per_round"] = ratios
        ent["tpot_ratio"] = statistics.median(ratios) if ratios else None
        ent["oom_killed"] = sum(bool(l.get("oom_killed")) for l in ent["limited"])
        for mode in ("unlimited", "limited"):
            runs = [r for r in ent[mode] if not r.get("oom_killed")]
            ent[mode + "_summary"] = {
                "tpot_ms": _median(r["tpot_ms"] for r in runs), "stall_seconds": _median(r["decode_stall_seconds"] for r in runs),
                "vmhwm_bytes": _median(r["peak_rss_bytes"] for r in runs),
                "cgroup_peak_bytes": _median(r["cgroup"]["peak_bytes"] for r in ent[mode]),
                "failcnt": _median(r["cgroup"]["failcnt"] for r in ent[mode]),
                "pgmajfault": _median(r["cgroup"]["pgmajfault"] for r in ent[mode])}
    return {"limit": limit, "tokens": tokens, "rounds": rounds, "warmup": warmup, "configs": res,
            "target": {"max_ratio": 1.15, "met": all(e["tpot_ratio"] is not None and e["tpot_ratio"] <= 1.15 and not e["oom_killed"]
                                                       for e in res.values())}}


def limited_markdown(rep: dict, ckpt: str) -> str:
    mib = lambda x: "-" if x is None else f"{x / 2**20:.0f}"  # noqa: E731
    lines = [
        f"Decode under a memory limit: {ckpt}; limit {rep['limit']} (cgroup v1/v2 memory limit, page cache counted); "
        f"{rep['tokens']} decode tokens, {rep['rounds']} round(s) alternating limited/unlimited; 1 torch thread, io=O_DIRECT.",
        "",
        "| budget | prefetch | limit (MiB) | TPOT unlimited (ms) | TPOT limited (ms) | limited / unlimited (median per round) | stall unlimited / limited (s) | cgroup peak unlimited / limited (MiB) | VmHWM (MiB) | failcnt limited | OOM |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in rep["configs"].values():
        u, l = e["unlimited_summary"], e["limited_summary"]
        f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
        lines.append(
            f"| {e['budget']} | {e['prefetch']} | {mib(e['limit_bytes'])} | {f(u['tpot_ms'], '.1f')} | {f(l['tpot_ms'], '.1f')} | "
            f"{f(e['tpot_ratio'], '.3f')} ({', '.join(f'{x:.2f}' for x in e['tpot_ratio_per_round'])}) | "
            f"{f(u['stall_seconds'], '.2f')} / {f(l['stall_seconds'], '.2f')} | {mib(u['cgroup_peak_bytes'])} / {mib(l['cgroup_peak_bytes'])} | "
            f"{mib(u['vmhwm_bytes'])} | {f(l['failcnt'], '.0f')} | {e['oom_killed']} |")
    lines += ["", f"Target: limited TPOT <= 1.15 x unlimited for every row: {'MET' if rep['target']['met'] else 'MISSED'}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "results" / "decode"), help="output directory (decode.json, decode.md)")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens per configuration (default 96; 32 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved repetitions (default 2; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up tokens inside each subprocess (default 8)")
    ap.add_argument("--budgets", default="25,50,100", help="comma-separated percentages")
    ap.add_argument("--ckpt-root", default=None, help="where the checkpoint is cached (default $EXPERTCACHE_BENCH_DIR or results/ckpt)")
    ap.add_argument("--no-paired", action="store_true", help="skip the paired (interleaved, one-process) TPOT comparison")
    ap.add_argument("--quick", action="store_true", help="32 tokens, 1 round")
    ap.add_argument("--fine", action="store_true", help="the Qwen3-MoE-shaped checkpoint of many small experts "
                                                         "(24 layers x 64 experts of 3 MiB, top-8; 4.8 GB) instead of the 1 GB one")
    ap.add_argument("--routing-trace", default=None, help="force the routing of a recorded trace: a route.csv, or `real` "
                                                          "for ../shared/traces/qwen3-30b-a3b (mapping: expertcache/sim/forced.py)")
    ap.add_argument("--memory-limit", default=None,
                    help="instead of the main table, run each configuration in a memory cgroup without and with this limit "
                         "(a size, or peak[+SIZE]: the unlimited run's peak usage with page cache, plus SIZE) and compare")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--paired-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(run_config(**json.loads(args.worker))))
        return 0
    if args.paired_worker:
        print(json.dumps(run_paired(**json.loads(args.paired_worker))))
        return 0

    tokens = args.tokens or (32 if args.quick else 96)
    rounds = args.rounds or (1 if args.quick else 2)
    warmup = 8 if args.warmup is None else args.warmup
    budgets = [f"{b.strip()}%" for b in args.budgets.split(",")]
    spec = FINE_SPEC if args.fine else CkptSpec()
    ckpt = build_checkpoint(args.ckpt_root, spec)
    from expertcache import kernels

    kernels.available()  # built here once, not inside a worker's memory cgroup or timed run
    trace = (default_trace() if args.routing_trace == "real" else args.routing_trace) or None
    kw = {"routing_trace": trace} if trace else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.memory_limit:
        from expertcache.memlimit import available

        why = available()
        if why is not None:
            print(f"decode.py: --memory-limit needs a writable memory cgroup: {why}", file=sys.stderr)
            return 2
        spawn_config(ckpt, "50%", "none", min(tokens, 16), warmup)  # warm-up (discarded)
        rep = run_limited(ckpt, budgets, ("none", "next-gate"), tokens, warmup, rounds, args.memory_limit)
        rep["checkpoint"], rep["machine"] = str(ckpt), {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}
        (out / "decode-limit.json").write_text(json.dumps(rep, indent=1))
        md = limited_markdown(rep, str(ckpt))
        (out / "decode-limit.md").write_text(md)
        print(md)
        return 0

    print("warm-up configuration (discarded) ...", flush=True)
    engine_file = spawn_config(ckpt, "50%", "none", min(tokens, 16), warmup)["engine"]
    print(f"engine: {engine_file}", flush=True)
    runs: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(rounds):
        order = ("none", "next-gate") if rnd % 2 == 0 else ("next-gate", "none")
        for b in budgets:
            for pf in order:
                r = spawn_config(ckpt, b, pf, tokens, warmup, **kw)
                runs.setdefault((b, pf), []).append(r)
                print(f"round {rnd} {b:>4} {pf:>9}: TPOT {r['tpot_ms']:.1f} ms, hit {r['hit_rate']:.3f}, "
                      f"stall {r['stall_share']:.2f}, CPU/token {r['main_cpu_ms_per_token']:.0f} ms, "
                      f"RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, "
                      f"bytes identity {'ok' if r['bytes_identity']['exact'] else r['bytes_identity']}", flush=True)
    paired = {}
    if not args.no_paired:
        for b in budgets:
            paired[b] = pr = spawn_paired(ckpt, b, tokens, warmup, **kw)
            print(f"paired {b:>4}: TPOT none {pr['tpot_ms']['none']:.1f} ms, next-gate {pr['tpot_ms']['next-gate']:.1f} ms, "
                  f"ratio {pr['ratio_vs_none']['next-gate']:.3f}, same tokens {pr['same_tokens']}", flush=True)
    rows = []
    for (b, pf), rs in sorted(runs.items(), key=lambda kv: (budgets.index(kv[0][0]), kv[0][1] != "none")):
        rows.append(Row(
            budget=b, prefetch=pf,
            tpot_ms=_median(r["tpot_ms"] for r in rs),
            tpot_mean_ms=_median(r["tpot_mean_ms"] for r in rs),
            ttft_ms=_median(r["ttft_ms"] for r in rs),
            hit_rate=_median(r["hit_rate"] for r in rs),
            prefetch_precision=_median(r["prefetch_precision"] for r in rs),
            prefetch_recall=_median(r["prefetch_recall"] for r in rs),
            bytes_read=int(_median(r["decode_bytes_read"] for r in rs)),
            stall_share=_median(r["stall_share"] for r in rs),
            peak_rss_bytes=int(_median(r["peak_rss_bytes"] for r in rs)),
            main_cpu_ms_per_token=_median(r["main_cpu_ms_per_token"] for r in rs),
            cache_slots=rs[0]["cache_slots"],
            runs=rs,
        ))
    ratios = {}
    for b in budgets:
        per = [g["tpot_ms"] / n["tpot_ms"] for g, n in zip(runs[(b, "next-gate")], runs[(b, "none")])]
        ratios[b] = {"median": statistics.median(per), "per_round": per}
    r_sep = ratios.get("50%", {}).get("median")
    r_pair = paired["50%"]["ratio_vs_none"]["next-gate"] if "50%" in paired else None
    judged = r_pair if r_pair is not None else r_sep
    first = next(iter(runs.values()))[0]
    rep = Report(
        checkpoint=str(ckpt), engine=engine_file, spec=asdict(spec), expert_bytes=first["expert_bytes"],
        total_expert_bytes=first["total_expert_bytes"], dense_bytes=first["dense_bytes"],
        tokens=tokens, rounds=rounds, warmup=warmup,
        machine={"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]},
        rows=rows, tpot_ratio_next_gate_vs_none=ratios, paired=paired,
        target={"budget": "50%", "max_ratio": 0.85, "ratio_separate": r_sep, "ratio_paired": r_pair,
                "judged_on": "the paired comparison" if r_pair is not None else "separate runs",
                "met": judged is not None and judged <= 0.85},
    )
    (out / "decode.json").write_text(json.dumps(asdict(rep), indent=1))
    md = markdown(rep)
    (out / "decode.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
