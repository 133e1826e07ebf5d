"""How well each predictor guesses the experts later layers route to (eval-predictors).

One pass over held-out text, token by token with the KV cache (the decode situation a prefetch
serves). At every MoE layer l every predictor guesses layers l+d; the guess (its first top-k
experts) is compared with the set the layer then really routes to: precision = |guess & routed| /
|guess|, recall = |guess & routed| / |routed|, summed over (token, target layer) pairs. Layers no
predictor can see (the first d sparse layers at distance d) have no figure. The cache plays no
part: this measures the guesses; `prefetch_metrics` reads an engine run's prefetch counters.
A pre-gate also guesses every layer at once before the first one runs: its row at depth 0 ("all").
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..decoding import Decoding
from ..errors import ExpertCacheError
from ..predictors import PREDICTORS, make_predictor
from ..ids import TRAINED_KINDS
from .settings import DEFAULT_PREDICTORS
from ..predictors.base import Predictor
from .predictor_training import text_documents



class _Scorer:
    """An engine route observer: settles the guesses made for this layer, then asks every predictor
    for its guesses of the layers ahead. Takes one token per forward."""

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

    def start(self, name: str, guesses) -> None:
        """A pre-gate's guesses for every layer, made before the first one (depth 0)."""
        for target, experts in guesses:
            self.pending[target].append((name, 0, experts[: self.top_k]))

    def results(self, names: list[str], depths: list[int], available: set[tuple[str, int]]) -> list[dict]:
        out = []
        for name in names:
            for d in [0, *depths]:
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


def check_inputs(names: list[str], files: dict[str, str], *, depths: list[int], max_tokens: int, text: str | Path,
                 segment: int = 512) -> None:
    """Refuse inputs eval_predictors cannot use, before any engine is loaded."""
    if not depths or min(depths) < 1:
        raise ExpertCacheError(f"--depth values must be at least 1, got {depths}")
    if max_tokens < 1 or segment < 1:
        raise ExpertCacheError("--max-tokens and --segment must be at least 1")
    unknown = [n for n in names if n not in PREDICTORS]
    if unknown:
        raise ExpertCacheError(f"unknown predictor {unknown[0]!r}: choose from {', '.join(PREDICTORS)}")
    for kind in files:
        if kind not in TRAINED_KINDS:
            raise ExpertCacheError(f"--predictor-file takes KIND=PATH with KIND one of {', '.join(TRAINED_KINDS)}, got {kind!r}")
    if not Path(text).is_file():
        raise ExpertCacheError(f"--text {text} not found")


