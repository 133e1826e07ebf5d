"""Routing policies: from a layer's router output to the experts that run and their weights.

Exact routing (the default) keeps the model's own choice. The lossy policies are opt-in, named and
measured (`expertcache tradeoff`): adaptive gating (AdapMoE), cache-aware routing (cache-conditional
experts), speculative routing and routing by a pre-gate (Read-ME). A dropped slot is id -1 with weight 0; mixing weights follow the
family's WeightRule over the chosen set, so a policy that changes nothing is exact bit for bit;
`applies_to` names the phases ("prefill", "decode") a policy runs in.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .config import CALIBRATION_FILE
from .ids import DROPPED, PHASES

log = logging.getLogger(__name__)

APPLIES_TO = {"prefill": ("prefill",), "decode": ("decode",), "both": PHASES}

Resident = Callable[[int], set[int]]  # layer -> experts holding a cache slot, ready or loading (an acquire would hit)
Predicted = Callable[[int], list[int]]  # layer -> latest predicted experts for it, most likely first
Pregated = Callable[[int], "torch.Tensor | None"]  # layer -> [T, k] each token's experts by the pre-gate (None: none)


class RoutingPolicy(Protocol):
    name: str
    exact: bool
    applies_to: tuple[str, ...]

    def select(
        self, layer: int, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class WeightRule:
    """How a family turns router logits into mixing weights (architectures.Architecture.route)."""

    renormalize: bool  # divide by the sum over the chosen experts
    in_logits_dtype: bool  # softmax(dtype=float) then cast back to the logits' dtype (Qwen, OLMoE)

    def mix(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Weights [T, k] of experts `ids` [T, k] (DROPPED slots get 0) from logits [T, E]."""
        if self.in_logits_dtype:
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)  # [T, E]
        else:
            probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        kept = ids >= 0  # [T, k]
        w = probs.gather(1, ids.clamp(min=0)) * kept  # [T, k]
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(logits.dtype) if self.in_logits_dtype else w


def _phases(applies_to: str | None, default: str) -> tuple[str, ...]:
    key = default if applies_to is None else applies_to
    if key not in APPLIES_TO:
        raise ValueError(f"unknown routing phases {key!r}: choose one of {', '.join(APPLIES_TO)}")
    return APPLIES_TO[key]


def _rank(z: torch.Tensor) -> torch.Tensor:
    """Rank of each expert in each row of z [T, E] (0 = highest), ties by lower id."""
    order = torch.argsort(z, dim=-1, descending=True, stable=True)  # [T, E]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(z.shape[-1], device=z.device).expand_as(order))
    return ranks


def _mask(experts: Iterable[int], num_experts: int) -> torch.Tensor:
    m = torch.zeros(num_experts, dtype=torch.bool)
    m[list(experts)] = True
    return m  # [E]


def _pick_by_class(cls: torch.Tensor, z: torch.Tensor, k: int) -> torch.Tensor:
    """The k experts per row with the lowest class, best router score first inside a class;
    returned in the router's order (highest logit first). cls, z: [T, E] -> ids [T, k]."""
    key = cls * z.shape[-1] + _rank(z)  # [T, E]
    chosen = key.topk(k, dim=-1, largest=False).indices  # [T, k]
    order = z.gather(1, chosen).argsort(dim=-1, descending=True, stable=True)
    return chosen.gather(1, order)


class ExactRouting:
    """The model's own top-k, weights exactly as transformers computes them."""

    name = "exact"
    exact = True
    applies_to = PHASES

    def select(self, layer, logits, weights, ids):
        return weights, ids


