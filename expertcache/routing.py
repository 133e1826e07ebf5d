"""Routing policies: from a layer's router output to the experts that run and their weights.

Exact routing (the default) keeps the model's own choice, so outputs equal transformers'. Lossy
policies (adaptive gating, cache-aware, speculative) are opt-in and live beside it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class RoutingPolicy(Protocol):
    name: str
    exact: bool

    def select(
        self, layer: int, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class ExactRouting:
    """The model's own top-k, weights exactly as transformers computes them."""

    name = "exact"
    exact = True

    def select(self, layer, logits, weights, ids):
        return weights, ids


ROUTINGS: dict[str, Callable[..., RoutingPolicy]] = {"exact": lambda **kw: ExactRouting()}


def make_routing(name: str, **kwargs) -> RoutingPolicy:
    if name not in ROUTINGS:
        raise ValueError(f"unknown routing {name!r}: choose one of {', '.join(ROUTINGS)}")
    return ROUTINGS[name](**kwargs)
