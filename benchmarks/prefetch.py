#!/usr/bin/env python
"""Prefetch benchmark: decode TPOT of every predictor at 25% and 50% expert budgets next to
on-demand loading (none) and all experts resident (100%), and prefill of a long prompt at 25% and
50% with and without pipelining (layer l+1's experts loaded behind layer l's compute), in one run.
Each comparison also reports its bound: all experts resident, what a perfect prefetch that cost
nothing would reach.

    python benchmarks/prefetch.py [--model DIR] [--out results/prefetch] [--rounds 3] [--tokens 64]
                                  [--depth 1,2] [--prefill-tokens 512] [--prefill-budgets 25%,50%] [--quick]

The model is the bundled demo model unless --model says otherwise. Predictor files (default-vector,
estimator, learned) are trained first with `expertcache train-predictor` on TinyStories train text
unless already in <out>/predictors/; decoding and prefill run on TinyStories validation text.

The measurement: io direct (O_DIRECT: the page cache never serves an expert), 1 torch thread,
OMP_NUM_THREADS=1. The machine is shared (other jobs come and go within seconds), so the
configurations that are compared run in lockstep: one subprocess per group (decode at 25%; decode
at 50% with 100%; prefill) holds one engine per configuration, each with its own cache and reader
threads, and takes their decode steps (or prefill prompts) in turn, the first one rotating; a load
burst then slows every configuration alike. Each round starts fresh subprocesses (cold caches);
figures are medians over rounds, ratios against none are taken per round and their median
reported. Decode: a warm-up generation on another prompt per engine, counters zeroed (the cache
keeps what it loaded, as in steady serving), a 32-token prompt, then --tokens greedy steps; TPOT is
the median step time. Exactness is checked on the way: every engine must decode the same tokens.
Prefill: a warm-up prompt, then --prefill-prompts prompts of --prefill-tokens tokens; time to
first token, median over prompts.

A checkpoint without a tokenizer (benchmarks/decode.py's 1 GB Mixtral-shaped one, random weights)
gets a seeded stream of uniform random token ids instead of text, decodes by sampling (temperature
1, one seeded generator per engine: a greedy random model falls into a loop of a few tokens, which
would flatter every cache), and its predictor files are trained from a trace recorded on random-id
documents (`expertcache train-predictor --trace`). Peak RSS is not reported (engines share a process; see
benchmarks/decode.py). Writes <out>/prefetch.json and <out>/prefetch.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINED = ("default-vector", "estimator", "learned")
PREDICTORS = ("next-gate", "default-vector", "estimator", "learned", "history")


@dataclass
class Row:
    phase: str  # "decode" or "prefill"
    budget: str
    prefetch: str
    depth: int
    seconds: float | None  # decode: median TPOT; prefill: median TTFT
    ratio_vs_none: float | None  # median over rounds of seconds / none's seconds at the same budget
    hit_rate: float | None
    precision: float | None  # prefetches used / issued
    recall: float | None  # lookups served by a prefetch / lookups
    useful_mib: float
    wasted_mib: float
    read_mib: float
    stall_seconds: float
    rounds: list[float] = field(default_factory=list)
    round_ratios: list[float] = field(default_factory=list)  # seconds / none's seconds, per round
    round_stall: list[float] = field(default_factory=list)  # stall seconds, per round
    layers: dict = field(default_factory=dict)  # per-layer prefetch metrics of the last round


@dataclass
class Report:
    model: str
    tokens: int
    prefill_tokens: int
    rounds: int
    depths: list[int]
    io: str
    torch_threads: int
    decode: list[Row]
    prefill: list[Row]
    best_decode_50: dict  # {"prefetch", "depth", "ratio"}
    decode_bound_50: float | None  # all-resident TPOT / none's at 50%: what a perfect, free prefetch would reach
    decode_bound_50_rounds: list[float]  # ...per round: it moves with the disk (the slower it reads, the lower)
    prefill_ratio: dict  # {budget: pipelined TTFT / none's}
    prefill_bound: dict  # {budget: all-resident TTFT / none's}: no pipelining beats it
    targets: dict  # {"decode_50_at_most_0.8": bool, "prefill_at_most_0.8": {budget: bool}}
    seconds: float
    sampled: bool = False  # no tokenizer: random-id prompts, sampled decoding


# --------------------------------------------------------------------------------------------------
# worker: one configuration in its own process
# --------------------------------------------------------------------------------------------------
def _valid_text() -> str:
    sys.path.insert(0, str(REPO))
    from expertcache.demo.corpus import TINYSTORIES_VALID, corpus_path

    return corpus_path(TINYSTORIES_VALID).read_text(encoding="utf-8")


def _engine(cfg: dict, budget: str, prefetch: str, depth: int):
    from expertcache.config import EngineConfig
    from expertcache.engine import Engine

    return Engine(EngineConfig(
        model=cfg["model"], expert_budget=budget, prefetch=prefetch, prefetch_depth=depth,
        predictor=cfg["files"].get(prefetch), io="direct", num_threads=1,
    ))  # fmt: skip


def worker(cfg: dict) -> dict:
    """Every configuration of one group ([budget, prefetch] pairs) as engines in this process, run
    in lockstep: decode steps (or prefill prompts) taken in turn, the first engine rotating, so a
    burst of load from the machine's other work hits every configuration alike."""
    import torch
    from transformers import DynamicCache

    sys.path.insert(0, str(REPO))
    from expertcache.tools.predictor_eval import prefetch_metrics

    torch.set_num_threads(1)
    engines = {tuple(c): _engine(cfg, *c) for c in cfg["configs"]}
    names = list(engines)
    first = next(iter(engines.values()))
    sample = first.tokenizer is None  # a random-weight checkpoint: random ids in, sampled tokens out
    if sample:
        ids = random_ids(first.model.config.vocab_size, 200_000)
    else:
        ids = first.encode(_valid_text()[:200_000])  # after BOS, as the engine encodes text
    gens = {n: torch.Generator().manual_seed(0) for n in names}

    def pick(n, logits) -> int:
        if not sample:
            return int(logits.argmax())
        probs = torch.softmax(logits.float(), dim=-1)
        return int(torch.multinomial(probs, 1, generator=gens[n]))
    times: dict[tuple, list[float]] = {n: [] for n in names}
    try:
        with torch.inference_mode():
            if cfg["phase"] == "decode":
                for eng in engines.values():
                    eng.generate(ids[5000:5032], max_new_tokens=16, stop_at_eos=False)  # warm-up: another prompt
                    eng.reset_stats()
                prompt = torch.tensor([ids[:32]])
                past = {n: DynamicCache(config=engines[n].model.config) for n in names}
                nxt, decoded = {}, {n: [] for n in names}
                for n in names:
                    out = engines[n].model(input_ids=prompt, past_key_values=past[n], use_cache=True, logits_to_keep=1)
                    nxt[n] = pick(n, out.logits[0, -1])
                for step in range(cfg["tokens"]):
                    for n in names[step % len(names) :] + names[: step % len(names)]:
                        t0 = time.perf_counter()
                        out = engines[n].model(input_ids=torch.tensor([[nxt[n]]]), past_key_values=past[n], use_cache=True, logits_to_keep=1)
                        nxt[n] = pick(n, out.logits[0, -1])
                        times[n].append(time.perf_counter() - t0)
                        decoded[n].append(nxt[n])
                assert len({tuple(d) for d in decoded.values()}) == 1, "configurations decoded different tokens: not exact"
            else:
                n_tok = cfg["prefill_tokens"]
                for eng in engines.values():
                    eng.generate(ids[-n_tok:], max_new_tokens=1)  # warm-up prompt
                    eng.reset_stats()
                for i in range(cfg["prefill_prompts"]):
                    for n in names[i % len(names) :] + names[: i % len(names)]:
                        engines[n].generate(ids[i * n_tok : (i + 1) * n_tok], max_new_tokens=1)
                        times[n].append(engines[n].stats()["ttft_seconds"])
        out = {}
        for n in names:
            stats = engines[n].stats()
            out["|".join(map(str, n))] = {"seconds": statistics.median(times[n]), "stats": stats, "metrics": prefetch_metrics(stats)}
        return out
    finally:
        for eng in engines.values():
            eng.close()


