"""Command line: `expertcache <command>`; thin adapters from flags to an EngineConfig.

Every user error is one line on stderr and a non-zero exit; figures go to stdout, as JSON with
--json. Heavy modules are imported inside the commands, so `expertcache --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable

EXIT_USAGE = 2


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _set_threads(threads: int | None) -> None:
    env = os.environ.get("EXPERTCACHE_THREADS", "1")
    if threads is None and not env.strip().isdigit():
        from .errors import ExpertCacheError

        raise ExpertCacheError(f"EXPERTCACHE_THREADS must be a whole number, got {env!r}")
    n = threads if threads is not None else int(env)
    import torch

    torch.set_num_threads(max(1, n))


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every command that runs a model shares."""
    from .config import DEFAULT_CACHE_POLICY, DEFAULT_IO_THREADS

    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--expert-budget", default="50%", help="memory for experts: 50%%, 512MiB, 2GB or bytes (default 50%%)")
    p.add_argument("--cache-policy", default=DEFAULT_CACHE_POLICY,
                   help=f"eviction policy (default {DEFAULT_CACHE_POLICY}): lru, lfu, lfru, layer, layerlfu, random, "
                        "or belady (the offline optimum, for measurement)")
    p.add_argument("--trace", dest="future_trace", default=None,
                   help="with --cache-policy belady: a trace of this same run (expertcache trace), Belady's future; "
                        "without it generate runs twice, recording the future first")
    p.add_argument("--prefetch", default="next-gate",
                   help="predictor for speculative loads: none, next-gate (default), default-vector, estimator, learned, history")
    p.add_argument("--prefetch-depth", type=int, default=1, help="layers ahead to prefetch (default 1)")
    p.add_argument("--prefetch-max", type=int, default=None, help="most experts prefetched per layer per decode step (default: the whole guess)")
    p.add_argument("--predictor", default=None,
                   help="predictor file from `expertcache train-predictor` (default: MODEL/predictor-<kind>.pt)")
    p.add_argument("--io", default="direct", choices=["direct", "buffered"], help="O_DIRECT reads (default) or page-cache reads")
    p.add_argument("--io-threads", type=int, default=DEFAULT_IO_THREADS, help=f"reader threads (default {DEFAULT_IO_THREADS})")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: $EXPERTCACHE_THREADS or 1)")
    r = p.add_argument_group("routing (lossy options trade measured quality for speed; see expertcache tradeoff)")
    r.add_argument("--routing", default="exact", help="exact (default), adaptive-gating, cache-aware, cache-aware-max-rank, speculative")
    r.add_argument("--calibration", "--routing-config", dest="calibration", default=None,
                   help="adaptive-gating thresholds from `expertcache calibrate` (default: MODEL/adaptive_gating.json)")
    r.add_argument("--cache-lambda", type=float, default=0.2, help="cache-aware: bias toward resident experts (default 0.2)")
    r.add_argument("--cache-protect-top", type=int, default=2, help="cache-aware: the router's top-J are never displaced (default 2)")
    r.add_argument("--cache-max-rank", type=int, default=4, help="cache-aware-max-rank: swap in a resident expert ranked within this (default 4)")
    r.add_argument("--routing-applies-to", default=None, choices=["prefill", "decode", "both"],
                   help="phases the routing policy runs in (default: the policy's own)")


def engine_config(args: argparse.Namespace):
    from .config import EngineConfig

    return EngineConfig(
        model=args.model,
        expert_budget=args.expert_budget,
        cache_policy=args.cache_policy,
        future_trace=getattr(args, "future_trace", None),
        prefetch=args.prefetch,
        prefetch_depth=args.prefetch_depth,
        prefetch_max=getattr(args, "prefetch_max", None),
        predictor=getattr(args, "predictor", None),
        io=args.io,
        io_threads=args.io_threads,
        routing=args.routing,
        calibration=args.calibration,
        cache_lambda=args.cache_lambda,
        cache_protect_top=args.cache_protect_top,
        cache_max_rank=args.cache_max_rank,
        routing_applies_to=args.routing_applies_to,
    )


# --- generate ------------------------------------------------------------------------------------
def _add_generate(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--prompt", default="Once upon a time", help="text to continue (default: 'Once upon a time')")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt (for checkpoints without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (implies --sample)")
    p.add_argument("--json", action="store_true", help="print {text, token_ids, stats} as JSON")


def _summary(stats: dict) -> str:
    hr = f"{100 * stats['hit_rate']:.1f}%" if stats.get("hit_rate") is not None else "-"
    tpot = f"{1000 * stats['tpot_seconds']:.1f} ms" if stats.get("tpot_seconds") else "-"
    ttft = f"{stats['ttft_seconds']:.2f} s" if stats.get("ttft_seconds") is not None else "-"
    return (
        f"[expertcache] {stats['tokens']} tokens | TTFT {ttft} | TPOT {tpot} | hits {hr} "
        f"({stats['hits']}/{stats['lookups']}) | read {_fmt_bytes(stats['bytes_read'])} | "
        f"stall {stats['stall_seconds']:.2f} s | prefetch used {stats['prefetch_used']}/{stats['prefetch_issued']} | "
        f"peak RSS {_fmt_bytes(stats['peak_rss_bytes'])}"
    )


