"""OffloadedMoE: the sparse-MoE block with its experts in an ExpertCache instead of in memory.

One call, for T tokens of one layer:

    x [T, H] -> router (the model's own module) -> logits [T, E], weights [T, k], ids [T, k]
      -> routing policy in the phases it applies to (exact by default: unchanged; a dropped slot is id -1)
      -> cache.preempt: this layer's unneeded speculative loads are wrong guesses (cancel / evict first)
      -> in waves of at most `capacity` distinct experts:
           cache.acquire: hits pinned now, misses start demand loads
           (first wave) predictor guesses later layers -> cache.prefetch at low priority
           compute ready experts first, the rest as they arrive -> contributions [T, k, H]
           cache.release
      -> in a sweep (a long prompt), the guesses again: this layer's finished experts make room
      -> sum over k in transformers' own order and dtype (+ shared expert) -> [T, H]

The contributions are combined exactly as transformers' grouped_mm path does (weighted per
(token, slot), summed over k, cast to the hidden dtype), so readiness order never changes results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cache import ExpertCache
from .predictors import Predictor
from .predictors.base import rank
from .routing import RoutingPolicy

ONE_TOKEN_PATH = True  # decode steps skip the token/slot search (tests compare both paths bit for bit)

RouteObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class BlockContext:
    """What every offloaded block shares: injected by the engine."""

    cache: ExpertCache
    predictor: Predictor
    routing: RoutingPolicy
    observers: list[RouteObserver] = field(default_factory=list)  # (layer, x, logits, weights, ids)
    prefetch_enabled: bool = True
    predictions: dict[int, list[int]] = field(default_factory=dict)  # layer -> latest guess for it (speculative routing)
    lead_guesses: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts requested before its call (FirstLayerPrefetch)


class OffloadedMoE(nn.Module):
    def __init__(
        self,
        *,
        layer: int,
        gate: nn.Module,
        act_fn: nn.Module,
        fused: bool,
        context: BlockContext,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.gate = gate  # the model's own router module: logits, weights and ids exactly as transformers
        self.act_fn = act_fn
        self.fused = fused  # expert parts are (gate_up, down) rather than (gate, up, down)
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.ctx = context

    def _expert(self, x: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if parts[0].dtype != x.dtype:  # EngineConfig.dtype overrides the checkpoint's: cast on use,
            parts = tuple(p.to(x.dtype) for p in parts)  # as transformers casts at load (the cache keeps the saved bytes)
        if self.fused:
            gate_up, down = parts
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # [n, I] each
        else:
            w_gate, w_up, down = parts
            gate, up = F.linear(x, w_gate), F.linear(x, w_up)  # [n, I] each
        return F.linear(self.act_fn(gate) * up, down)  # [n, H]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        logits, weights, ids = self.gate(x)  # [T, E], [T, k], [T, k]
        phase = "decode" if hidden_states.dim() == 3 and shape[1] == 1 else "prefill"
        if phase in self.ctx.routing.applies_to:
            weights, ids = self.ctx.routing.select(self.layer, logits, weights, ids)  # dropped slots: id -1
        for observe in self.ctx.observers:
            observe(self.layer, x, logits, weights, ids)
        self.ctx.lead_guesses.pop(self.layer, None)  # observers (a trace recorder) have seen it
        out = self._experts(x, logits, weights, ids)  # [T, H]
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)

    def _experts(self, x, logits, weights, ids) -> torch.Tensor:
        cache = self.ctx.cache
        needed = [e for e in torch.unique(ids).tolist() if e >= 0]  # sorted distinct experts, dropped slots skipped
        cache.preempt(self.layer, needed)
        contrib = torch.zeros(
            (*ids.shape, x.shape[-1]), dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device
        )  # [T, k, H]
        single = ids[0].tolist() if ids.shape[0] == 1 and ONE_TOKEN_PATH else None  # a token's k experts, in slot order
        if single is not None and len(set(single)) < len(single):
            single = None  # an expert in two slots (no routing policy makes one): the general path covers both
        guesses: list[tuple[int, list[int]]] = []
        for start in range(0, len(needed), cache.capacity):
            wave = cache.acquire(self.layer, needed[start : start + cache.capacity])
            try:
                if start == 0 and self.ctx.prefetch_enabled:
                    guesses = self._prefetch(x, logits)
                pending = list(wave)
                while pending:
                    # nothing ready: wait for the load that arrives first (prefetched ones lead), not the lowest id
                    ready = [e for e in pending if cache.ready(e)] or [min(pending, key=cache.arrival_key)]
                    for eid in ready:
                        if single is not None:  # one token (a decode step): its slot, no index search
                            s = single.index(eid[1])
                            contrib[0, s] = self._expert(x, cache.weights(eid))[0] * weights[0, s : s + 1]  # [1], not 0-d: dtype promotion as before
                        else:
                            tok, slot = torch.nonzero(ids == eid[1], as_tuple=True)
                            y = self._expert(x[tok], cache.weights(eid))  # [n, H]
                            contrib[tok, slot] = y * weights[tok, slot, None]
                        pending.remove(eid)
            finally:
                cache.release(wave)
        if guesses and cache.core.sweep == self.layer:
            # a sweep: guesses could not take the slots Belady keeps while this layer computed;
            # now its own experts are done (used furthest ahead), they make room for the rest
            cache.core.end_call()
            self._request(guesses, after=True)
        return contrib.sum(dim=1).to(x.dtype)

    def _prefetch(self, x: torch.Tensor, logits: torch.Tensor) -> list[tuple[int, list[int]]]:
        guesses = self.ctx.predictor.predict(self.layer, x, logits)
        self.ctx.predictions.update(guesses)
        self._request(guesses, after=False)
        return guesses

    def _request(self, guesses: list[tuple[int, list[int]]], *, after: bool) -> None:
        eids = [(target, e) for target, experts in guesses for e in experts]
        if eids:
            core = self.ctx.cache.core
            keep = core.guess_keep(self.layer, max(t for t, _ in guesses), self.ctx.predictions, after=after)
            self.ctx.cache.prefetch(eids, keep_layers=keep)


def all_experts_likely(tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether `tokens` tokens, routed uniformly, leave less than half an expert of a layer unused
    in expectation (E (1 - k/E)^T < 1/2): from about 10 tokens at 8 experts top-2, 86 at 128 top-8."""
    return num_experts * (1 - top_k / num_experts) ** tokens < 0.5