def random_ids(vocab: int, n: int, seed: int = 1234) -> list[int]:
    """A seeded stream of uniform random token ids (special ids 0-2 skipped), for checkpoints
    without a tokenizer."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def record_worker(cfg: dict) -> dict:
    """Record a calibration trace (routing, logits, hidden states) of random-id documents on a
    checkpoint without a tokenizer; seeded apart from the benchmark's own stream."""
    import torch

    sys.path.insert(0, str(REPO))
    from expertcache.config import EngineConfig
    from expertcache.engine import Engine
    from expertcache.tools.predictor_training import record_calibration

    torch.set_num_threads(1)
    with Engine(EngineConfig(model=cfg["model"], expert_budget="100%", prefetch="none", io="buffered", num_threads=1)) as eng:
        stream = random_ids(eng.model.config.vocab_size, cfg["tokens"], seed=98765)
        docs = [stream[i : i + 256] for i in range(0, len(stream), 256)]
        trace = record_calibration(eng, docs, max_tokens=cfg["tokens"], window=256, progress=False)
    trace.save(cfg["path"])
    return {"path": cfg["path"], "tokens": cfg["tokens"]}


@functools.cache
def _has_tokenizer(model: str) -> bool:
    """Whether the engine will find a tokenizer for `model` (the engine's own test, not a guess)."""
    sys.path.insert(0, str(REPO))
    from expertcache.engine import _load_tokenizer

    return _load_tokenizer(Path(model)) is not None


