"""expertcache eval-predictors: precision and recall of every predictor on held-out text."""

from __future__ import annotations

import argparse
import json

from ..errors import ExpertCacheError
from ..ids import TRAINED_KINDS
from ..tools.settings import DEFAULT_PREDICTORS
from .flags import add_engine_arguments, engine_config, parse_depths


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p, only=("model", "expert_budget", "num_threads"), expert_budget="100%")
    p.add_argument("--routed-by-pregate", action="store_true",
                   help="run the model routed by its pre-gate (--routing pregate): recall is then of the routing it runs "
                        "with, not of its own routers")
    p.add_argument("--text", required=True, help="held-out text (documents split on <|endoftext|> lines)")
    p.add_argument("--depth", default="1", help="distances to score, e.g. 1,2 (default 1)")
    p.add_argument("--max-tokens", type=int, default=1000, help="tokens to feed (default 1000)")
    p.add_argument("--segment", type=int, default=512,
                   help="tokens fed from one fresh cache at most (default 512; a model trained on shorter windows "
                        "routes later positions out of its training: give its training length)")
    p.add_argument("--predictors", default=",".join(DEFAULT_PREDICTORS), help=f"comma-separated (default {','.join(DEFAULT_PREDICTORS)})")
    p.add_argument("--predictor-file", action="append", default=[], metavar="KIND=PATH",
                   help="file for a trained predictor (default MODEL/predictor-<kind>.pt); repeatable")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine
    from ..tools.predictor_eval import check_inputs, eval_predictors

    depths = parse_depths(args.depth, expand=False)
    names = [n.strip() for n in args.predictors.split(",") if n.strip()]
    files = {}
    for item in args.predictor_file:
        kind, sep, path = item.partition("=")
        if not sep or kind not in TRAINED_KINDS:
            raise ExpertCacheError(f"--predictor-file takes KIND=PATH with KIND one of {', '.join(TRAINED_KINDS)}, got {item!r}")
        files[kind] = path
    check_inputs(names, files, depths=depths, max_tokens=args.max_tokens, text=args.text, segment=args.segment)
    routed = dict(prefetch="pregate", routing="pregate", predictor=files.get("pregate")) if args.routed_by_pregate else {}
    with Engine(engine_config(args, **{"prefetch": "none", "io": "buffered", **routed})) as engine:
        report = eval_predictors(engine, args.text, names=names, depths=depths, max_tokens=args.max_tokens, files=files,
                                 segment=args.segment, progress=not args.no_progress)  # fmt: skip
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    truth = "the routing by the pre-gate" if args.routed_by_pregate else "the routers"
    print(f"{report.tokens} tokens of {args.text}; recall of {truth} per target layer (sparse layers {report.sparse_layers})")
    print(f"{'predictor':<16}{'depth':>6}{'precision':>11}{'recall':>9}  per-layer recall")
    pct = lambda v: "   -" if v is None else f"{100 * v:4.0f}"  # noqa: E731
    for r in report.results:
        per_layer = " ".join(pct(v) for v in r["per_layer_recall"])
        depth = "all" if r["depth"] == 0 else r["depth"]
        print(f"{r['predictor']:<16}{depth:>6}{pct(r['precision']):>10}%{pct(r['recall']):>8}%  {per_layer}")
    for s in report.skipped:
        print(f"skipped {s['predictor']}{' depth ' + str(s['depth']) if 'depth' in s else ''}: {s['reason']}")
    return 0