class AdaptiveGating:
    """AdapMoE adaptive gating: per token, drop slots 2..k whose normalised weight (over the top-k)
    is below the layer's threshold t_l = sqrt(c / H_l); the top-1 always runs. Thresholds come
    from `expertcache calibrate` (H_l a per-layer sensitivity). Kept weights follow the family's
    rule (WeightRule)."""

    name = "adaptive-gating"
    exact = False

    def __init__(self, *, thresholds: dict[int, float], rule: WeightRule, applies_to: str | None = None) -> None:
        self.thresholds = thresholds  # sparse layer -> t_l
        self.rule = rule
        self.applies_to = _phases(applies_to, "both")

    @classmethod
    def from_file(cls, path: str | Path, *, rule: WeightRule, top_k: int, layers: list[int],
                  applies_to: str | None = None) -> "AdaptiveGating":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"{path}: cannot read the adaptive-gating calibration ({e.strerror or e}); "
                             "run `expertcache calibrate` first") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a calibration file ({e})") from None
        try:
            thresholds = {int(l): float(v["threshold"]) for l, v in data["layers"].items()}
            if data["routing"] != "adaptive-gating":
                raise ValueError
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: not an adaptive-gating calibration file (run `expertcache calibrate`)") from None
        if data.get("top_k") != top_k or sorted(thresholds) != sorted(layers):
            raise ValueError(f"{path}: calibrated for another model (top-{data.get('top_k')}, layers "
                             f"{sorted(thresholds)}), this one is top-{top_k} with layers {layers}")
        return cls(thresholds=thresholds, rule=rule, applies_to=applies_to)

    def select(self, layer, logits, weights, ids):
        w = weights.float()
        norm = w / w.sum(dim=-1, keepdim=True)  # [T, k] normalised over the top-k
        drop = norm < self.thresholds[layer]  # [T, k]
        drop[:, 0] = False  # keep at least the top-1
        if not bool(drop.any()):
            return weights, ids
        new_ids = ids.masked_fill(drop, DROPPED)  # [T, k]
        return self.rule.mix(logits, new_ids), new_ids


class CacheAwareRouting:
    """Cache-conditional experts, cache-prior rule: z' = z + lambda * D_l * m, m[e] = 1 when e holds
    a cache slot or is among the token's original top-J; D_l an EMA (decay 0.99) of the per-token
    logit range max(z) - min(z) at layer l, updated with each token before it is routed. Experts
    are the top-k of z'; weights are the original softmax over them (WeightRule)."""

    name = "cache-aware"
    exact = False

    EMA_DECAY = 0.99  # of D_l per token: the logit range is a slow property of a layer

    def __init__(self, *, resident: Resident, rule: WeightRule, lam: float, protect_top: int,
                 applies_to: str | None = None) -> None:
        self.resident = resident
        self.rule = rule
        self.lam = lam  # the knob: bias in units of the layer's typical logit range
        self.protect_top = protect_top  # J: the router's top-J always get the bias
        self.applies_to = _phases(applies_to, "decode")
        self.range_ema: dict[int, float] = {}  # layer -> D_l

    def _ema(self, layer: int, ranges: torch.Tensor) -> torch.Tensor:
        """D_l after each token [T], tokens in order; the first token ever seeds it."""
        out = []
        d = self.range_ema.get(layer)
        for r in ranges.tolist():
            d = r if d is None else self.EMA_DECAY * d + (1 - self.EMA_DECAY) * r
            out.append(d)
        self.range_ema[layer] = d
        return torch.tensor(out, dtype=torch.float32)

    def select(self, layer, logits, weights, ids):
        z = logits.float()  # [T, E]
        d = self._ema(layer, z.amax(dim=-1) - z.amin(dim=-1))  # [T]
        m = _mask(self.resident(layer), z.shape[-1]).expand_as(z).clone()  # [T, E]
        if self.protect_top > 0:
            m.scatter_(1, z.topk(min(self.protect_top, z.shape[-1]), dim=-1).indices, True)
        z_prior = z + self.lam * d[:, None] * m  # [T, E]
        chosen = z_prior.topk(ids.shape[-1], dim=-1).indices  # [T, k]
        order = z.gather(1, chosen).argsort(dim=-1, descending=True, stable=True)
        chosen = chosen.gather(1, order)  # router's order
        if torch.equal(chosen, ids):
            return weights, ids
        return self.rule.mix(logits, chosen), chosen