def _run_worker(cfg: dict, flag: str = "--worker") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", EXPERTCACHE_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, __file__, flag, json.dumps(cfg)], capture_output=True, text=True, env=env, cwd=REPO
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def ensure_predictors(model: str, out: Path, depth: int, max_tokens: int) -> dict[str, str]:
    """Predictor files for the trained kinds, trained here when missing (or for fewer distances)."""
    sys.path.insert(0, str(REPO))
    from expertcache.predictors.artefact import Artefact

    paths = {}
    for kind in TRAINED:
        path = out / "predictors" / f"predictor-{kind}.pt"
        ok = False
        if path.is_file():
            art = Artefact.load(path)
            newest = max(f.stat().st_mtime for f in Path(model).glob("*.safetensors"))
            ok = (
                art.model == model
                and path.stat().st_mtime > newest  # trained after the checkpoint was last written
                and (kind == "default-vector" or set(range(1, depth + 1)) <= set(art.depths))
            )
        if not ok:
            print(f"training {kind} predictor -> {path}", flush=True)
            cmd = [sys.executable, "-m", "expertcache", "train-predictor", "--model", model, "--kind", kind,
                   "--depth", str(depth), "--max-tokens", str(max_tokens), "--out", str(path), "--no-progress"]  # fmt: skip
            if not _has_tokenizer(model):  # no text to calibrate on: a trace of random-id documents
                trace = out / "predictors" / f"calibration-{max_tokens}.npz"
                if not trace.is_file():
                    print(f"recording a {max_tokens}-token calibration trace of random ids -> {trace}", flush=True)
                    trace.parent.mkdir(parents=True, exist_ok=True)
                    _run_worker({"model": model, "tokens": max_tokens, "path": str(trace)}, flag="--record-worker")
                cmd += ["--trace", str(trace)]
            subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
        paths[kind] = str(path)
    return paths


def _row(phase: str, budget: str, prefetch: str, depth: int, runs: list[dict], ratios: list[float]) -> Row:
    last = runs[-1]
    med = lambda key: statistics.median(r["stats"][key] for r in runs)  # noqa: E731
    mm = lambda key: statistics.median(r["metrics"][key] for r in runs if r["metrics"][key] is not None) if any(  # noqa: E731
        r["metrics"][key] is not None for r in runs) else None  # fmt: skip
    mib = 1 / (1 << 20)
    return Row(
        phase=phase, budget=budget, prefetch=prefetch, depth=depth,
        seconds=statistics.median(r["seconds"] for r in runs),
        ratio_vs_none=statistics.median(ratios) if ratios else None,
        hit_rate=med("hit_rate") if all(r["stats"]["hit_rate"] is not None for r in runs) else None,
        precision=mm("precision"), recall=mm("recall"),
        useful_mib=mm("useful_bytes") * mib, wasted_mib=mm("wasted_bytes") * mib,
        read_mib=med("bytes_read") * mib, stall_seconds=med("stall_seconds"),
        rounds=[r["seconds"] for r in runs], round_ratios=list(ratios), round_stall=[r["stats"]["stall_seconds"] for r in runs], layers=last["metrics"]["layers"],
    )  # fmt: skip


