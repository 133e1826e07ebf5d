"""Predictors: which experts later layers will need, guessed while the current layer runs.

A predictor sees the current MoE layer's input and router logits and returns, for each layer it
looks ahead to, experts in the order they should be loaded (most likely first). Predictors only
guess: exactness never depends on them, only speed does. Registered by name; the engine builds
the one EngineConfig.prefetch names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

Prediction = list[tuple[int, list[int]]]  # [(target layer, experts most likely first)]


class Predictor(Protocol):
    name: str

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction: ...


class NoPredictor:
    """Load on demand only."""

    name = "none"

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        return []


class NextGatePredictor:
    """AdapMoE's next-gate guess: apply layer l+d's router to layer l's MoE input.

    The residual stream changes little between adjacent layers, so layer l+1's router applied to
    layer l's (normalised) MoE input picks most of layer l+1's experts."""

    name = "next-gate"

    def __init__(self, *, routers: dict[int, torch.Tensor], top_k: int, depth: int = 1) -> None:
        self._routers = routers  # sparse layer -> router weight [E, H]
        self._layers = sorted(routers)
        self._top_k = top_k
        self._depth = depth

    def targets(self, layer: int) -> list[int]:
        i = self._layers.index(layer)
        return self._layers[i + 1 : i + 1 + self._depth]

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        out: Prediction = []
        for target in self.targets(layer):
            w = self._routers[target]
            scores = F.linear(x.to(w.dtype), w)  # [T, E]
            top = scores.topk(self._top_k, dim=-1).indices  # [T, k]
            counts = torch.bincount(top.flatten(), minlength=w.shape[0])  # [E]
            order = torch.argsort(counts, descending=True, stable=True)
            out.append((target, [int(e) for e in order if counts[e] > 0]))
        return out


PREDICTORS: dict[str, Callable[..., Predictor]] = {
    "none": lambda **kw: NoPredictor(),
    "next-gate": lambda **kw: NextGatePredictor(routers=kw["routers"], top_k=kw["top_k"], depth=kw.get("depth", 1)),
}


def make_predictor(name: str, **kwargs) -> Predictor:
    if name not in PREDICTORS:
        raise ValueError(f"unknown prefetch predictor {name!r}: choose one of {', '.join(PREDICTORS)}")
    return PREDICTORS[name](**kwargs)
