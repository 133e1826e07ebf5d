#!/usr/bin/env python
"""Simulator accuracy: the time per output token the simulator models for an engine run, on the
`measured` hardware profile of this machine, against the engine's measured TPOT, for prefetch
none and next-gate.

    python benchmarks/simulate_accuracy.py [--model DIR] [--budget 50%] [--policy lfu] [--tokens 64]
                                           [--rounds 5] [--steps 32] [--out results/simulate_accuracy]

One measurement (a fresh subprocess each, 1 torch thread, OMP_NUM_THREADS=1):
  1. calibrate the `measured` profile (sim/measure.py) on the checkpoint with the run's
     predictor: bandwidth from one long O_DIRECT read; per-layer decode compute with every
     expert resident (so it holds no load at all); the wait (latency) and the extra compute
     (read_cpu) of a demand miss, from the same forwards run again with one routed expert per
     layer evicted;
  2. run the engine: a cold store (fresh cache, nothing resident), io direct, the budget and
     policy, `--tokens` sampled tokens (temperature 1, seed 0: exact routing, so every run decodes
     the same tokens) after a fixed prompt, with a Recorder attached: the run's trace, with the
     predictor's guesses;
  3. calibrate again; the profile is the mean of the two calibrations, which bracket the run
     (the machine is shared: its speed drifts);
  4. replay the trace in engine mode with the same policy and budget, prefetch replayed from the
     recorded guesses (sim/clock.py), and price it on the profile: modelled TPOT, mean and median
     over decode tokens.
Prefetch none and next-gate alternate over --rounds rounds; the modelled/measured ratio is taken
per measurement (its own calibration) and the median over rounds reported, next to the medians
of the figures. The cost model adds expected costs, so it predicts a mean: the target compares
the modelled TPOT (`modeled_tpot_seconds`, decode time / decode tokens) with the engine's mean
step time (`tpot_mean_seconds`); the engine's median step (`tpot_seconds`) against the modelled
median token is reported beside it. Writes <out>/simulate_accuracy.json and .md and prints the
table; exits 1 if a ratio misses the target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFETCHES = ("none", "next-gate")
TARGET = 0.25  # |modelled / measured - 1| the simulator must stay within
PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
          "One day, she saw a big dog in the park.")  # fmt: skip


@dataclass
class Row:
    prefetch: str
    measured_tpot_ms: float  # engine tpot_mean_seconds (mean step), median over rounds
    modeled_tpot_ms: float  # modeled_tpot_seconds (decode time / tokens), median over rounds
    ratio: float  # median over rounds of modelled / measured: the target
    measured_median_ms: float  # engine tpot_seconds (median step)
    modeled_median_ms: float  # modelled median over decode tokens
    ratio_median: float  # median over rounds of modelled / measured (medians)
    compute_ms_per_layer: float  # calibrated, median over rounds
    read_ms_per_expert: float  # latency + expert bytes / bandwidth, median over rounds
    read_cpu_ms: float  # compute a read adds, median over rounds
    engine_hit_rate: float
    replay_hit_rate: float
    engine_misses: int
    replay_misses: int
    engine_read_mib: float
    replay_read_mib: float
    engine_stall_ms_per_token: float
    replay_wait_ms_per_token: float
    within_target: bool
    rounds: list[dict] = field(default_factory=list)


@dataclass
class Report:
    model: str
    budget: str
    policy: str
    tokens: int
    rounds: int
    steps: int
    command: str
    seconds: float
    rows: list[Row]


# --------------------------------------------------------------------------------------------------
# one measurement, in a subprocess
# --------------------------------------------------------------------------------------------------
def worker(cfg: dict) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from expertcache.config import EngineConfig
    from expertcache.engine import Engine
    from expertcache.sim.hardware import Hardware
    from expertcache.sim.measure import measure
    from expertcache.sim.recorder import Recorder
    from expertcache.sim.simulate import Stream, modeled_token_seconds, replay

    torch.set_num_threads(1)
    prefetch = cfg["prefetch"]

    def calibrate() -> Hardware:
        return measure(cfg["model"], steps=cfg["steps"], prefetch=prefetch)

    before = calibrate()
    engine_cfg = EngineConfig(model=cfg["model"], expert_budget=cfg["budget"], cache_policy=cfg["policy"],
                              prefetch=prefetch, io="direct", num_threads=1)  # fmt: skip
    with Engine(engine_cfg) as engine:
        with Recorder(engine) as rec:
            result = engine.generate(PROMPT, max_new_tokens=cfg["tokens"], greedy=False, seed=0, stop_at_eos=False)
        stats, budget_bytes, expert_bytes = result.stats, engine.budget_bytes, engine.checkpoint.expert_bytes
    after = calibrate()
    mean = {k: (getattr(before, k) + getattr(after, k)) / 2 for k in
            ("bandwidth_bytes_per_s", "latency_seconds", "layer_compute_seconds", "read_cpu_seconds")}
    hw = Hardware("measured", before.description, **mean)
    stream = Stream(rec.trace)
    r = replay(stream, cfg["policy"], budget_bytes, mode="engine", prefetch=prefetch != "none", hardware=hw)
    tokens = modeled_token_seconds(r, stream, hw)
    waits = sum(r.decode_waits) if r.decode_waits is not None else sum(hw.load_seconds(n, b) for n, b in r.decode_loads)
    return {
        "measured_tpot": stats["tpot_seconds"],
        "measured_mean": stats["tpot_mean_seconds"],
        "modeled_tpot": sorted(tokens)[len(tokens) // 2],
        "modeled_mean": sum(tokens) / len(tokens),
        "hardware": {"before": before.to_dict(), "after": after.to_dict(), "used": hw.to_dict()},
        "read_seconds_per_expert": hw.load_seconds(1, expert_bytes),
        "engine": {k: stats[k] for k in ("lookups", "hits", "misses", "bytes_read", "stall_seconds", "tokens",
                                         "prefetch_issued", "prefetch_used", "prefetch_late", "prefetch_wasted",
                                         "prefetch_cancelled", "hit_rate")},  # fmt: skip
        "replay": {"lookups": r.lookups, "hits": r.hits, "misses": r.misses, "bytes_read": r.bytes_read,
                   "wait_seconds": waits, **(r.prefetch or {})},  # fmt: skip
        "decode_tokens": stream.decode_tokens,
    }


def _run_worker(cfg: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", EXPERTCACHE_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def _row(prefetch: str, runs: list[dict]) -> Row:
    med = statistics.median
    ratios = [r["modeled_mean"] / r["measured_mean"] for r in runs]
    ratios_median = [r["modeled_tpot"] / r["measured_tpot"] for r in runs]
    mib = 1 / (1 << 20)
    ratio = med(ratios)
    return Row(
        prefetch=prefetch,
        measured_tpot_ms=1e3 * med(r["measured_mean"] for r in runs),
        modeled_tpot_ms=1e3 * med(r["modeled_mean"] for r in runs),
        ratio=ratio,
        measured_median_ms=1e3 * med(r["measured_tpot"] for r in runs),
        modeled_median_ms=1e3 * med(r["modeled_tpot"] for r in runs),
        ratio_median=med(ratios_median),
        compute_ms_per_layer=1e3 * med(r["hardware"]["used"]["layer_compute_seconds"] for r in runs),
        read_ms_per_expert=1e3 * med(r["read_seconds_per_expert"] for r in runs),
        read_cpu_ms=1e3 * med(r["hardware"]["used"]["read_cpu_seconds"] for r in runs),
        engine_hit_rate=med(r["engine"]["hit_rate"] for r in runs),
        replay_hit_rate=med(r["replay"]["hits"] / r["replay"]["lookups"] for r in runs),
        engine_misses=int(med(r["engine"]["misses"] for r in runs)),
        replay_misses=int(med(r["replay"]["misses"] for r in runs)),
        engine_read_mib=med(r["engine"]["bytes_read"] for r in runs) * mib,
        replay_read_mib=med(r["replay"]["bytes_read"] for r in runs) * mib,
        engine_stall_ms_per_token=1e3 * med(r["engine"]["stall_seconds"] / r["decode_tokens"] for r in runs),
        replay_wait_ms_per_token=1e3 * med(r["replay"]["wait_seconds"] / r["decode_tokens"] for r in runs),
        within_target=abs(ratio - 1) <= TARGET,
        rounds=runs,
    )  # fmt: skip


def run(args) -> Report:
    sys.path.insert(0, str(REPO))
    from expertcache.engine import demo_model_dir

    t0 = time.perf_counter()
    model = str(Path(args.model).resolve()) if args.model else str(demo_model_dir())
    base = {"model": model, "budget": args.budget, "policy": args.policy, "tokens": args.tokens, "steps": args.steps}
    runs: dict[str, list[dict]] = {p: [] for p in PREFETCHES}
    for i in range(args.rounds):
        for p in PREFETCHES if i % 2 == 0 else PREFETCHES[::-1]:
            res = _run_worker(dict(base, prefetch=p))
            runs[p].append(res)
            print(f"round {i + 1}/{args.rounds} {p:>9}: measured {1e3 * res['measured_mean']:.2f} ms, "
                  f"modelled {1e3 * res['modeled_mean']:.2f} ms ({res['modeled_mean'] / res['measured_mean']:.3f}); "
                  f"medians {1e3 * res['measured_tpot']:.2f} / {1e3 * res['modeled_tpot']:.2f} ms", flush=True)  # fmt: skip
    command = "python benchmarks/simulate_accuracy.py " + " ".join(sys.argv[1:])
    return Report(model, args.budget, args.policy, args.tokens, args.rounds, args.steps, command.strip(),
                  time.perf_counter() - t0, [_row(p, runs[p]) for p in PREFETCHES])  # fmt: skip


def markdown(rep: Report) -> str:
    lines = [
        f"# Simulator accuracy: modelled vs measured TPOT ({Path(rep.model).name}, {rep.budget} budget, "
        f"{rep.policy}, {rep.tokens} tokens, cold store, io direct)",
        "",
        f"`{rep.command}` ({rep.rounds} rounds, medians over rounds; ratio = modelled / measured, per round, then the "
        "median; TPOT = mean time per output token, the target; median = the median token)",
        "",
        "| prefetch | measured TPOT ms | modelled TPOT ms | ratio | measured median ms | modelled median ms | ratio (medians) "
        "| compute ms/layer | read ms/expert | read cpu ms | hit rate engine / replay | misses engine / replay "
        "| read MiB engine / replay | stall ms/token engine / modelled wait | within 25% |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep.rows:
        lines.append(
            f"| {r.prefetch} | {r.measured_tpot_ms:.2f} | {r.modeled_tpot_ms:.2f} | {r.ratio:.3f} | {r.measured_median_ms:.2f} "
            f"| {r.modeled_median_ms:.2f} | {r.ratio_median:.3f} | {r.compute_ms_per_layer:.3f} | {r.read_ms_per_expert:.3f} | {r.read_cpu_ms:.3f} "
            f"| {r.engine_hit_rate:.3f} / {r.replay_hit_rate:.3f} | {r.engine_misses} / {r.replay_misses} "
            f"| {r.engine_read_mib:.1f} / {r.replay_read_mib:.1f} "
            f"| {r.engine_stall_ms_per_token:.2f} / {r.replay_wait_ms_per_token:.2f} | {'yes' if r.within_target else 'NO'} |"
        )
    lines += ["", "Per round, modelled / measured TPOT (means):", ""]
    for r in rep.rows:
        per = ", ".join(f"{x['modeled_mean'] / x['measured_mean']:.3f}" for x in r.rounds)
        lines.append(f"- {r.prefetch}: {per}")
    lines += ["", f"{rep.seconds:.0f} s in all."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--budget", default="50%", help="expert budget (default 50%%)")
    p.add_argument("--policy", default="lfu", help="cache policy (default lfu)")
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, prefetch settings alternating (default 5)")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per compute calibration (default 32)")
    p.add_argument("--out", default=str(REPO / "results" / "simulate_accuracy"), help="output directory")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    rep = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate_accuracy.json").write_text(json.dumps(asdict(rep), indent=1))
    md = markdown(rep)
    (out / "simulate_accuracy.md").write_text(md)
    print()
    print(md)
    return 0 if all(r.within_target for r in rep.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