class CacheMaxRankRouting:
    """Cache-conditional experts, max-rank rule: each non-protected choice (rank >= J) that holds no
    cache slot is swapped for a cached expert ranked within the top `max_rank` by the router, best
    ranked first; when there are fewer such experts than uncached choices, the best-ranked uncached
    choices stay. Weights are the original softmax over the chosen set (WeightRule)."""

    name = "cache-aware-max-rank"
    exact = False

    def __init__(self, *, resident: Resident, rule: WeightRule, max_rank: int, protect_top: int,
                 applies_to: str | None = None) -> None:
        self.resident = resident
        self.rule = rule
        self.max_rank = max_rank  # the knob: how far down the router's ranking a cached expert may come from
        self.protect_top = protect_top
        self.applies_to = _phases(applies_to, "decode")

    def select(self, layer, logits, weights, ids):
        z = logits.float()  # [T, E]
        k = ids.shape[-1]
        rank = _rank(z)  # [T, E]
        cached = _mask(self.resident(layer), z.shape[-1]).expand_as(z)  # [T, E]
        cls = torch.full_like(rank, 3)  # the rest
        cls[(rank < k) & ~cached] = 2  # uncached original choices
        cls[(rank < self.max_rank) & cached] = 1  # cached within the maximum rank
        cls[rank < self.protect_top] = 0  # protected
        chosen = _pick_by_class(cls, z, k)
        if torch.equal(chosen, ids):
            return weights, ids
        return self.rule.mix(logits, chosen), chosen


class SpeculativeRouting:
    """Speculating experts: a routed expert that is not resident is replaced by an expert the
    predictor guessed for this layer (the latest prediction, made at an earlier layer) that is,
    best router score first; routed experts that are resident stay; without such a guess the routed
    expert is loaded as usual. Weights: the router's softmax over the chosen set. Resident means
    holding a slot: a guess still loading counts, its read started before a demand read could."""

    name = "speculative"
    exact = False

    def __init__(self, *, resident: Resident, predicted: Predicted, rule: WeightRule,
                 applies_to: str | None = None) -> None:
        self.resident = resident
        self.predicted = predicted
        self.rule = rule
        self.applies_to = _phases(applies_to, "decode")

    def select(self, layer, logits, weights, ids):
        held = self.resident(layer)
        guesses = [e for e in self.predicted(layer) if e in held]
        if not guesses or all(int(e) in held for e in ids.unique().tolist()):
            return weights, ids
        z = logits.float()  # [T, E]
        routed = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)  # [T, E]
        res = _mask(held, z.shape[-1]).expand_as(z)
        guess = _mask(guesses, z.shape[-1]).expand_as(z)
        cls = torch.full(z.shape, 3, dtype=torch.long)
        cls[routed & ~res] = 2  # routed, would miss
        cls[guess & ~routed] = 1  # predicted and resident
        cls[routed & res] = 0  # routed and resident
        chosen = _pick_by_class(cls, z, ids.shape[-1])
        if torch.equal(chosen, ids):
            return weights, ids
        return self.rule.mix(logits, chosen), chosen


