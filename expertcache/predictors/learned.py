"""learned (ProMoE): a small MLP per (layer, distance) from layer l's MoE input to the experts of
layer l+d, trained offline on recorded routing (`expertcache train-predictor --kind learned`).

Each net is a linear part, initialised from the target layer's own router (so an untrained net is
exactly the next-gate guess), plus a one-hidden-layer MLP whose output starts at zero and learns
what the linear guess gets wrong: the drift of the residual stream over d layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Lookahead, Prediction, rank

DEFAULT_WIDTH = 128  # hidden units per net: small next to the model, cheap per token


class ExpertMLP(nn.Module):
    """scores [T, E] = skip(x) + fc2(gelu(fc1(x)))."""

    def __init__(self, hidden_size: int, num_experts: int, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.skip = nn.Linear(hidden_size, num_experts)
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, num_experts)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        nn.init.zeros_(self.skip.bias)

    @classmethod
    def from_router(cls, router: torch.Tensor, width: int = DEFAULT_WIDTH) -> "ExpertMLP":
        num_experts, hidden = router.shape
        net = cls(hidden, num_experts, width)
        with torch.no_grad():
            net.skip.weight.copy_(router.float())
        return net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.fc2(nn.functional.gelu(self.fc1(x)))


class LearnedPredictor:
    name = "learned"

    def __init__(self, *, nets: dict[tuple[int, int], ExpertMLP], layers: list[int], top_k: int, depth: int = 1) -> None:
        self._nets = nets  # (d, source layer) -> net
        self._ahead = Lookahead(layers, depth)
        self._top_k = top_k
        for net in nets.values():
            net.eval().requires_grad_(False)

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        out: Prediction = []
        xf = x.float()
        for d, target in self._ahead.targets(layer):
            scores = self._nets[(d, layer)](xf)  # [T, E]
            out.append((target, rank(scores, self._top_k)))
        return out
