"""default-vector (speculating experts, docs/techniques.md): guess layer l+1's MoE input from
layer l's post-attention residual r plus each routed expert's typical output ("default vector" v,
its mean output on calibration text): x' = norm[l+1](r + sum_k w_k v[l, e_k] + mean shared output),
then router[l+1](x'). Deeper targets chain the step with the guessed top-k; layer l+1's attention
is not guessed (the method's error term). Vectors: `expertcache train-predictor --kind default-vector`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import gemm
from ..errors import ExpertCacheError
from .base import Lookahead, Prediction, rank


class DefaultVectorPredictor:
    name = "default-vector"

    def __init__(
        self,
        *,
        norms: dict[int, nn.Module],  # layer -> the decoder layer's norm in front of its MoE block
        routers: dict[int, torch.Tensor],
        vectors: dict[int, torch.Tensor],  # layer -> [E, H] mean output of each expert
        shared: dict[int, torch.Tensor],  # layer -> [H] mean shared-expert contribution (zeros if none)
        top_k: int,
        depth: int = 1,
    ) -> None:
        layers = sorted(routers)
        self._ahead = Lookahead(layers, depth)
        self._routers = routers
        self._vectors = vectors
        self._shared = shared
        self._top_k = top_k
        missing = [l for l in layers if norms.get(l) is None]
        if missing:
            raise ExpertCacheError(f"default-vector needs the norm in front of each MoE block, which layer {missing[0]} lacks")
        self._norms: dict[int, nn.Module] = {l: norms[l] for l in layers}
        self._residual: dict[int, torch.Tensor] = {}  # layer -> [T, H] latest post-attention residual
        self._routed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> latest (weights [T, k], ids [T, k])
        # the residual is the one input the MoE block does not see: read it where the layer norms it
        self._hooks = [norm.register_forward_pre_hook(self._capture(l)) for l, norm in self._norms.items()]

    def _capture(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._residual[layer] = args[0]

        return hook

    def observe(self, layer: int, x, logits, weights: torch.Tensor, ids: torch.Tensor) -> None:
        self._routed[layer] = (weights, ids)

    def _moe_guess(self, layer: int, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum_k w_k v[layer, e_k] + shared mean -> [T, H] (dropped slots, id -1, add nothing)."""
        v = self._vectors[layer]  # [E, H]
        w = weights.float() * (ids >= 0)  # [T, k]
        return torch.baddbmm(self._shared[layer], w.unsqueeze(1), v[ids.clamp(min=0)]).squeeze(1)  # [T, H]

    def predict(self, layer: int, x: torch.Tensor, logits: torch.Tensor) -> Prediction:
        residual = self._residual.get(layer)
        routed = self._routed.get(layer)
        if residual is None or routed is None:
            return []
        r = residual.reshape(-1, residual.shape[-1]).float()  # [T, H]
        weights, ids = routed
        source = layer
        out: Prediction = []
        targets = self._ahead.targets(layer)
        for i, (_, target) in enumerate(targets):
            r = r + self._moe_guess(source, weights, ids)  # [T, H]: guessed residual entering `target`
            norm = self._norms[target]
            guess = norm.forward(r.to(residual.dtype))  # [T, H]; forward(), not __call__: no hook fires
            w = self._routers[target]
            scores = gemm.linear(guess.to(w.dtype), w)  # [T, E]
            out.append((target, rank(scores, self._top_k)))
            if i + 1 < len(targets):  # chain: the guessed routing of `target` feeds the next guess
                weights, ids = scores.float().softmax(dim=-1).topk(self._top_k, dim=-1)  # [T, k] each
                weights = weights / weights.sum(dim=-1, keepdim=True)
                source = target
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
