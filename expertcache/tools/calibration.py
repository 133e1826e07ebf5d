"""Adaptive-gating calibration (`expertcache calibrate`): per-layer routing sensitivity measured on
calibration text, and the AdapMoE thresholds t_l = sqrt(c / H_l) derived from it.

H_l is the empirical Fisher information of layer l's routing weights: the mean squared gradient of
the language-model loss (summed over tokens) with respect to each (token, slot) routing weight,
computed through the engine. A slot j >= 2 is dropped when its weight normalised over the top-k is
below t_l, i.e. when w^2 * H_l < c; so the share of activations dropped on the calibration text is
a known function of c, and c is chosen to meet --target-drop, or by bisection on perplexity to stay
within --max-ppl-increase.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ExpertCacheError
from .routing import CALIBRATION_FILE, PHASES, AdaptiveGating, WeightRule, drop_threshold

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BISECTION_STEPS = 7  # --max-ppl-increase: perplexity passes after the exact one


class _FisherProbe:
    """A routing 'policy' that leaves the choice alone but makes each layer's weights a gradient leaf."""

    name = "fisher-probe"
    exact = True
    applies_to = PHASES

    def __init__(self) -> None:
        self.leaves: list[tuple[int, torch.Tensor]] = []

    def select(self, layer, logits, weights, ids):
        leaf = weights.detach().requires_grad_(True)
        self.leaves.append((layer, leaf))
        return leaf, ids


@dataclass
class Sensitivity:
    """What one calibration pass measured: H_l per layer and the normalised weights of slots 2..k."""

    top_k: int
    tokens: int = 0
    fisher_sum: dict[int, float] = field(default_factory=dict)
    fisher_count: dict[int, int] = field(default_factory=dict)
    tail_weights: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> [[n, k-1]]

    @property
    def fisher(self) -> dict[int, float]:
        return {l: self.fisher_sum[l] / self.fisher_count[l] for l in sorted(self.fisher_sum)}

    @property
    def max_drop(self) -> float:
        """The largest share of activations adaptive gating can drop (all but the top-1)."""
        return (self.top_k - 1) / self.top_k

    def _statistic(self) -> torch.Tensor:
        """s = w^2 * H_l for every droppable (token, layer, slot): dropped exactly when s < c."""
        h = self.fisher
        return torch.cat([torch.cat(self.tail_weights[l]).flatten().double() ** 2 * h[l] for l in h])

    def scale_for_drop(self, drop: float) -> float:
        """The c that drops `drop` of all activations on the calibration text."""
        if not 0 <= drop < self.max_drop:
            raise ExpertCacheError(f"target drop must be in [0, {self.max_drop:.3f}) for top-{self.top_k}, got {drop}")
        s = torch.sort(self._statistic()).values
        n = round(drop * s.numel() / self.max_drop)  # droppable slots are max_drop of all activations
        return float(s[n]) if n > 0 else 0.0

    def drop_for_scale(self, c: float) -> float:
        s = self._statistic()
        return float((s < c).double().mean()) * self.max_drop

    def thresholds(self, c: float) -> dict[int, float]:
        return {l: drop_threshold(c, h) for l, h in self.fisher.items()}


def measure_sensitivity(engine, ids: list[int], *, window: int) -> Sensitivity:
    """Fisher information of each layer's routing weights over `ids`, in windows of `window` tokens."""
    if engine.cache.capacity < engine.store.num_experts:
        raise ExpertCacheError(
            "calibration needs every expert in memory (the backward pass reads each expert's weights "
            "again): use --expert-budget 100%"
        )
    sens = Sensitivity(top_k=engine.checkpoint.top_k)
    probe = _FisherProbe()
    saved = engine.context.routing
    engine.context.routing = probe
    try:
        for begin in range(0, len(ids) - 1, window):
            chunk = ids[begin : begin + window]
            if len(chunk) < 2:
                break
            probe.leaves.clear()
            inp = torch.tensor([chunk])
            with torch.enable_grad():
                logits = engine.model(input_ids=inp, use_cache=False).logits[0, :-1]  # [n-1, V]
                loss = F.cross_entropy(logits.float(), inp[0, 1:], reduction="sum")
                loss.backward()
            for layer, leaf in probe.leaves:
                g = leaf.grad.double()  # [n, k]
                sens.fisher_sum[layer] = sens.fisher_sum.get(layer, 0.0) + float((g**2).sum())
                sens.fisher_count[layer] = sens.fisher_count.get(layer, 0) + g.numel()
                w = leaf.detach().float()
                norm = w / w.sum(dim=-1, keepdim=True)  # [n, k]
                sens.tail_weights.setdefault(layer, []).append(norm[:, 1:])
            sens.tokens += len(chunk)
    finally:
        engine.context.routing = saved
        probe.leaves.clear()
    return sens


def _rule(engine) -> WeightRule:
    arch, cfg = engine.checkpoint.arch, engine.checkpoint.config
    return WeightRule(renormalize=arch.renormalize(cfg), in_logits_dtype=arch.weights_in_logits_dtype)