def run(args) -> Report:
    sys.path.insert(0, str(REPO))
    from expertcache.engine import demo_model_dir

    t0 = time.perf_counter()
    model = str(Path(args.model).resolve()) if args.model else str(demo_model_dir())
    out = Path(args.out)
    files = ensure_predictors(model, out, max(args.depths), args.train_tokens)
    variants = [("none", 1)] + [(p, d) for p in args.predictors for d in args.depths]
    decode_cfgs = [("100%", "none", 1)] + [(b, p, d) for b in ("25%", "50%") for p, d in variants]
    # all experts resident: the bound pipelining approaches when compute, not I/O, sets the pace
    prefill_cfgs = [(b, p, d) for b in args.prefill_budgets for p, d in [("none", 1), (args.prefill_predictor, min(args.depths))]]
    prefill_cfgs.append(("100%", "none", 1))
    base = {"model": model, "tokens": args.tokens, "prefill_tokens": args.prefill_tokens,
            "prefill_prompts": args.prefill_prompts, "files": files}  # fmt: skip
    decode: dict[tuple, list] = {c: [] for c in decode_cfgs}
    prefill: dict[tuple, list] = {c: [] for c in prefill_cfgs}
    groups = [("decode", [c for c in decode_cfgs if c[0] == "25%"], decode),
              ("decode", [c for c in decode_cfgs if c[0] != "25%"], decode),
              ("prefill", prefill_cfgs, prefill)]  # fmt: skip
    _run_worker(dict(base, phase="decode", configs=[("50%", "none", 1)], tokens=4))  # throwaway: warm disk, CPU, imports
    for r in range(args.rounds):
        for phase, configs, table in groups:
            result = _run_worker(dict(base, phase=phase, configs=configs if r % 2 == 0 else configs[::-1]))
            for c in configs:
                table[c].append(result["|".join(map(str, c))])
                print(f"round {r + 1} {phase} {c[0]:>4} {c[1]:<15} d{c[2]} {1000 * table[c][-1]['seconds']:.2f} ms", flush=True)

    def ratios(table, c, budget=None):
        none = table.get((budget or c[0], "none", 1))
        return [a["seconds"] / b["seconds"] for a, b in zip(table[c], none)] if none else []

    decode_rows = [_row("decode", *c, decode[c], ratios(decode, c)) for c in decode_cfgs]
    prefill_rows = [_row("prefill", *c, prefill[c], ratios(prefill, c) if c[0] != "100%" else []) for c in prefill_cfgs]
    at50 = [r for r in decode_rows if r.budget == "50%" and r.prefetch != "none"]
    best = min(at50, key=lambda r: r.ratio_vs_none)
    resident = ("100%", "none", 1)
    bound = lambda table, b: statistics.median(ratios(table, resident, b)) if b in [c[0] for c in table] else None  # noqa: E731
    pipelined = {r.budget: r.ratio_vs_none for r in prefill_rows if r.prefetch != "none"}
    return Report(
        model=model, tokens=args.tokens, prefill_tokens=args.prefill_tokens, rounds=args.rounds, depths=args.depths,
        io="direct", torch_threads=1, decode=decode_rows, prefill=prefill_rows,
        best_decode_50={"prefetch": best.prefetch, "depth": best.depth, "ratio": best.ratio_vs_none},
        decode_bound_50=bound(decode, "50%"), decode_bound_50_rounds=ratios(decode, resident, "50%"),
        prefill_ratio=pipelined, prefill_bound={b: bound(prefill, b) for b in args.prefill_budgets},
        targets={"decode_50_at_most_0.8": best.ratio_vs_none <= 0.8,
                 "prefill_at_most_0.8": {b: r is not None and r <= 0.8 for b, r in pipelined.items()}},
        seconds=time.perf_counter() - t0, sampled=not _has_tokenizer(model),
    )  # fmt: skip


