"""eval-predictors: how well each predictor guesses the experts later layers route to.

One pass through the model over held-out text, token by token with the KV cache (exactly the
decode situation a prefetch serves). At every MoE layer l every predictor guesses layers l+d; the
guess (its first top-k experts) is compared with the set the layer then really routes to.
precision = |guess & routed| / |guess|, recall = |guess & routed| / |routed|, summed over
(token, target layer) pairs. Layers no predictor can see (the first d sparse layers at distance d)
have no figure. The cache plays no part: this measures the guesses, `prefetch_metrics` the engine.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch

from ..errors import ExpertCacheError
from .artefact import TRAINED_KINDS
from .base import Predictor

log = logging.getLogger(__name__)

DEFAULT_PREDICTORS = ("next-gate", "default-vector", "estimator", "learned", "history")


class _Scorer:
    """A block observer: settles the guesses made for this layer, then asks every predictor for
    its guesses of the layers ahead. Feeds one token per forward."""

    def __init__(self, predictors: dict[str, Predictor], layers: list[int], depths: list[int], top_k: int) -> None:
        self.predictors = predictors
        self.layers = layers
        self.index = {l: i for i, l in enumerate(layers)}
        self.depths = set(depths)
        self.top_k = top_k
        self.pending: dict[int, list[tuple[str, int, list[int]]]] = defaultdict(list)  # target -> (name, d, guess)
        self.hits: dict[tuple[str, int, int], int] = defaultdict(int)  # (name, d, target) -> counts
        self.guessed: dict[tuple[str, int, int], int] = defaultdict(int)
        self.routed: dict[tuple[str, int, int], int] = defaultdict(int)
        self.pairs: dict[tuple[str, int, int], int] = defaultdict(int)  # (token, target layer) pairs scored

    def __call__(self, layer: int, x, logits, weights, ids) -> None:
        if x.shape[0] != 1:
            raise ExpertCacheError("eval-predictors feeds one token per forward")
        if layer == self.layers[0]:
            self.pending.clear()
        true = {int(e) for e in ids[0].tolist() if e >= 0}
        for name, d, guess in self.pending.pop(layer, []):
            key = (name, d, layer)
            self.hits[key] += len(true.intersection(guess))
            self.guessed[key] += len(guess)
            self.routed[key] += len(true)
            self.pairs[key] += 1
        for name, predictor in self.predictors.items():
            for target, experts in predictor.predict(layer, x, logits):
                d = self.index[target] - self.index[layer]
                if d in self.depths:
                    self.pending[target].append((name, d, experts[: self.top_k]))

    def results(self, names: list[str], depths: list[int], available: set[tuple[str, int]]) -> list[dict]:
        out = []
        for name in names:
            for d in depths:
                if (name, d) not in available:
                    continue
                keys = [(name, d, t) for t in self.layers]
                hits = sum(self.hits[k] for k in keys)
                guessed = sum(self.guessed[k] for k in keys)
                routed = sum(self.routed[k] for k in keys)
                out.append(
                    {
                        "predictor": name,
                        "depth": d,
                        "precision": hits / guessed if guessed else None,
                        "recall": hits / routed if routed else None,
                        "per_layer_recall": [self.hits[k] / self.routed[k] if self.routed[k] else None for k in keys],
                        "per_layer_precision": [self.hits[k] / self.guessed[k] if self.guessed[k] else None for k in keys],
                        "pairs": sum(self.pairs[k] for k in keys),
                    }
                )
        return out


def build_predictors(engine, names: list[str], depth: int, files: dict[str, str]) -> tuple[dict[str, Predictor], dict[str, int], list[dict]]:
    """Each named predictor for the engine's model, looking `depth` layers ahead (or as far as its
    file allows). Returns (predictors, depth each reaches, skipped [{predictor, reason}])."""
    from . import make_predictor

    ckpt = engine.checkpoint
    routers = {l: engine.model.model.layers[l].mlp.gate.weight for l in ckpt.sparse_layers}
    model_dir = ckpt.model_dir
    built: dict[str, Predictor] = {}
    reach: dict[str, int] = {}
    skipped: list[dict] = []
    for name in names:
        last_error = None
        for d in range(depth, 0, -1):
            try:
                built[name] = make_predictor(
                    name, routers=routers, top_k=ckpt.top_k, depth=d, model=engine.model, model_dir=model_dir, path=files.get(name)
                )
                reach[name] = d
                break
            except (ExpertCacheError, ValueError) as e:
                last_error = str(e)
        if name not in built:
            skipped.append({"predictor": name, "reason": last_error})
    return built, reach, skipped


@torch.inference_mode()
def evaluate(
    engine,
    documents: list[list[int]],
    predictors: dict[str, Predictor],
    *,
    depths: list[int],
    max_tokens: int,
    max_doc_tokens: int = 512,
    progress: bool = True,
) -> tuple[_Scorer, int]:
    """Feed `documents` token by token (a fresh KV cache per document, and per `max_doc_tokens`
    segment of a longer one) with every predictor guessing; returns the scorer and the tokens fed."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    ckpt = engine.checkpoint
    scorer = _Scorer(predictors, list(ckpt.sparse_layers), depths, ckpt.top_k)
    observers = engine.context.observers
    added = [p.observe for p in predictors.values() if hasattr(p, "observe")] + [scorer]
    observers.extend(added)
    engine.context.prefetch_enabled = False
    fed = 0
    bar = tqdm(total=max_tokens, unit="tok", desc="eval-predictors", disable=not progress)
    segments = [doc[i : i + max_doc_tokens] for doc in documents for i in range(0, len(doc), max_doc_tokens)]
    try:
        for doc in segments:
            if fed >= max_tokens:
                break
            for p in predictors.values():
                reset = getattr(p, "reset", None)
                if reset is not None:
                    reset()
            past = DynamicCache(config=engine.model.config)
            for tok in doc[: max_tokens - fed]:
                engine.model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True, logits_to_keep=1)
                fed += 1
                bar.update(1)
    finally:
        bar.close()
        for obs in added:
            observers.remove(obs)
    return scorer, fed


