"""Adaptive-gating calibration: per-layer routing sensitivity measured on calibration text, and the
AdapMoE thresholds t_l = sqrt(c / H_l) derived from it (calibrate -> CalibrationResult).

H_l, the empirical Fisher information of layer l's routing weights, is the mean squared gradient of
the summed token loss with respect to each (token, slot) routing weight, computed through the
engine. Slot j >= 2 is dropped when its weight normalised over the top-k is below t_l, i.e. when
w^2 * H_l < c; so the share of activations dropped on the calibration text is a known function of
c, chosen to meet a target drop, or by bisection on perplexity to stay within a relative increase.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ExpertCacheError
from .settings import DEFAULT_TARGET_DROP
from ..ids import PHASES
from ..routing import AdaptiveGating, ExactRouting, WeightRule, drop_threshold
from .quality import ActivationCounter, perplexity

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BISECTION_STEPS = 7  # max_ppl_increase: perplexity passes after the exact one


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


def measure_sensitivity(engine, ids: list[int], *, window: int, progress: bool = False) -> Sensitivity:
    """Fisher information of each layer's routing weights over `ids`, in windows of `window` tokens."""
    if engine.cache.capacity < engine.store.num_experts:
        raise ExpertCacheError(
            "calibration needs every expert in memory (the backward pass reads each expert's weights "
            "again): use --expert-budget 100%"
        )
    from tqdm.auto import tqdm

    sens = Sensitivity(top_k=engine.checkpoint.top_k)
    probe = _FisherProbe()
    bar = tqdm(total=len(ids), unit="tok", desc="sensitivity", disable=not progress)
    try:
        with engine.routing_override(probe):
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
                bar.update(len(chunk))
    finally:
        probe.leaves.clear()
        bar.close()
    return sens


def weight_rule(engine) -> WeightRule:
    """How the engine's model mixes router weights; adaptive gating re-mixes them, so it needs one."""
    rule = engine.checkpoint.family.weight_rule(engine.checkpoint.config)
    if rule is None:
        raise ExpertCacheError("adaptive gating re-mixes softmax router weights, and this model's router is not a softmax")
    return rule


def adaptive_ppl(engine, sens: Sensitivity, c: float | None, ids: list[int], *, window: int, stride: int,
                 progress: bool = False, desc: str = "perplexity") -> tuple[float, float]:
    """(perplexity, share of activations dropped) with thresholds from scale c (None = exact)."""
    policy = (ExactRouting() if c is None else
              AdaptiveGating(thresholds=sens.thresholds(c), rule=weight_rule(engine), applies_to="both"))
    counter = ActivationCounter()
    with engine.routing_override(policy), engine.observe(on_route=counter):
        ppl, _ = perplexity(engine.model, ids, window=window, stride=stride, progress=progress, desc=desc)
    full = sum(counter.tokens_by_layer.values()) * sens.top_k
    return ppl, 1 - counter.activations / full


def calibration_record(engine, sens: Sensitivity, c: float, **extra) -> dict:
    ckpt = engine.checkpoint
    return {
        "routing": "adaptive-gating",
        "version": FORMAT_VERSION,
        "model": str(ckpt.model_dir),
        "model_type": ckpt.family.model_type,
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


def read_ids(engine, text: Path, max_tokens: int | None) -> list[int]:
    if engine.tokenizer is None:
        raise ExpertCacheError("this checkpoint has no tokenizer; calibration needs one")
    try:
        raw = Path(text).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ExpertCacheError(f"{text}: cannot read ({e.strerror or e})") from None
    ids = engine.encode(raw)  # after the BOS token, as quality.evaluate encodes text
    return ids[:max_tokens] if max_tokens is not None else ids



@dataclass
class CalibrationResult:
    """What calibrate() measured and chose; `record` is what a calibration file holds."""

    record: dict
    sensitivity: Sensitivity
    c: float
    target_drop: float
    perplexity_exact: float
    perplexity: float  # with the thresholds, on the calibration text
    dropped: float  # share of expert activations the thresholds dropped there

    @property
    def tokens(self) -> int:
        return self.sensitivity.tokens


def calibrate(engine, ids: list[int], *, target_drop: float | None = None, max_ppl_increase: float | None = None,
              window: int = 256, calibration_text: str | None = None, progress: bool = False) -> CalibrationResult:
    """Thresholds for adaptive gating from calibration tokens `ids`: dropping `target_drop` of the
    expert activations (default DEFAULT_TARGET_DROP), or as much as keeps perplexity within a
    relative `max_ppl_increase` (bisection over the drop). The engine must hold every expert.
    `calibration_text` names the text in the record; `progress` shows a bar per pass."""
    if target_drop is not None and max_ppl_increase is not None:
        raise ExpertCacheError("give a target drop or a maximum perplexity increase, not both")
    if window < 2:
        raise ExpertCacheError(f"the calibration window must be at least 2 tokens, got {window}")
    if len(ids) < 2:
        raise ExpertCacheError("the calibration text has fewer than 2 tokens")
    weight_rule(engine)  # refuse a model adaptive gating cannot run on before measuring
    sens = measure_sensitivity(engine, ids, window=window, progress=progress)
    ppl_args = dict(window=window, stride=window, progress=progress)
    base, _ = adaptive_ppl(engine, sens, None, ids, desc="perplexity, exact", **ppl_args)
    if max_ppl_increase is not None:
        lo, hi = 0.0, sens.max_drop * (1 - 1e-6)
        for step in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            ppl, _ = adaptive_ppl(engine, sens, sens.scale_for_drop(mid), ids, desc=f"bisection {step + 1}/{BISECTION_STEPS}",
                                  **ppl_args)
            log.info("drop %.3f -> perplexity %.4f (%+.2f%%)", mid, ppl, 100 * (ppl / base - 1))
            if ppl <= base * (1 + max_ppl_increase):
                lo = mid
            else:
                hi = mid
        target = lo
    else:
        target = DEFAULT_TARGET_DROP if target_drop is None else target_drop
    c = sens.scale_for_drop(target)
    ppl, dropped = adaptive_ppl(engine, sens, c, ids, desc="perplexity, gated", **ppl_args) if target > 0 else (base, 0.0)
    record = calibration_record(
        engine, sens, c, target_drop=target, max_ppl_increase=max_ppl_increase, calibration_text=calibration_text,
        perplexity_exact=base, perplexity=ppl, measured_drop=dropped, window=window,
    )  # fmt: skip
    return CalibrationResult(record=record, sensitivity=sens, c=c, target_drop=target, perplexity_exact=base,
                             perplexity=ppl, dropped=dropped)