def markdown(rep: Report) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    lines = [
        f"# Prefetch benchmark ({Path(rep.model).name}, io {rep.io}, {rep.torch_threads} torch thread, depths {rep.depths}, "
        f"median of {rep.rounds} rounds)",
        "",
        f"Decode: {rep.tokens} {'sampled (temperature 1, seeded)' if rep.sampled else 'greedy'} tokens after a 32-token prompt"
        f"{' of random ids (no tokenizer)' if rep.sampled else ''}.",
        "",
        "| budget | prefetch | depth | TPOT ms | vs none | hit rate | precision | recall | useful MiB | wasted MiB | read MiB | stall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep.decode:
        lines.append(
            f"| {r.budget} | {r.prefetch} | {r.depth} | {1000 * r.seconds:.2f} | {'-' if r.ratio_vs_none is None else f'{r.ratio_vs_none:.2f}'} | "
            f"{pct(r.hit_rate)} | {pct(r.precision)} | {pct(r.recall)} | {r.useful_mib:.1f} | {r.wasted_mib:.1f} | "
            f"{r.read_mib:.1f} | {r.stall_seconds:.2f} |"
        )
    lines += ["", f"Prefill: {rep.prefill_tokens}-token prompts, time to first token.", "",
              "| budget | prefetch | TTFT ms | vs none | hit rate | read MiB | stall s |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rep.prefill:
        lines.append(
            f"| {r.budget} | {r.prefetch} | {1000 * r.seconds:.1f} | {'-' if r.ratio_vs_none is None else f'{r.ratio_vs_none:.2f}'} | "
            f"{pct(r.hit_rate)} | {r.read_mib:.1f} | {r.stall_seconds:.2f} |"
        )
    b = rep.best_decode_50
    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    lines += ["", f"Best predictor at 50%: {b['prefetch']} (depth {b['depth']}) at {b['ratio']:.2f} x none (target <= 0.8: "
              f"{met(rep.targets['decode_50_at_most_0.8'])}); all experts resident: {rep.decode_bound_50:.2f} x none, "
              "what a perfect prefetch that cost nothing would reach."]  # fmt: skip
    best = next(r for r in rep.decode if r.budget == "50%" and (r.prefetch, r.depth) == (b["prefetch"], b["depth"]))
    none50 = next(r for r in rep.decode if r.budget == "50%" and r.prefetch == "none")
    lines.append("Per round, best / none: " + ", ".join(f"{x:.2f}" for x in best.round_ratios)
                 + "; all resident / none: " + ", ".join(f"{x:.2f}" for x in rep.decode_bound_50_rounds)
                 + "; none's stall per token (ms): "
                 + ", ".join(f"{1000 * x / rep.tokens:.1f}" for x in none50.round_stall) + ".")  # fmt: skip
    for budget, ratio in rep.prefill_ratio.items():
        lines.append(f"Prefill at {budget} with pipelining: {ratio:.2f} x none (target <= 0.8: "
                     f"{met(rep.targets['prefill_at_most_0.8'][budget])}); all experts resident: "
                     f"{rep.prefill_bound[budget]:.2f} x none, the bound pipelining can approach but not pass.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--out", default=str(REPO / "results" / "prefetch"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per run")
    p.add_argument("--depth", default="1", help="prefetch depths to run every predictor at, e.g. 1,2 (default 1)")
    p.add_argument("--predictors", default=",".join(PREDICTORS))
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--prefill-prompts", type=int, default=3)
    p.add_argument("--prefill-budgets", default="25%,50%", help="expert budgets of the prefill comparison (default 25%%,50%%)")
    p.add_argument("--prefill-predictor", default="next-gate", help="predictor of the pipelined prefill (default next-gate)")
    p.add_argument("--train-tokens", type=int, default=20000, help="calibration tokens for predictor files")
    p.add_argument("--quick", action="store_true", help="1 round, 16 tokens, 1 prefill prompt: a smoke run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--record-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.record_worker is not None:
        print(json.dumps(record_worker(json.loads(args.record_worker))))
        return 0
    args.predictors = [x for x in args.predictors.split(",") if x]
    args.depths = sorted({int(x) for x in args.depth.split(",") if x.strip()})
    args.prefill_budgets = [x.strip() for x in args.prefill_budgets.split(",") if x.strip()]
    if args.quick:
        args.rounds, args.tokens, args.prefill_prompts = 1, 16, 1
    rep = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefetch.json").write_text(json.dumps(asdict(rep), indent=1))
    (out / "prefetch.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
