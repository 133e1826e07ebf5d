"""history: the experts recent tokens used at the target layer, most frequent first.

Tokens near each other reuse experts (docs/techniques.md: previous-token reuse), so the guess for
layer l+d is the experts that the last
`window` tokens routed to at l+d, each counted with weight decay**age; the top_k most voted are
the guess (as many as a token routes to, like every predictor's guess for one token). Needs no
calibration and no view of the hidden state; it cannot guess a layer before it has seen a token there.
"""

from __future__ import annotations

from collections import deque

import torch

from .base import Lookahead, Prediction

DEFAULT_WINDOW = 8  # tokens remembered per layer: older routing says little about the next token
DEFAULT_DECAY = 0.7  # weight of a token's vote per step of age: the latest token counts most


class HistoryPredictor:
    name = "history"

    def __init__(
        self, *, layers: list[int], top_k: int, depth: int = 1, window: int = DEFAULT_WINDOW, decay: float = DEFAULT_DECAY
    ) -> None:
        if window < 1 or not 0 < decay <= 1:
            raise ValueError(f"history needs window >= 1 and decay in (0, 1], got {window}, {decay}")
        self._ahead = Lookahead(layers, depth)
        self._decay = decay
        self._top_k = top_k
        self._recent: dict[int, deque[list[int]]] = {l: deque(maxlen=window) for l in layers}  # newest last

    def observe(self, layer: int, x, logits, weights, ids: torch.Tensor) -> None:
        recent = self._recent[layer]
        for row in ids[-recent.maxlen :].tolist():  # [k] per token, in token order
            recent.append([e for e in row if e >= 0])

    def scores(self, layer: int) -> dict[int, float]:
        """Decayed vote of each expert recently routed at `layer`."""
        out: dict[int, float] = {}
        weight = 1.0
        for experts in reversed(self._recent[layer]):
            for e in experts:
                out[e] = out.get(e, 0.0) + weight
            weight *= self._decay
        return out

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        out: Prediction = []
        for _, target in self._ahead.targets(layer):
            votes = self.scores(target)
            if votes:
                out.append((target, sorted(votes, key=lambda e: (-votes[e], e))[: self._top_k]))
        return out

    def reset(self) -> None:
        """Forget every layer's history (a new, unrelated sequence)."""
        for recent in self._recent.values():
            recent.clear()
