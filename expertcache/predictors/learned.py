"""learned (ProMoE): a small MLP per (layer, distance) from layer l's MoE input to the experts of
layer l+d, trained offline on recorded routing (`expertcache train-predictor --kind learned`).

Each net is a linear part, initialised from the target layer's own router (so an untrained net is
exactly the next-gate guess), plus a one-hidden-layer MLP whose output starts at zero and learns
what the linear guess gets wrong: the drift of the residual stream over d layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Lookahead, Prediction, rank

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # name -> function, recorded in the predictor file
DEFAULT_ACTIVATION = "relu"  # as good as GELU and cheaper per decode step (docs/prefetch-experiments.md)


class ExpertMLP(nn.Module):
    """scores [T, E] = skip(x) + fc2(act(fc1(x)))."""

    def __init__(self, hidden_size: int, num_experts: int, width: int, activation: str = DEFAULT_ACTIVATION) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown predictor activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.skip = nn.Linear(hidden_size, num_experts)
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, num_experts)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        nn.init.zeros_(self.skip.bias)

    @classmethod
    def from_router(cls, router: torch.Tensor, width: int, activation: str = DEFAULT_ACTIVATION) -> "ExpertMLP":
        num_experts, hidden = router.shape
        net = cls(hidden, num_experts, width, activation)
        with torch.no_grad():
            net.skip.weight.copy_(router.float())
        return net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.fc2(self.act(self.fc1(x)))


class LearnedPredictor:
    name = "learned"

    def __init__(self, *, nets: dict[tuple[int, int], ExpertMLP], layers: list[int], top_k: int, depth: int = 1) -> None:
        self._ahead = Lookahead(layers, depth)
        self._top_k = top_k
        # each net as two plain matmuls around its activation, so a decode step pays for three small
        # ops per target instead of five module calls: skip(x) = act(s) - act(-s) with s = skip's
        # pre-activation (true of ReLU and GELU alike: act(s) - act(-s) = s), so
        #   scores = [I, -I, fc2] @ act([skip; -skip; fc1] @ x + b_in) + fc2.bias
        self._weights: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._act = {key: net.act for key, net in nets.items()}
        for key, net in nets.items():
            with torch.no_grad():
                skip_w, skip_b = net.skip.weight.detach().float(), net.skip.bias.detach().float()
                eye = torch.eye(skip_w.shape[0])
                w_in = torch.cat([skip_w, -skip_w, net.fc1.weight.detach().float()]).contiguous()  # [2E + M, H]
                b_in = torch.cat([skip_b, -skip_b, net.fc1.bias.detach().float()]).contiguous()  # [2E + M]
                w_out = torch.cat([eye, -eye, net.fc2.weight.detach().float()], dim=1).contiguous()  # [E, 2E + M]
                self._weights[key] = (w_in, b_in, w_out, net.fc2.bias.detach().float().clone())

    def scores(self, d: int, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[T, E]: the net's forward (to float rounding)."""
        w_in, b_in, w_out, b_out = self._weights[(d, layer)]
        return F.linear(self._act[(d, layer)](F.linear(x, w_in, b_in)), w_out, b_out)  # [T, E]

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        out: Prediction = []
        xf = x.float()
        for d, target in self._ahead.targets(layer):
            out.append((target, rank(self.scores(d, layer, xf), self._top_k)))
        return out