def adaptive_ppl(engine, sens: Sensitivity, c: float | None, ids: list[int], *, window: int, stride: int) -> tuple[float, float]:
    """(perplexity, share of activations dropped) with thresholds from scale c (None = exact)."""
    from .quality import ActivationCounter, perplexity
    from .routing import ExactRouting

    saved = engine.context.routing
    engine.context.routing = (ExactRouting() if c is None else
                              AdaptiveGating(thresholds=sens.thresholds(c), rule=_rule(engine), applies_to="both"))
    counter = ActivationCounter()
    engine.context.observers.append(counter)
    try:
        ppl, _ = perplexity(engine.model, ids, window=window, stride=stride)
    finally:
        engine.context.observers.remove(counter)
        engine.context.routing = saved
    full = sum(counter.tokens_by_layer.values()) * sens.top_k
    return ppl, 1 - counter.activations / full


def calibration_record(engine, sens: Sensitivity, c: float, **extra) -> dict:
    ckpt = engine.checkpoint
    return {
        "routing": "adaptive-gating",
        "version": FORMAT_VERSION,
        "model": str(ckpt.model_dir),
        "model_type": ckpt.arch.model_type,
        "top_k": ckpt.top_k,
        "num_experts": ckpt.num_experts,
        "sensitivity": "fisher: mean squared gradient of the summed token loss w.r.t. each routing weight",
        "calibration_tokens": sens.tokens,
        "c": c,
        "expected_drop": sens.drop_for_scale(c),
        **extra,
        "layers": {str(l): {"fisher": h, "threshold": t} for (l, h), t in zip(sens.fisher.items(), sens.thresholds(c).values())},
    }


def write_calibration(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def _fraction(text: str) -> float:
    """'0.2' or '20%' -> 0.2."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.2) or a percentage (20%), got {text!r}") from None


def read_ids(engine, text: Path, max_tokens: int | None) -> list[int]:
    if engine.tokenizer is None:
        raise ExpertCacheError("this checkpoint has no tokenizer; calibration needs one")
    try:
        raw = Path(text).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ExpertCacheError(f"{text}: cannot read ({e.strerror or e})") from None
    ids = engine.encode(raw)  # after the BOS token, as quality.evaluate encodes text
    return ids[:max_tokens] if max_tokens is not None else ids


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_engine_arguments

    add_engine_arguments(p)
    p.set_defaults(expert_budget="100%", prefetch="none")
    p.add_argument("--text", type=Path, required=True, help="calibration text (held out from what you evaluate on)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target-drop", type=_fraction, default=None,
                      help="share of expert activations to drop, e.g. 0.25 or 25%% (default 0.25)")
    goal.add_argument("--max-ppl-increase", type=_fraction, default=None,
                      help="drop as much as keeps perplexity within this relative increase, e.g. 0.01 or 1%%")
    p.add_argument("--out", type=Path, default=None, help=f"where to write the thresholds (default: MODEL/{CALIBRATION_FILE})")
    p.add_argument("--max-tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--window", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--json", action="store_true", help="print the written record as JSON")


def run(args: argparse.Namespace) -> int:
    from .cli import _set_threads, engine_config
    from .engine import Engine

    _set_threads(args.threads)
    if args.window < 2:
        raise ExpertCacheError(f"--window must be at least 2, got {args.window}")
    t0 = time.perf_counter()
    with Engine(engine_config(args)) as engine:
        ids = read_ids(engine, args.text, args.max_tokens)
        if len(ids) < 2:
            raise ExpertCacheError(f"{args.text}: fewer than 2 tokens")
        sens = measure_sensitivity(engine, ids, window=args.window)
        ppl_args = dict(window=args.window, stride=args.window)
        base, _ = adaptive_ppl(engine, sens, None, ids, **ppl_args)
        if args.max_ppl_increase is not None:
            lo, hi, best = 0.0, sens.max_drop * (1 - 1e-6), None
            for _ in range(BISECTION_STEPS):
                mid = (lo + hi) / 2
                ppl, dropped = adaptive_ppl(engine, sens, sens.scale_for_drop(mid), ids, **ppl_args)
                log.info("drop %.3f -> perplexity %.4f (%+.2f%%)", mid, ppl, 100 * (ppl / base - 1))
                if ppl <= base * (1 + args.max_ppl_increase):
                    lo, best = mid, (ppl, dropped)
                else:
                    hi = mid
            target = lo
        else:
            target = 0.25 if args.target_drop is None else args.target_drop
        c = sens.scale_for_drop(target)
        ppl, dropped = adaptive_ppl(engine, sens, c, ids, **ppl_args) if target > 0 else (base, 0.0)
        record = calibration_record(
            engine, sens, c, target_drop=target, max_ppl_increase=args.max_ppl_increase,
            calibration_text=str(args.text), perplexity_exact=base, perplexity=ppl, measured_drop=dropped,
            window=args.window,
        )
        out = args.out if args.out is not None else engine.checkpoint.model_dir / CALIBRATION_FILE
    write_calibration(out, record)
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s, {sens.tokens} tokens)")
    print(f"c = {c:.4g}: drops {100 * dropped:.1f}% of expert activations, perplexity {base:.3f} -> {ppl:.3f} "
          f"({100 * (ppl / base - 1):+.2f}%) on the calibration text")
    for l, v in record["layers"].items():
        t = v["threshold"]
        print(f"  layer {l:>3}: fisher {v['fisher']:.3e}  threshold {t:.3f}" if math.isfinite(t) else f"  layer {l:>3}: threshold inf")
    return 0
