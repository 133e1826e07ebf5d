"""expertcache train-predictor: fit a predictor file (learned, estimator, default-vector, pregate)
from a trace or calibration text, and write it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ExpertCacheError
from ..ids import TRAINED_KINDS
from ..tools.settings import TrainSettings
from .flags import add_engine_arguments, engine_config, output_path, parse_depths, written


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p, only=("model", "expert_budget", "num_threads"), expert_budget="100%")
    p.add_argument("--kind", default="learned", choices=TRAINED_KINDS, help="predictor to fit (default learned)")
    p.add_argument("--routed-by-pregate", action="store_true",
                   help="run the model routed by its pre-gate (--routing pregate) and fit the routing it runs with")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", default=None, help="trace recorded with `expertcache trace --hidden-states`")
    src.add_argument("--text", default=None, help="calibration text run through the model here (default: TinyStories train)")
    p.add_argument("--max-tokens", type=int, default=20000, help="calibration tokens taken from --text (default 20000)")
    p.add_argument("--window", type=int, default=256, help="tokens per calibration forward pass (default 256)")
    p.add_argument("--depth", default="1", help="distances to fit: D means 1..D, or a list 1,2 (default 1)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", default=None, help="predictor file to write (load it with --predictor PATH)")
    out.add_argument("--next-to-model", action="store_true", help="write MODEL/predictor-<kind>.pt, found without --predictor")
    t = TrainSettings  # every default is the settings' own
    p.add_argument("--steps", type=int, default=t.steps, help=f"optimiser steps per net (default {t.steps})")
    p.add_argument("--lr", type=float, default=t.lr, help=f"Adam learning rate (learned: of its MLP part; default {t.lr})")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="pregate: train on from this pre-gate file, its shape kept (e.g. MODEL/predictor-pregate.pt, "
                        "the one refactor trained with the model); only read, unless --next-to-model names the same file")
    p.add_argument("--width", type=int, default=t.width, help=f"learned: hidden units per net (default {t.width})")
    p.add_argument("--seed", type=int, default=t.seed, help=f"learned: seed (default {t.seed})")
    p.add_argument("--attn", type=int, default=t.attn, metavar="W",
                   help=f"pregate: width of a causal attention over the context, a multiple of 4 (default {t.attn}: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine, demo_model_dir
    from ..predictors.artefact import default_path
    from ..tools.predictor_training import check_inputs, train_predictor

    depths = parse_depths(args.depth, expand=True)
    settings = TrainSettings(steps=args.steps, width=args.width, seed=args.seed, attn=args.attn, lr=args.lr)
    check_inputs(args.kind, max_tokens=args.max_tokens, window=args.window, settings=settings, init=args.init)
    model_dir = Path(args.model) if args.model is not None else demo_model_dir()
    if args.next_to_model:
        out = default_path(model_dir, args.kind)
        if not (model_dir.is_dir() and os.access(model_dir, os.W_OK)):
            raise ExpertCacheError(f"{model_dir} is not writable: pass --out FILE instead of --next-to-model")
    else:
        out = output_path(args.out, "--out")
    progress = not args.no_progress
    routed = dict(prefetch="pregate", routing="pregate") if args.routed_by_pregate else dict(prefetch="none")
    with Engine(engine_config(args, model=str(model_dir), io="buffered", **routed)) as engine:
        art = train_predictor(engine, args.kind, trace=args.trace, text=args.text, max_tokens=args.max_tokens,
                              window=args.window, depths=depths, settings=settings, init=args.init, progress=progress)  # fmt: skip
    with written(out, "--out") as tmp:
        art.save(tmp)
    print(f"wrote {out}: {args.kind} predictor, {art.meta['tokens']} tokens, distances {art.depths or ('every layer at once' if art.kind == 'pregate' else 'chained')}{_validation(art)}")
    return 0


def _validation(art) -> str:
    v = list(art.meta.get("validation", {}).values())
    if not v:
        return ""
    mean = lambda key: sum(r[key] for r in v) / len(v)  # noqa: E731
    if art.kind == "pregate":
        return f"; validation recall, every layer from the embeddings: {mean('val_recall'):.3f}"
    return f"; validation recall {mean('val_recall'):.3f} (next-gate {mean('val_recall_next_gate'):.3f})"
