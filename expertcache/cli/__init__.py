"""Command line: `expertcache <command>`. All argparse and printing live in this package.

Each command is a module here with HELP, add_arguments(parser) and run(args) -> exit status,
imported only when chosen (so `expertcache --help` is instant). Every user error is one line on
stderr and a non-zero exit; figures go to stdout, as JSON with --json.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

EXIT_USAGE = 2

COMMANDS: dict[str, str] = {  # command -> module of this package
    "generate": "generate",
    "info": "info",
    "eval": "eval",
    "train-demo": "demo",
    "calibrate": "calibrate",
    "tradeoff": "tradeoff",
    "trace": "trace",
    "simulate": "simulate",
    "train-predictor": "train_predictor",
    "eval-predictors": "eval_predictors",
    "quantize": "quantize",
    "serve": "serve",
    "refactor": "refactor",
}
SUMMARIES = {  # shown by `expertcache --help` without importing the command modules
    "generate": "generate text through the offloaded engine",
    "info": "describe a checkpoint: experts, bytes, minimum budget",
    "eval": "perplexity or multiple-choice accuracy through the offloaded engine",
    "train-demo": "train the bundled demo model from the shared corpus ($EXPERTCACHE_DATA/corpus)",
    "calibrate": "estimate per-layer routing sensitivity and write adaptive-gating thresholds",
    "tradeoff": "sweep the lossy routing policies: quality against misses and time per token",
    "trace": "record the routing of a generation into a trace file",
    "simulate": "replay a routing trace through the cache policies with a cost model",
    "train-predictor": "fit a predictor file (learned, estimator, default-vector) from a trace or calibration text",
    "eval-predictors": "precision and recall of every predictor on held-out text",
    "quantize": "write a copy of a checkpoint with int8 or int4 experts (compressed-tensors pack-quantized)",
    "serve": "an OpenAI-compatible HTTP server with continuous, expert-aware batching",
    "refactor": "split a dense Llama/Mistral/Qwen2 checkpoint into an MoE checkpoint (Read-ME), with a distillation fine-tune",
}


def command(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (no usage dump), exit status EXIT_USAGE."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# options whose value may start with '-' ("--expert-budget -5GB"): bound as --opt=value before
# argparse sees them, so the value reaches its own validation instead of reading as an option
_DASH_VALUE_OPTIONS = ("--expert-budget", "--memory-limit", "--memory-reserve", "--prompt-ids")


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
    """The parser; only the `commands` named get their flags (None: all)."""
    parser = _Parser(prog="expertcache", description="Run MoE models whose experts do not fit in memory.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        p = sub.add_parser(name, help=SUMMARIES[name], description=SUMMARIES[name])
        if commands is None or name in commands:
            command(name).add_arguments(p)
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
    from ..errors import ExpertCacheError

    try:
        return command(args.command).run(args)
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
