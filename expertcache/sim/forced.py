"""Forced routing: a model routes as a recorded real trace did, for timings that see real locality.

Random weights route near-uniformly, which no trained model does; `TraceRouting` makes a
checkpoint's MoE layers pick the experts a real model picked, token by token (a benchmark mode,
never exact: the text it computes means nothing). The trace's shape is mapped onto the model's:
- sparse layer i of n takes trace layer floor(i * L / n) of the trace's L;
- trace expert e of E' becomes e * E // E' (128 -> 64: neighbouring pairs merge);
- a token's mapped experts, deduplicated in the trace's slot order, fill its top-k slots; slots left
  (a smaller trace top-k, or merged pairs) take the model's own best remaining experts;
- mixing weights follow the family's WeightRule over the chosen experts.
Each forward's rows take the next trace tokens (decode tokens of every turn, in order, cycling).
"""

from __future__ import annotations

import numpy as np
import torch

from ..routing import WeightRule
from .trace import Trace


class TraceRouting:
    """A RoutingPolicy that replays a trace's decode routing (see the module)."""

    name = "trace"
    exact = False
    applies_to = ("prefill", "decode")

    def __init__(self, trace: Trace, *, layers: list[int], num_experts: int, top_k: int, rule: WeightRule) -> None:
        src = trace.shape
        self.layers = list(layers)
        self.rule = rule
        src_layer = {l: src.sparse_layers[i * len(src.sparse_layers) // len(self.layers)] for i, l in enumerate(self.layers)}
        tokens: dict[tuple[int, int], dict[int, list[int]]] = {}  # (turn, step) -> trace layer -> experts
        for r in trace.routes:
            if r.decode:
                tokens.setdefault((r.turn, r.step), {})[r.layer] = [int(e) for e in r.ids[0] if e >= 0]
        order = sorted(tokens)
        if not order:
            raise ValueError("the trace has no decode tokens to replay")
        # [tokens, layers, k] mapped experts, -1 where a slot is left to the model
        self.table = np.full((len(order), len(self.layers), top_k), -1, dtype=np.int64)
        for t, key in enumerate(order):
            for j, l in enumerate(self.layers):
                picked: list[int] = []
                for e in tokens[key].get(src_layer[l], []):
                    m = e * num_experts // src.num_experts
                    if m not in picked:
                        picked.append(m)
                picked = picked[:top_k]
                self.table[t, j, : len(picked)] = picked
        self._col = {l: j for j, l in enumerate(self.layers)}
        self._pos = 0  # the next trace token
        self._base = 0  # the trace token of the running forward's first row

    def select(self, layer: int, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = logits.shape[0]
        if layer == self.layers[0]:  # a new forward: its rows take the next T trace tokens
            self._base, self._pos = self._pos, self._pos + T
        rows = (self._base + np.arange(T)) % len(self.table)
        forced = torch.from_numpy(self.table[rows, self._col[layer]])  # [T, k]
        own = torch.argsort(logits.float(), dim=-1, descending=True, stable=True)  # [T, E]
        out = forced.clone()
        for t in range(T):  # slots the trace left: the model's best experts not already chosen
            free = (out[t] < 0).nonzero().flatten()
            if len(free):
                taken = set(out[t][out[t] >= 0].tolist())
                fill = [int(e) for e in own[t] if int(e) not in taken][: len(free)]
                out[t, free] = torch.tensor(fill)
        out = out.to(ids.dtype)
        return self.rule.mix(logits, out).to(weights.dtype), out