class FirstLayerPrefetch:
    """The first sparse layer, which no predictor sees ahead of time (each guesses from an earlier
    MoE layer): its experts are requested when the first decoder layer starts, so they load behind
    the embeddings and attention. A prompt long enough to use every expert gets all of them; a
    shorter call (a decode step) gets what the layer's own norm and router choose for the token's
    input without the attention's contribution (on the demo model 93.6% of layer 0's experts: a
    token's embedding decides most of its first routing). A forward pre-hook on the first decoder
    layer; `router` and `norm` are that sparse layer's (None: only long prompts are served).

    A token's input to the first decoder layer is a function of its id alone, so a decode step's
    guess is remembered by the input's bytes (MEMO_BYTES of keys at most): a token seen before costs
    a lookup instead of a norm, a router and a top-k."""

    MEMO_BYTES = 16 << 20

    def __init__(self, ctx: BlockContext, layer: int, num_experts: int, top_k: int,
                 router: nn.Module | None = None, norm: nn.Module | None = None) -> None:
        self.ctx, self.layer, self.num_experts, self.top_k = ctx, layer, num_experts, top_k
        self.router, self.norm = router, norm
        self._memo: dict[bytes, list[int]] = {}
        self._memo_bytes = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        tokens = hidden.shape[0] * hidden.shape[1] if hidden is not None and hidden.dim() == 3 else 0
        if not self.ctx.prefetch_enabled or tokens == 0:
            return
        if tokens > 1 and all_experts_likely(tokens, self.num_experts, self.top_k):
            experts = list(range(self.num_experts))
        elif self.router is not None and self.norm is not None:
            experts = self._guess(hidden, tokens)
        else:
            return
        self.ctx.lead_guesses[self.layer] = experts
        self.ctx.cache.prefetch([(self.layer, e) for e in experts], keep_layers={self.layer})

    def _guess(self, hidden: torch.Tensor, tokens: int) -> list[int]:
        key = hidden.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if tokens == 1 else None
        experts = self._memo.get(key) if key is not None else None
        if experts is None:
            logits = self.router(self.norm(hidden).reshape(tokens, hidden.shape[-1]))[0]  # [T, E]
            experts = rank(logits, self.top_k)
            if key is not None:
                if self._memo_bytes + len(key) > self.MEMO_BYTES:
                    self._memo.clear()
                    self._memo_bytes = 0
                self._memo[key] = experts
                self._memo_bytes += len(key)
        return list(experts)