def prefetch_metrics(stats: dict) -> dict:
    """An engine run's prefetch figures, whole run and per layer, from Engine.stats():
    precision = used / issued guesses, recall = used guesses / lookups, useful bytes (guesses used),
    wasted bytes (guesses read and not used), stall seconds."""
    eb = stats["expert_bytes"]

    def one(s: dict) -> dict:
        issued, used = s.get("prefetch_issued", 0), s.get("prefetch_used", 0)
        read_wasted = s.get("prefetch_wasted", 0) - s.get("prefetch_cancelled", 0)
        return {
            "precision": used / issued if issued else None,
            "recall": used / s["lookups"] if s.get("lookups") else None,
            "useful_bytes": used * eb,
            "wasted_bytes": max(0, read_wasted) * eb,
            "stall_seconds": s.get("stall_seconds", 0.0),
        }

    return {**one(stats), "layers": {layer: one(s) for layer, s in stats.get("layers", {}).items()}}


# --- CLI -----------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--text", required=True, help="held-out text (documents split on <|endoftext|> lines)")
    p.add_argument("--depth", default="1", help="distances to score, e.g. 1,2 (default 1)")
    p.add_argument("--max-tokens", type=int, default=1000, help="tokens to feed (default 1000)")
    p.add_argument("--predictors", default=",".join(DEFAULT_PREDICTORS), help=f"comma-separated (default {','.join(DEFAULT_PREDICTORS)})")
    p.add_argument("--predictor-file", action="append", default=[], metavar="KIND=PATH",
                   help="file for a trained predictor (default MODEL/predictor-<kind>.pt); repeatable")
    p.add_argument("--expert-budget", default="100%", help="expert memory for the pass (default 100%%)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: $EXPERTCACHE_THREADS or 1)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..cli import _set_threads
    from ..config import EngineConfig
    from ..engine import Engine
    from . import PREDICTORS
    from .train import parse_depths, text_documents

    depths = parse_depths(args.depth, expand=False)
    if args.max_tokens < 1:
        raise ExpertCacheError("--max-tokens must be at least 1")
    names = [n.strip() for n in args.predictors.split(",") if n.strip()]
    unknown = [n for n in names if n not in PREDICTORS]
    if unknown:
        raise ExpertCacheError(f"unknown predictor {unknown[0]!r}: choose from {', '.join(PREDICTORS)}")
    files = {}
    for item in args.predictor_file:
        kind, sep, path = item.partition("=")
        if not sep or kind not in TRAINED_KINDS:
            raise ExpertCacheError(f"--predictor-file takes KIND=PATH with KIND one of {', '.join(TRAINED_KINDS)}, got {item!r}")
        files[kind] = path
    if not Path(args.text).is_file():
        raise ExpertCacheError(f"--text {args.text} not found")
    _set_threads(args.threads)
    cfg = EngineConfig(model=args.model, expert_budget=args.expert_budget, prefetch="none", io="buffered")
    with Engine(cfg) as engine:
        max_depth = len(engine.checkpoint.sparse_layers) - 1
        if max(depths) > max_depth:
            raise ExpertCacheError(f"--depth {max(depths)} is beyond this model's {max_depth + 1} sparse layers")
        predictors, reach, skipped = build_predictors(engine, names, max(depths), files)
        for name, d in reach.items():
            skipped += [{"predictor": name, "depth": x, "reason": "its file has no maps this far"} for x in depths if x > d]
        docs = text_documents(engine, args.text, args.max_tokens)
        scorer, fed = evaluate(engine, docs, predictors, depths=depths, max_tokens=args.max_tokens, progress=not args.no_progress)
        for p in predictors.values():
            close = getattr(p, "close", None)
            if close is not None:
                close()
        available = {(n, d) for n, r in reach.items() for d in depths if d <= r}
        report = {
            "model": str(engine.checkpoint.model_dir),
            "text": str(args.text),
            "tokens": fed,
            "sparse_layers": list(engine.checkpoint.sparse_layers),
            "depths": depths,
            "results": scorer.results(names, depths, available),
            "skipped": skipped,
        }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['tokens']} tokens of {args.text}; recall per target layer (sparse layers {report['sparse_layers']})")
    print(f"{'predictor':<16}{'depth':>6}{'precision':>11}{'recall':>9}  per-layer recall")
    pct = lambda v: "   -" if v is None else f"{100 * v:4.0f}"  # noqa: E731
    for r in report["results"]:
        print(f"{r['predictor']:<16}{r['depth']:>6}{pct(r['precision']):>10}%{pct(r['recall']):>8}%  {' '.join(pct(v) for v in r['per_layer_recall'])}")
    for s in skipped:
        print(f"skipped {s['predictor']}{' depth ' + str(s['depth']) if 'depth' in s else ''}: {s['reason']}")
    return 0
