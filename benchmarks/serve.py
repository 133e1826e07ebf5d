#!/usr/bin/env python
"""Server benchmark: `expertcache serve` under 1, 4, 16 and 32 concurrent streaming clients on
127.0.0.1, FCFS against expert-aware admission, at expert budgets of 25% and 50%, on the demo
model and the 1 GB synthetic checkpoint (benchmarks/decode.py builds it).

    python benchmarks/serve.py [--models demo,1gb] [--budgets 25,50] [--clients 1,4,16,32]
                               [--batching fcfs,expert-aware] [--max-batch 16] [--tokens 32]
                               [--requests 2] [--rounds 1] [--time-limit 120] [--out results/serve] [--quick]
    python benchmarks/serve.py --report-only     (tables and plot from the last JSON)

Each measurement starts a fresh server (its own process: 1 thread, O_DIRECT reads, an empty
cache), sends one warm-up request, then C client threads each stream `--requests` completions
one after another (max_tokens `--tokens`, temperature 0.8 with a per-request seed so a random
model does not fall into a greedy loop; no client starts a request after `--time-limit` s). Per
request the client records the time to the first token and the time per token after it;
aggregate tokens/s is all the tokens generated over the wall time from the first request to the
last token. Bytes read and tokens generated come from the server's /metrics, before and after.
With `--rounds N` every cell is measured N times, the rounds interleaved (each round runs every
client count and batching once, each on a fresh server), and a cell reports the median of its
rounds for each figure; a ratio between cells (16 clients over one) is the median of the ratios
measured round by round, with their range: one client's cell is a ~0.5 s measurement whose rate
moves with the shared machine's.

Prompts: the demo model gets 48-token-ish passages from three sources of the shared corpus
(TinyStories, WikiText-2, public-domain books; $EXPERTCACHE_DATA), client i taking source i mod 3,
so requests differ in the experts they use; the 1 GB checkpoint (no tokenizer) gets 32 token ids
drawn, per client, from one of three disjoint thirds of its vocabulary.

Targets (issue 14): at 16 clients and a 50% budget, aggregate throughput >= 4x one client's; at
32 clients with --max-batch 16 (a queue longer than the batch) expert-aware reads >= 20% fewer
bytes per token than FCFS or gives >= 1.2x its throughput, with p99 TTFT no worse than 1.5x.
Writes serve.json, serve.md and serve.png in --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic checkpoint's builder lives with the tests
sys.path.append(str(REPO))

from helpers.synthetic import FINE_SPEC, CkptSpec, build_checkpoint  # noqa: E402

PROMPT_TOKENS = 32
SOURCES = ("tinystories/tinystories_valid_cased.txt", "wikitext2/wiki.test.raw", "public_domain")


def percentile(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------
def demo_prompts(per_source: int = 32) -> list[list[str]]:
    """Passages of ~40 words from each source, a list per source."""
    from expertcache.demo.corpus import data_dir

    root = data_dir()
    if root is None:
        raise SystemExit("serve.py: the demo prompts come from the shared corpus: set EXPERTCACHE_DATA or put ../shared beside the checkout")
    out = []
    rng = random.Random(0)
    for src in SOURCES:
        path = root / "corpus" / src
        files = sorted(p for p in (path.rglob("*.txt") if path.is_dir() else [path]) if "SOURCE" not in p.name)
        if not files:
            raise SystemExit(f"serve.py: no text in {path}")
        words = " ".join(f.read_text(encoding="utf-8", errors="replace")[:400_000] for f in files[:3]).split()
        passages = []
        for _ in range(per_source):
            i = rng.randrange(max(1, len(words) - 50))
            passages.append(" ".join(words[i : i + 40]))
        out.append(passages)
    return out


def id_prompts(vocab: int, per_source: int = 32) -> list[list[list[int]]]:
    rng = random.Random(0)
    third = vocab // 3
    return [[[rng.randrange(s * third, (s + 1) * third) for _ in range(PROMPT_TOKENS)] for _ in range(per_source)] for s in range(3)]


# ------------------------------------------------------------------------------------------------
# one measurement
# ------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, model: str | None, budget: str, batching: str, max_batch: int, max_queue: int,
                 extra: list[str] = ()) -> None:
        cmd = [sys.executable, "-m", "expertcache", "serve", "--port", "0", "--expert-budget", budget, "--batching", batching,
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--max-tokens-limit", "512", "--drain-seconds", "2"]
        if model:
            cmd += ["--model", model]
        cmd += list(extra)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "EXPERTCACHE_THREADS": "1",
               "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if "serving" not in line:
            self.proc.kill()
            raise SystemExit(f"serve.py: the server did not start: {line!r} {self.proc.stderr.read()[-1500:]}")
        self.port = int(line.split("127.0.0.1:")[1].split("/")[0])
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def metrics(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stream_completion(port: int, body: dict) -> tuple[list[float], int | None]:
    """POST a streaming completion with the standard library (a client light enough not to take
    the server's CPU on a 2-core machine): the arrival time of each text chunk, and the usage."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    times, usage = [], None
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        obj = json.loads(line[6:])
        if obj.get("choices") and obj["choices"][0].get("text"):
            times.append(time.perf_counter())
        if obj.get("usage"):
            usage = obj["usage"]["completion_tokens"]
    conn.close()
    return times, usage


def client_prompt(prompts: list[list], client: int, k: int):
    """Client `client`'s `k`-th prompt: a source per client (in turn), a passage per request."""
    src = prompts[client % len(prompts)]
    return src[(client // len(prompts) + k * 7) % len(src)]


def measure(server: Server, prompts: list[list], clients: int, requests: int, tokens: int, time_limit: float) -> dict:
    stream_completion(server.port, {"prompt": prompts[0][0], "max_tokens": 4, "temperature": 0})  # warm-up
    before = server.metrics()
    t0 = time.perf_counter()
    stop_at = t0 + time_limit

    def one_client(c: int) -> list[dict]:
        out = []
        for k in range(requests):
            if time.perf_counter() > stop_at:
                break
            prompt = client_prompt(prompts, c, k)
            ts = time.perf_counter()
            times, usage = stream_completion(server.port, {"prompt": prompt, "max_tokens": tokens, "temperature": 0.8,
                                                           "seed": 1000 * c + k})
            if times:
                out.append({"ttft": times[0] - ts, "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
                            "tokens": usage or len(times), "end": times[-1]})
        return out

    with cf.ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    wall = max(r["end"] for r in done) - t0
    after = server.metrics()
    generated = after["expertcache_generated_tokens_total"] - before["expertcache_generated_tokens_total"]
    read = after["expertcache_cache_bytes_read_total"] - before["expertcache_cache_bytes_read_total"]
    tpots = [r["tpot"] for r in done if r["tpot"] is not None]
    ttfts = [r["ttft"] for r in done]
    return {
        "requests": len(done), "tokens": int(sum(r["tokens"] for r in done)), "wall_s": wall,
        "tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
        "tpot_p50_s": percentile(tpots, 0.5), "tpot_p99_s": percentile(tpots, 0.99),
        "bytes_per_token": read / generated if generated else None,
        "mean_step_s": (after["expertcache_step_seconds_sum"] - before["expertcache_step_seconds_sum"])
                       / max(1.0, after["expertcache_step_seconds_count"] - before["expertcache_step_seconds_count"]),
        "lookups_per_step": (after["expertcache_cache_hits_total"] + after["expertcache_cache_misses_total"]
                             - before["expertcache_cache_hits_total"] - before["expertcache_cache_misses_total"])
                            / max(1.0, after["expertcache_step_seconds_count"] - before["expertcache_step_seconds_count"]),
        "busy_share": (after["expertcache_step_seconds_sum"] - before["expertcache_step_seconds_sum"]) / wall,
        "mean_batch": (after["expertcache_batch_size_sum"] - before["expertcache_batch_size_sum"])
                      / max(1.0, after["expertcache_batch_size_count"] - before["expertcache_batch_size_count"]),
    }


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _ms(v) -> str:
    return "-" if v is None else f"{1000 * v:.0f}"


def markdown(rep: dict) -> str:
    modes = ("fcfs", "expert-aware")
    n = rep.get("rounds", 1)
    rounds = f", the median of {n} interleaved rounds" if n > 1 else ""
    lines = [f"Server benchmark (`python benchmarks/serve.py{' --server-flags ' + repr(rep['server_flags']) if rep.get('server_flags') else ''}`): "
             f"max batch {rep['max_batch']}, {rep['tokens']} tokens per request, {rep['requests']} requests per client "
             f"(streamed), {rep['cpus']} CPUs, 1 thread, O_DIRECT reads{rounds}. "
             "Each cell: FCFS / expert-aware. tokens/s: aggregate; "
             "x1: over one client's (same batching; with rounds, the median of the rounds' ratios); TTFT and TPOT in ms; MB/tok: expert bytes read per generated token; "
             "GB/s: the rate those bytes were read at (MB/tok x tokens/s: the disk's share of the differences).", ""]
    for model, budgets in rep["results"].items():
        lines += [f"**{model}**", "",
                  "| budget | clients | tokens/s | x1 | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | MB/tok | GB/s | mean batch |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for budget, per_mode in budgets.items():
            clients = sorted({c for m in per_mode.values() for c in m}, key=int)
            for c in clients:
                rs = [per_mode.get(m, {}).get(c) for m in modes]

                def cell(fmt, rs=rs):
                    return " / ".join("-" if r is None else fmt(r) for r in rs)

                def x1(r, m):
                    one = per_mode.get(m, {}).get("1")
                    return f"{paired_ratio(r, one)[0]:.2f}" if one else "-"

                lines.append("| " + " | ".join([
                    budget, c, cell(lambda r: f"{r['tokens_per_s']:.1f}"),
                    " / ".join("-" if r is None else x1(r, m) for r, m in zip(rs, modes)),
                    cell(lambda r: _ms(r["ttft_p50_s"])), cell(lambda r: _ms(r["ttft_p99_s"])),
                    cell(lambda r: _ms(r["tpot_p50_s"])), cell(lambda r: _ms(r["tpot_p99_s"])),
                    cell(lambda r: "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token'] / 1e6:.1f}"),
                    cell(lambda r: "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token'] * r['tokens_per_s'] / 1e9:.2f}"),
                    cell(lambda r: f"{r['mean_batch']:.1f}")]) + " |")
        lines.append("")
    lines += ["Targets:", ""]
    for t in rep["targets"]:
        lines.append(f"- {t['what']}: {t['value']} ({'met' if t['met'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


def median_cell(rs: list[dict]) -> dict:
    """One cell from its rounds: each figure's median over them (None where a round has none), and
    each round's tokens/s in order (`rounds`: ratios between cells pair them round by round)."""
    out = {}
    for key in rs[0]:
        values = [r[key] for r in rs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["rounds"] = [r["tokens_per_s"] for r in rs]
    return out


def paired_ratio(a: dict, b: dict) -> tuple[float, float, float]:
    """a's tokens/s over b's: the median of the ratios round by round, its lowest and its highest
    (cells of one round: their one ratio, three times)."""
    ra, rb = a.get("rounds") or [a["tokens_per_s"]], b.get("rounds") or [b["tokens_per_s"]]
    ratios = [x / y for x, y in zip(ra, rb)]
    return statistics.median(ratios), min(ratios), max(ratios)


def targets(rep: dict) -> list[dict]:
    out = []
    for model, budgets in rep["results"].items():
        fc = budgets.get("50%", {}).get("fcfs", {})
        if "1" in fc and "16" in fc:
            ratio, lo, hi = paired_ratio(fc["16"], fc["1"])
            spread = f" ({lo:.2f}-{hi:.2f} over {len(fc['16']['rounds'])} rounds)" if len(fc["16"].get("rounds") or ()) > 1 else ""
            out.append({"what": f"{model}, 50%, FCFS: 16 clients' throughput over one client's (>= 4)", "value": f"{ratio:.2f}x{spread}",
                        "met": ratio >= 4})
        for budget, modes in budgets.items():
            big = str(max((int(c) for c in modes.get("fcfs", {})), default=0))
            f, e = modes.get("fcfs", {}).get(big), modes.get("expert-aware", {}).get(big)
            if f and e and int(big) > rep["max_batch"]:
                fewer = 1 - e["bytes_per_token"] / f["bytes_per_token"] if f["bytes_per_token"] else 0.0
                faster = paired_ratio(e, f)[0]
                p99 = e["ttft_p99_s"] / f["ttft_p99_s"]
                out.append({"what": f"{model}, {budget}, {big} clients: expert-aware vs FCFS (>= 20% fewer bytes/token or >= 1.2x "
                                    "throughput, p99 TTFT <= 1.5x)",
                            "value": f"{100 * fewer:.0f}% fewer bytes/token, {faster:.2f}x throughput, p99 TTFT {p99:.2f}x",
                            "met": (fewer >= 0.2 or faster >= 1.2) and p99 <= 1.5})
    return out


def plot(rep: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("serve.py: matplotlib missing: no plot (pip install matplotlib)", file=sys.stderr)
        return
    models = list(rep["results"])
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for j, model in enumerate(models):
        for budget, modes in rep["results"][model].items():
            for mode, per in modes.items():
                cs = sorted(per, key=int)
                style = "-" if mode == "fcfs" else "--"
                axes[0][j].plot([int(c) for c in cs], [per[c]["tokens_per_s"] for c in cs], style, marker="o", label=f"{budget} {mode}")
                axes[1][j].plot([int(c) for c in cs], [1000 * per[c]["ttft_p99_s"] for c in cs], style, marker="o", label=f"{budget} {mode}")
        axes[0][j].set_title(f"{model}: aggregate tokens/s")
        axes[1][j].set_title(f"{model}: p99 TTFT (ms)")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="demo,1gb", help="demo, 1gb, fine (the 4.8 GB checkpoint of 64 experts "
                                                         "top-8 a layer) and/or dir:PATH (a checkpoint with a tokenizer, "
                                                         "given the demo's prompts) or ids:PATH (one without: prompts of "
                                                         "token ids, as for 1gb; e.g. a quantized copy); default demo,1gb")
    ap.add_argument("--budgets", default="25,50", help="comma-separated percentages (default 25,50)")
    ap.add_argument("--clients", default="1,4,16,32", help="concurrent clients (default 1,4,16,32)")
    ap.add_argument("--batching", default="fcfs,expert-aware", help="admission orders to compare")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16)")
    ap.add_argument("--tokens", type=int, default=32, help="max_tokens per request (default 32)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another (default 2)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every cell this many times, interleaved; medians (default 1)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds after which clients start no request (default 120)")
    ap.add_argument("--out", default=str(REPO / "results" / "serve"), help="output folder (serve.json, serve.md, serve.png)")
    ap.add_argument("--ckpt-root", default=None, help="where the 1 GB checkpoint is cached (default results/ckpt)")
    ap.add_argument("--server-flags", default="", help="more flags for expertcache serve, e.g. \"--half-matmul float32\"")
    ap.add_argument("--quick", action="store_true", help="demo model, 50%%, 1 and 16 clients, 16 tokens")
    ap.add_argument("--report-only", action="store_true", help="rewrite serve.md and serve.png from serve.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        rep = json.loads((out / "serve.json").read_text())
    else:
        if args.quick:
            args.models, args.budgets, args.clients, args.tokens, args.requests = "demo", "50", "1,16", 16, 1
        clients = [int(c) for c in args.clients.split(",")]
        modes = [m.strip() for m in args.batching.split(",")]
        if args.rounds < 1:
            raise SystemExit("serve.py: --rounds must be at least 1")
        rep = {"server_flags": args.server_flags, "max_batch": args.max_batch, "tokens": args.tokens, "requests": args.requests,
               "rounds": args.rounds, "cpus": os.cpu_count(), "results": {}}
        for model in [m.strip() for m in args.models.split(",")]:
            if model == "demo":
                path, prompts = None, demo_prompts()
            elif model == "1gb":
                path, prompts = str(build_checkpoint(args.ckpt_root, CkptSpec())), id_prompts(CkptSpec().vocab)
            elif model == "fine":  # decode.py --fine's: 24 layers x 64 experts of 3 MiB, top-8
                path, prompts = str(build_checkpoint(args.ckpt_root, FINE_SPEC)), id_prompts(FINE_SPEC.vocab)
            elif model.startswith(("dir:", "ids:")):  # dir: with a tokenizer, the demo's prompts; ids: token-id prompts
                path = model[4:]
                if not (Path(path) / "config.json").is_file():
                    raise SystemExit(f"serve.py: {path} holds no config.json")
                prompts = demo_prompts() if model.startswith("dir:") else id_prompts(json.loads((Path(path) / "config.json").read_text())["vocab_size"])
            else:
                raise SystemExit(f"serve.py: unknown model {model!r}: demo, 1gb, fine, dir:PATH or ids:PATH")
            for b in args.budgets.split(","):
                budget = f"{b.strip()}%"
                rounds: dict[tuple[str, int], list[dict]] = {}
                for rnd in range(args.rounds):
                    for c in clients:
                        for mode in modes:  # adjacent in time: the pair sees the same machine load
                            srv = Server(path, budget, mode, args.max_batch, max_queue=max(clients) + 8, extra=args.server_flags.split())
                            try:
                                r = measure(srv, prompts, c, args.requests, args.tokens, args.time_limit)
                            finally:
                                srv.stop()
                            rounds.setdefault((mode, c), []).append(r)
                            print(f"{model} {budget} {mode:>12} {c:>2} clients{f' (round {rnd + 1})' if args.rounds > 1 else ''}: "
                                  f"{r['tokens_per_s']:.1f} tok/s, TTFT p50 {_ms(r['ttft_p50_s'])} p99 {_ms(r['ttft_p99_s'])} ms, TPOT "
                                  f"p50 {_ms(r['tpot_p50_s'])} ms, {(r['bytes_per_token'] or 0) / 1e6:.1f} MB/token, batch "
                                  f"{r['mean_batch']:.1f}, step {_ms(r['mean_step_s'])} ms, busy {r['busy_share']:.2f}", flush=True)
                for (mode, c), rs in rounds.items():
                    rep["results"].setdefault(model, {}).setdefault(budget, {}).setdefault(mode, {})[str(c)] = median_cell(rs)
        rep["targets"] = targets(rep)
        (out / "serve.json").write_text(json.dumps(rep, indent=1))
    md = markdown(rep)
    (out / "serve.md").write_text(md)
    plot(rep, out / "serve.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
