"""expertcache tradeoff: sweep the lossy routing policies; writes tradeoff.json, .md and .png."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ..tools.settings import DROPS, LAMBDAS, RANKS
from ..tools.settings import TRADEOFF_POLICIES as POLICIES
from .flags import add_engine_arguments, engine_config


def floats(text: str) -> list[float]:
    """'0.1,0.2' -> [0.1, 0.2]."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p, expert_budget="25%")
    p.add_argument("--text", type=Path, required=True, help="text for perplexity (decode mode)")
    p.add_argument("--mc", type=Path, default=None, help="jsonl of {context, choices, label}: multiple-choice accuracy")
    p.add_argument("--out", type=Path, required=True, help="folder for tradeoff.json, tradeoff.md, tradeoff.png")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of --text to score (default 4096)")
    p.add_argument("--limit", type=int, default=100, help="multiple-choice items (default 100)")
    p.add_argument("--window", type=int, default=256, help="decode chunk length in tokens (default 256)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated (default {','.join(POLICIES)}; also pregate, for a model with a pre-gate file, "
                        "and miss-copy, added when --miss-copy DIR is given)")
    p.add_argument("--drops", type=floats, default=list(DROPS), help=f"adaptive-gating target drops (default {_csv(DROPS)})")
    p.add_argument("--lambdas", type=floats, default=list(LAMBDAS), help=f"cache-aware lambdas (default {_csv(LAMBDAS)})")
    p.add_argument("--ranks", type=floats, default=list(RANKS),
                   help=f"cache-aware-max-rank maximum ranks (default {_csv(RANKS)})")
    p.add_argument("--protect-tops", type=floats, default=None,
                   help="cache-aware J values to sweep (default: --cache-protect-top, at most top-k - 1)")
    p.add_argument("--calibration-text", type=Path, default=None,
                   help="adaptive-gating calibration text (default: the tokens of --text after the scored ones)")
    p.add_argument("--calibration-tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from ..tools.tradeoff import markdown, tradeoff, write

    result = tradeoff(
        engine_config(args), text=args.text, out_dir=args.out, mc=args.mc, max_tokens=args.max_tokens,
        limit=args.limit, window=args.window, policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        drops=args.drops, lambdas=args.lambdas, ranks=[int(r) for r in args.ranks],
        protect_tops=[int(j) for j in args.protect_tops] if args.protect_tops else None,
        calibration_text=args.calibration_text, calibration_tokens=args.calibration_tokens, progress=not args.json,
    )  # fmt: skip
    paths = write(result, args.out)
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
