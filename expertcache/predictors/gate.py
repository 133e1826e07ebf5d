"""Predictors that apply a later layer's own router to a guess of that layer's MoE input.

none: no guess. next-gate (AdapMoE): the guess is layer l's MoE input itself. estimator
(speculating experts, section 4): the guess is a least-squares linear map of layer l's MoE input,
fitted per (layer, distance) on calibration text by `expertcache train-predictor --kind estimator`.
"""

from __future__ import annotations

import torch

from .. import gemm
from .base import Lookahead, Prediction, rank


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
        self._ahead = Lookahead(list(routers), depth)
        self._top_k = top_k

    def targets(self, layer: int) -> list[int]:
        return [t for _, t in self._ahead.targets(layer)]

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        out: Prediction = []
        for _, target in self._ahead.targets(layer):
            w = self._routers[target]
            scores = gemm.linear(x.to(w.dtype), w)  # [T, E] (a few bf16 rows on an AMX CPU: amm, F.linear's bits)
            out.append((target, rank(scores, self._top_k)))
        return out


class EstimatorPredictor:
    """Layer l+d's router applied to A x + b, a linear estimate of layer l+d's MoE input from
    layer l's (A, b fitted by least squares on calibration text)."""

    name = "estimator"

    def __init__(
        self,
        *,
        routers: dict[int, torch.Tensor],
        maps: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],  # (d, source layer) -> (A [H, H], b [H])
        top_k: int,
        depth: int = 1,
    ) -> None:
        self._routers = routers
        self._maps = maps
        self._ahead = Lookahead(list(routers), depth)
        self._top_k = top_k

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        out: Prediction = []
        xf = x.float()
        for d, target in self._ahead.targets(layer):
            a, b = self._maps[(d, layer)]
            guess = torch.addmm(b, xf, a)  # [T, H]: estimated MoE input of the target layer
            w = self._routers[target]
            scores = gemm.linear(guess.to(w.dtype), w)  # [T, E]
            out.append((target, rank(scores, self._top_k)))
        return out
