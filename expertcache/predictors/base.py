"""The Predictor protocol and what every predictor shares: lookahead targets and expert ranking.

A predictor sees the running MoE layer's input x [T, H] and router logits [T, E] and returns, for
each later layer it looks ahead to, experts in the order they should be loaded (most likely
first). Predictors that need more than (x, logits) -- the routed experts, the residual stream --
get it through `observe` (the engine calls it with every layer's routing) or hooks of their own.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..ids import Prediction


class Predictor(Protocol):
    name: str

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction: ...


class Lookahead:
    """Targets of a predictor that looks `depth` sparse layers ahead."""

    def __init__(self, layers: list[int], depth: int) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.layers = sorted(layers)
        self.depth = depth
        self._index = {l: i for i, l in enumerate(self.layers)}

    def targets(self, layer: int) -> list[tuple[int, int]]:
        """[(distance d in sparse layers, target layer)] for d = 1..depth that exist."""
        i = self._index[layer]
        return [(d, self.layers[i + d]) for d in range(1, self.depth + 1) if i + d < len(self.layers)]


def rank(scores: torch.Tensor, k: int) -> list[int]:
    """Experts in any token's top-k of `scores` [T, E], most often chosen first; ties go to the
    higher mean probability, so for one token the order is the scores' own."""
    if scores.shape[0] == 1:  # a decode step: the token's own top-k, best first (the hot path: one op)
        return scores[0].topk(k).indices.tolist()
    top = scores.topk(k, dim=-1).indices  # [T, k]
    counts = torch.bincount(top.flatten(), minlength=scores.shape[-1]).tolist()  # [E]
    prob = scores.double().softmax(dim=-1).mean(dim=0).tolist()  # [E], each < 1 unless one-hot
    key = [c + min(p, 0.999) for c, p in zip(counts, prob)]  # the count decides; the probability only breaks ties
    return sorted((e for e, c in enumerate(counts) if c > 0), key=lambda e: -key[e])  # stable: equal keys by index


class CappedPredictor:
    """At most `max_per_layer` experts per target layer in a decode step: bounds the bytes a wrong
    guess can waste. Prefill calls keep every guess (a long prompt uses nearly every expert)."""

    def __init__(self, inner: Predictor, max_per_layer: int) -> None:
        if max_per_layer < 1:
            raise ValueError(f"prefetch max must be at least 1 expert per layer, got {max_per_layer}")
        self.inner = inner
        self.name = inner.name
        self.max_per_layer = max_per_layer

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        guesses = self.inner.predict(layer, x, logits)
        if x.shape[0] > 1:
            return guesses
        return [(target, experts[: self.max_per_layer]) for target, experts in guesses]

    def __getattr__(self, name: str):  # a pre-gate's hooks and state, as they are
        if name in ("start", "reset", "routes", "routes_of", "bind", "forget", "streams"):
            return getattr(self.inner, name)
        raise AttributeError(name)

    def observe(self, layer: int, x, logits, weights, ids) -> None:
        observe = getattr(self.inner, "observe", None)
        if observe is not None:
            observe(layer, x, logits, weights, ids)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