def _run_generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .errors import ExpertCacheError

    if args.max_new_tokens < 1:
        raise ExpertCacheError("--max-new-tokens must be at least 1")
    if not 0 < args.top_p <= 1:
        raise ExpertCacheError(f"--top-p must be in (0, 1], got {args.top_p}")
    _set_threads(args.threads)
    greedy = not (args.sample or args.seed is not None)
    prompt: str | list[int] = args.prompt
    if args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ExpertCacheError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
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
        result = engine.generate(
            prompt,
            max_new_tokens=args.max_new_tokens,
            greedy=greedy,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            on_token=None if args.json else stream,
        )
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats}))
    else:
        if engine.tokenizer is None:
            print(" ".join(map(str, result.token_ids)), end="")
        print()
        print(_summary(result.stats), file=sys.stderr if os.environ.get("EXPERTCACHE_SUMMARY_STDERR") else sys.stdout)
    return 0


# --- info ----------------------------------------------------------------------------------------
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def model_info(model_dir: str | None) -> dict:
    from .checkpoint import Checkpoint
    from .engine import demo_model_dir

    ckpt = Checkpoint.open(model_dir if model_dir is not None else demo_model_dir())
    eb, k, layers = ckpt.expert_bytes, ckpt.top_k, len(ckpt.sparse_layers)
    return {
        "model": str(ckpt.model_dir),
        "family": ckpt.arch.model_type,
        "layers": int(ckpt.config.num_hidden_layers),
        "sparse_layers": layers,
        "experts_per_layer": ckpt.num_experts,
        "top_k": k,
        "renormalize": ckpt.arch.renormalize(ckpt.config),
        "shared_expert": ckpt.arch.has_shared_expert,
        "expert_layout": "fused" if next(iter(ckpt.experts.values())).fused else "per-expert",
        "dtype": str(ckpt.dtype).replace("torch.", ""),
        "bytes_per_expert": eb,
        "dense_bytes": ckpt.dense_bytes,
        "total_expert_bytes": ckpt.total_expert_bytes,
        "min_budget_bytes": k * eb,
        "token_cycle_bytes": layers * k * eb,
    }


def _run_info(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    if args.json:
        print(json.dumps(info))
        return 0
    total = info["total_expert_bytes"]
    rows = [
        ("family", info["family"]),
        ("layers (sparse)", f"{info['layers']} ({info['sparse_layers']})"),
        ("experts per layer, top-k", f"{info['experts_per_layer']}, top-{info['top_k']}" + (", renormalised" if info["renormalize"] else "")),
        ("shared expert", "yes" if info["shared_expert"] else "no"),
        ("expert layout, dtype", f"{info['expert_layout']}, {info['dtype']}"),
        ("bytes per expert", _fmt_bytes(info["bytes_per_expert"])),
        ("dense bytes", _fmt_bytes(info["dense_bytes"])),
        ("all expert bytes", _fmt_bytes(total)),
        ("minimum budget", f"{_fmt_bytes(info['min_budget_bytes'])} ({100 * info['min_budget_bytes'] / total:.2f}%)"),
        ("one token cycle", f"{_fmt_bytes(info['token_cycle_bytes'])} ({100 * info['token_cycle_bytes'] / total:.1f}%)"),
    ]
    for k, v in rows:
        print(f"{k:<26} {v}")
    print(
        f"advice: budgets below one token cycle ({_fmt_bytes(info['token_cycle_bytes'])}) stream most experts every "
        "token; a frequency-aware policy (lfu, the default) keeps the hot experts resident where a global LRU falls to 0% hits"
    )
    return 0


# --- registry ------------------------------------------------------------------------------------
def _lazy(module: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """A subcommand implemented in its own module (add_arguments, run), imported only when used."""
    import importlib

    def add(p: argparse.ArgumentParser) -> None:
        importlib.import_module(f"expertcache.{module}").add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"expertcache.{module}").run(args)

    return add, run


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "generate": ("generate text through the offloaded engine", _add_generate, _run_generate),
    "info": ("describe a checkpoint: experts, bytes, minimum budget", _add_info, _run_info),
    "eval": ("perplexity or multiple-choice accuracy through the offloaded engine", *_lazy("quality")),
    "train-demo": ("train the bundled demo model from ../shared/corpus", *_lazy("train")),
    "calibrate": ("estimate per-layer routing sensitivity and write adaptive-gating thresholds", *_lazy("calibration")),
    "tradeoff": ("sweep the lossy routing policies: quality against misses and time per token", *_lazy("tradeoff")),
    "trace": ("record the routing of a generation into a trace file", *_lazy("trace")),
    "simulate": ("replay a routing trace through the cache policies with a cost model", *_lazy("simulate")),
    "train-predictor": ("fit a predictor file (learned, estimator, default-vector) from a trace or calibration text", *_lazy("predictors.train")),
    "eval-predictors": ("precision and recall of every predictor on held-out text", *_lazy("predictors.evaluate")),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (no usage dump), exit status EXIT_USAGE."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# options whose value may start with '-' ("--expert-budget -5GB"): bound as --opt=value before
# argparse sees them, so the value reaches its own validation instead of reading as an option
_DASH_VALUE_OPTIONS = ("--expert-budget", "--prompt-ids")


def _bind_dash_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _DASH_VALUE_OPTIONS and i + 1 < len(argv) and re.match(r"-[0-9.]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="expertcache", description="Run MoE models whose experts do not fit in memory.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if commands is None or name in commands:
            add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = _bind_dash_values(list(sys.argv[1:] if argv is None else argv))
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser([chosen] if chosen else [])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (EXIT_USAGE, already printed as one line)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    debug = args.debug or bool(os.environ.get("EXPERTCACHE_DEBUG"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="expertcache: %(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .errors import ExpertCacheError

    try:
        return COMMANDS[args.command][2](args)
    except ExpertCacheError as e:
        print(f"expertcache: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("expertcache: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"expertcache: internal error: {type(e).__name__}: {msg} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1