class PregateRouting:
    """Read-ME: every layer routes each token to the experts the pre-gate chose for it before the
    first layer ran (prefetch pregate), so a step's whole routing is known, and requested, ahead.
    Weights: the layer's router softmax over the chosen set. Exact only for a model whose routers
    the pre-gate matches; otherwise lossy like every policy here, and measured the same way."""

    name = "pregate"
    exact = False
    needs_start = True  # the engine runs the pre-gate at each forward's start even with prefetch paused

    def __init__(self, *, pregated: Pregated, rule: WeightRule, applies_to: str | None = None) -> None:
        self.pregated = pregated
        self.rule = rule
        self.applies_to = _phases(applies_to, "both")

    def select(self, layer, logits, weights, ids):
        chosen = self.pregated(layer)
        if chosen is None or chosen.shape != ids.shape:
            return weights, ids
        if ids.shape[0] == 1 and sorted(chosen.tolist()[0]) == sorted(ids.tolist()[0]):
            return weights, ids  # a decode step the router agrees with (the usual case): nothing to re-mix
        z = logits.float()
        chosen = chosen.gather(1, z.gather(1, chosen).argsort(dim=-1, descending=True, stable=True))  # router order
        if torch.equal(chosen, ids):
            return weights, ids
        return self.rule.mix(logits, chosen), chosen


def _adaptive(**kw) -> AdaptiveGating:
    path = kw.get("calibration") or (Path(kw["model_dir"]) / CALIBRATION_FILE if kw.get("model_dir") else None)
    if path is None:
        raise ValueError("adaptive-gating needs a calibration file: run `expertcache calibrate` and pass --calibration")
    return AdaptiveGating.from_file(path, rule=kw["rule"], top_k=kw["top_k"], layers=kw["layers"],
                                    applies_to=kw.get("applies_to"))


def _cache_aware(**kw) -> CacheAwareRouting:
    _warn_protect(kw)
    return CacheAwareRouting(resident=kw["resident"], rule=kw["rule"], lam=kw["cache_lambda"],
                             protect_top=kw["cache_protect_top"], applies_to=kw.get("applies_to"))


def _cache_max_rank(**kw) -> CacheMaxRankRouting:
    _warn_protect(kw)
    return CacheMaxRankRouting(resident=kw["resident"], rule=kw["rule"], max_rank=kw["cache_max_rank"],
                               protect_top=kw["cache_protect_top"], applies_to=kw.get("applies_to"))


def _warn_protect(kw: dict) -> None:
    j, k = kw["cache_protect_top"], kw.get("top_k")
    if k is not None and j >= k:
        log.warning("--cache-protect-top %d >= top-%d: every choice is protected, cache-aware routing "
                    "changes nothing (use --cache-protect-top %d)", j, k, max(k - 1, 0))


ROUTINGS: dict[str, Callable[..., RoutingPolicy]] = {
    "exact": lambda **kw: ExactRouting(),
    "adaptive-gating": _adaptive,
    "cache-aware": _cache_aware,
    "cache-aware-max-rank": _cache_max_rank,
    "speculative": lambda **kw: SpeculativeRouting(resident=kw["resident"], predicted=kw["predicted"],
                                                   rule=kw["rule"], applies_to=kw.get("applies_to")),
    "pregate": lambda **kw: PregateRouting(pregated=kw["pregated"], rule=kw["rule"], applies_to=kw.get("applies_to")),
}


def make_routing(name: str, **kwargs) -> RoutingPolicy:
    """Build a routing policy by name. Keywords (each policy takes what it needs): rule (WeightRule),
    top_k, layers, resident, predicted, pregated, calibration, model_dir, cache_lambda, cache_protect_top,
    cache_max_rank, applies_to ("prefill" | "decode" | "both"; None = the policy's default)."""
    if name not in ROUTINGS:
        raise ValueError(f"unknown routing {name!r}: choose one of {', '.join(ROUTINGS)}")
    if name != "exact" and kwargs.get("rule") is None:
        raise ValueError(f"routing {name!r} re-mixes softmax router weights, and this model's router is not a softmax: use exact")
    return ROUTINGS[name](**kwargs)


def drop_threshold(c: float, sensitivity: float) -> float:
    """AdapMoE's threshold t_l = sqrt(c / H_l) (a layer with zero sensitivity drops everything droppable)."""
    return math.sqrt(c / sensitivity) if sensitivity > 0 else math.inf