def build_predictors(
    engine, names: list[str], depth: int, files: dict[str, str]
) -> tuple[dict[str, Predictor], dict[str, int], list[dict]]:
    """Each named predictor for the engine's model, looking `depth` layers ahead (or as far as its
    file allows). Returns (predictors, depth each reaches, skipped [{predictor, reason}])."""
    ckpt = engine.checkpoint
    routers, norms = engine.routers(), engine.norms()
    built: dict[str, Predictor] = {}
    reach: dict[str, int] = {}
    skipped: list[dict] = []
    for name in names:
        last_error = None
        for d in range(depth, 0, -1):
            try:
                built[name] = make_predictor(
                    name, routers=routers, norms=norms, top_k=ckpt.top_k, depth=d, model_dir=ckpt.model_dir, path=files.get(name)
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
    segment of a longer one) with every predictor guessing and the engine's own prefetch paused;
    returns the scorer and the tokens fed."""
    from tqdm.auto import tqdm

    ckpt = engine.checkpoint
    scorer = _Scorer(predictors, list(ckpt.sparse_layers), depths, ckpt.top_k)
    # the predictors that learn from each layer's routing see it first, then the scorer asks them
    watchers = [p.observe for p in predictors.values() if hasattr(p, "observe")] + [scorer]

    def on_route(layer, x, logits, weights, ids) -> None:
        for watch in watchers:
            watch(layer, x, logits, weights, ids)

    starters = {name: p.start for name, p in predictors.items() if getattr(p, "start", None) is not None}

    def on_input(module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        scorer.pending.clear()  # a new forward: guesses for the last one's layers are void
        for name, start in starters.items():
            scorer.start(name, start(hidden))

    fed = 0
    segments = [doc[i : i + max_doc_tokens] for doc in documents for i in range(0, len(doc), max_doc_tokens)]
    with ExitStack() as stack:
        first = engine.model.get_submodule(ckpt.sites[ckpt.sparse_layers[0]].decoder_layer.rsplit(".", 1)[0])[0]
        stack.callback(first.register_forward_pre_hook(on_input, with_kwargs=True).remove)
        stack.enter_context(engine.prefetch_paused())
        stack.enter_context(engine.observe(on_route=on_route))
        bar = stack.enter_context(tqdm(total=max_tokens, unit="tok", desc="eval-predictors", disable=not progress))
        for doc in segments:
            if fed >= max_tokens:
                break
            for p in predictors.values():
                reset = getattr(p, "reset", None)
                if reset is not None:
                    reset()
            decoding = Decoding(engine.model)
            for tok in doc[: max_tokens - fed]:
                decoding.feed([tok])
                fed += 1
                bar.update(1)
    return scorer, fed


@dataclass
class PredictorEval:
    """What eval_predictors measured. results: one row per (predictor, depth) with precision,
    recall, per_layer_recall and per_layer_precision (one per sparse layer, None where no guess
    was made) and pairs; skipped: [{predictor, reason} (and depth, for a file too shallow)]."""

    model: str
    text: str
    tokens: int
    sparse_layers: list[int]
    depths: list[int]
    results: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def eval_predictors(
    engine,
    text: str | Path,
    *,
    names: list[str] = DEFAULT_PREDICTORS,
    depths: list[int] = (1,),
    max_tokens: int = 1000,
    files: dict[str, str] | None = None,
    segment: int = 512,
    progress: bool = True,
) -> PredictorEval:
    """Score every predictor in `names` at each distance in `depths` on the first `max_tokens`
    tokens of the text file `text` (documents split on <|endoftext|> lines, fed in segments of at
    most `segment` tokens, each from a fresh cache: a model trained on shorter windows routes
    positions beyond them out of its training). `files`: {kind: path} of trained predictor files
    (default: MODEL/predictor-<kind>.pt). A predictor that cannot be built, or whose file does not
    reach a distance, is reported as skipped."""
    names, depths, files = list(names), sorted(set(depths)), dict(files or {})
    check_inputs(names, files, depths=depths, max_tokens=max_tokens, text=text, segment=segment)
    max_depth = len(engine.checkpoint.sparse_layers) - 1
    if max(depths) > max_depth:
        raise ExpertCacheError(f"--depth {max(depths)} is beyond this model's {max_depth + 1} sparse layers")
    predictors, reach, skipped = build_predictors(engine, names, max(depths), files)
    try:
        for name, d in reach.items():
            skipped += [{"predictor": name, "depth": x, "reason": "its file has no maps this far"} for x in depths if x > d]
        docs = text_documents(engine, text, max_tokens)
        scorer, fed = evaluate(engine, docs, predictors, depths=depths, max_tokens=max_tokens, max_doc_tokens=segment,
                               progress=progress)
    finally:
        for p in predictors.values():
            close = getattr(p, "close", None)
            if close is not None:
                close()
    available = {(n, d) for n, r in reach.items() for d in depths if d <= r}
    available |= {(n, 0) for n, p in predictors.items() if getattr(p, "start", None) is not None}
    return PredictorEval(
        model=str(engine.checkpoint.model_dir),
        text=str(text),
        tokens=fed,
        sparse_layers=list(engine.checkpoint.sparse_layers),
        depths=depths,
        results=scorer.results(names, depths, available),
        skipped=skipped,
    )


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
