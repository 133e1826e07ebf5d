"""The experts implementation expertcache registers with transformers, and the state its calls share.

Every MoE family's experts module dispatches forward(hidden_states, top_k_index, top_k_weights)
through transformers' experts interface; a model built with experts_implementation="expertcache"
lands in ExpertsRuntime.forward. The router, shared experts and the rest of the MoE block stay
transformers' code; this module supplies each call's expert weights from the cache.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextlib import closing

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm, mxfp4
from .architectures import ExpertsSite, Family, child
from .cache import ExpertCache
from .config import AMX_ROWS, IDLE_GUESSES, PRECISION_PROBE, PRECISION_WARMUP
from .ids import Prediction
from .predictors.base import Predictor, rank
from .quant import QuantExperts
from .routing import RoutingPolicy

IMPLEMENTATION = "expertcache"  # the name under which transformers' experts interface knows us
ONE_TOKEN_PATH = True  # decode steps skip the token/slot search (tests compare both paths bit for bit)
TOKEN_EXPERTS_CALL = True  # a decode step's experts and their combine in one kernel call where each takes glu_expert (tests compare)

RouteObserver = Callable[[int, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor], None]  # (layer, x, logits, weights, ids)
GuessObserver = Callable[[int, Prediction], None]  # (layer of the call, [(target layer, experts)])


def register() -> None:
    """Make "expertcache" an experts implementation of transformers (its public registry)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers calls this for every experts module of a model built with our implementation."""
    binding = module.__dict__.get("_expertcache")
    if binding is None:
        raise RuntimeError("this experts module belongs to no expertcache engine: load the model with expertcache.load()")
    runtime, layer = binding
    return runtime.forward(module, layer, hidden_states, top_k_index, top_k_weights)


@functools.cache
def _own_math(cls: type) -> bool:
    """Whether an experts class computes an expert from its parts itself (expert_from_parts)."""
    return callable(getattr(cls, "expert_from_parts", None))


def _starts_sequence(hidden: torch.Tensor, kwargs: dict) -> bool:
    """Whether the forward whose first decoder layer gets `hidden` begins a sequence: its first
    position is 0 (a prompt, of any length); a later one continues it (a decode step, a prompt's
    next chunk). Without positions, a call of several tokens is taken for a prompt."""
    position = kwargs.get("position_ids")
    position = kwargs.get("cache_position") if position is None else position
    if position is None or not position.numel():
        return hidden.shape[1] > 1
    return int(position.reshape(-1)[0]) == 0


def _plain_act(act: nn.Module):
    """F.silu where the module is exactly a SiLU (torch's, not in place, or transformers'), with no
    hooks: the same op without a module call; None otherwise."""
    if act._forward_hooks or act._forward_pre_hooks:
        return None
    if type(act) is nn.SiLU:
        return None if act.inplace else F.silu
    return F.silu if _transformers_silu(type(act)) else None


@functools.cache
def _transformers_silu(cls: type) -> bool:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return False
    return cls is SiLUActivation


@functools.cache
def _default_gate(cls: type) -> bool:
    """Whether an experts class gates as transformers' default does: act(gate) * up (the engine's
    own experts class says so itself: native.Experts)."""
    if getattr(cls, "expertcache_default_gate", False):
        return True
    from transformers.integrations.moe import _default_apply_gate

    return getattr(cls, "_apply_gate", None) is _default_apply_gate


def _silu_gated(module: nn.Module) -> bool:
    """Whether an experts module computes silu(x gate) * (x up), then down, with nothing else:
    transformers' default gate, a plain SiLU (no hooks), no biases, no transposed layout, no
    post-expert norm, no math of its own."""
    cls = type(module)
    return (_default_gate(cls) and not _own_math(cls) and not module.is_transposed and not module.has_bias
            and not module.has_post_expert_norm and _plain_act(module.act_fn) is F.silu)


def _linear(x: torch.Tensor, w: torch.Tensor, transposed: bool, bias: torch.Tensor | None, upcast: bool) -> torch.Tensor:
    y = gemm.matmul(x, w, upcast=upcast) if transposed else gemm.linear(x, w, upcast=upcast)
    return y if bias is None else y + bias


def glu_call(module: nn.Module, x: torch.Tensor, parts: tuple[torch.Tensor, ...], quant: QuantExperts | None) -> tuple[int, int] | None:
    """glu_expert's (bits, group) where it computes this expert on x in one call (expert_output's
    chain: a silu-gated expert whose three products take amm, or qmm for quantized ones), else None."""
    if quant is None:
        if len(parts) == 3 and parts[0].dtype is x.dtype and _silu_gated(module) and gemm.amm_expert(x, *parts):
            return 16, 0
        return None
    if quant.glu_kernel(x) and not module.has_post_expert_norm and _default_gate(type(module)) and _plain_act(module.act_fn) is F.silu:
        return quant.scheme.bits, quant.scheme.group_size or 0
    return None


def expert_output(module: nn.Module, x: torch.Tensor, parts: tuple[torch.Tensor, ...], expert: int,
                  quant: QuantExperts | None = None, upcast: bool = False) -> torch.Tensor:
    """One expert of `module` on its tokens x [n, H] -> [n, H]: the module's own math (gating,
    biases, layout) on weights read from the cache; `quant`: (gate, up, down) are quantized
    (packed, scale) pairs, computed on by quant's kernels; `upcast`: half-precision products of
    several rows through float32 (gemm.py)."""
    if (call := glu_call(module, x, parts, quant)) is not None:  # the common cases first: the chains below in one call
        return torch.ops.expertcache.glu_expert(x, parts, *call)
    if quant is None and len(parts) == 3 and parts[0].dtype is x.dtype and _silu_gated(module):
        gate, up, down = parts  # act(gate) * up, then down, products not on amm
        g, u = gemm.linear_pair(x, gate, up, upcast=upcast)
        return gemm.linear(F.silu(g) * u, down, upcast=upcast)
    if quant is not None:  # one Linear each, [out, in], as the per-expert layout
        gu = quant.gate_up(x, parts)  # [n, 2I]: gate | up
        if _default_gate(type(module)):
            g, u = gu.chunk(2, dim=-1)
            h = (_plain_act(module.act_fn) or module.act_fn)(g) * u
        else:
            h = module._apply_gate(gu)
        y = quant.linear(h, parts, 2)
        return module.post_expert_norm(y) if module.has_post_expert_norm else y
    t, bias = module.is_transposed, module.has_bias
    if len(parts) == 4:  # MXFP4 (gate_up blocks, scales, down blocks, scales): decoded on use, [out, in]
        parts = tuple(mxfp4.decode(b, s, x.dtype) for b, s in (parts[:2], parts[2:]))
        parts = tuple(p.t().contiguous() for p in parts) if t else parts  # the module's own layout
    elif parts[0].dtype != x.dtype:  # EngineConfig.dtype overrides the checkpoint's: cast on use, as
        parts = tuple(p.to(x.dtype) for p in parts)  # transformers casts at load (the cache keeps the saved bytes)
    if _own_math(type(module)):  # a stand-in's own math on its parts as saved (DBRX)
        return module.expert_from_parts(x, parts)
    if len(parts) == 3:  # one tensor each on disk: (gate, up, down)
        gate, up, down = parts
        g, u = gemm.linear_pair(x, gate, up, upcast=upcast)  # [n, I] each
        h = (_plain_act(module.act_fn) or module.act_fn)(g) * u if _default_gate(type(module)) else module._apply_gate(torch.cat([g, u], dim=-1))
    else:
        w, down = parts
        name = "gate_up_proj_bias" if module.has_gate else "up_proj_bias"
        h = _linear(x, w, t, getattr(module, name)[expert] if bias else None, upcast)  # [n, 2I] or [n, I]
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)  # [n, I]
    y = _linear(h, down, t, module.down_proj_bias[expert] if bias else None, upcast)  # [n, H]
    return module.post_expert_norm(y) if module.has_post_expert_norm else y


def all_experts_likely(tokens: int, num_experts: int, top_k: int) -> bool:
    """Whether `tokens` tokens, routed uniformly, leave less than half an expert of a layer unused
    in expectation (E (1 - k/E)^T < 1/2): from about 10 tokens at 8 experts top-2, 86 at 128 top-8."""
    return num_experts * (1 - top_k / num_experts) ** tokens < 0.5


class ExpertsRuntime:
    """What every experts call of one engine shares: the cache, the routing policy, the predictor,
    the observers, and what the router hooks captured. The engine builds and owns it."""

    def __init__(self, *, cache: ExpertCache, routing: RoutingPolicy, predictor: Predictor, num_experts: int, top_k: int,
                 upcast: bool = False) -> None:
        self.cache = cache  # it says how each expert it streams computes (its copy's QuantExperts or None)
        self.upcast = upcast  # half-precision expert products of several rows through float32 (gemm.py)
        self.routing = routing
        self.predictor = predictor
        self.num_experts, self.top_k = num_experts, top_k
        self.observers: list[RouteObserver] = []
        self.guess_observers: list[GuessObserver] = []
        self.prefetch_enabled = True
        self.min_precision = 0.0  # decode guesses for layers whose precision is below this are skipped (gated)
        self.prefetch_depth = 1  # sparse layers ahead the predictor guesses (which layers a call's guesses target)
        self._gated_calls = 0
        self._idle: dict[int, int] = {}  # layer -> its decode guesses in a row that started no load
        self._idle_calls = 0
        self._sparse: list[int] = []  # sparse layers in order (bind)
        self._order: dict[int, int] = {}
        self.predictions: dict[int, list[int]] = {}  # layer -> latest guess for it (speculative routing)
        self.phase = "prefill"  # of the running forward: "decode" when it feeds one position
        self.token_mask: torch.Tensor | None = None  # [T] bool: False rows are padding, routed nowhere (batched prompts)
        self.row_blocks = False  # several requests' rows (a server's batch): an expert's rows past AMX_ROWS go in blocks
        self._logits: dict[int, torch.Tensor] = {}  # layer -> router logits of its running call
        self._router_input: dict[int, torch.Tensor] = {}  # layer -> the router's input (scaled-rows experts)
        self._modules: dict[int, nn.Module] = {}
        self._lead: FirstLayerPrefetch | None = None
        self._step_requested = False  # this forward's whole routing was requested at its start (routing by a pre-gate)
        self._hooks: list = []
        self._lock = threading.Lock()  # one forward at a time (threads share the cache, its pins and this state)
        self._owner: int | None = None  # the thread whose forward holds it

    def bind(self, model: nn.Module, sites: dict[int, ExpertsSite], family: Family) -> None:
        """Route `model`'s experts calls here, capture each router's logits, and watch each forward start."""
        for layer, site in sites.items():
            module = model.get_submodule(site.path)
            module.__dict__["_expertcache"] = (self, layer)
            self._modules[layer] = module
            router = getattr(model.get_submodule(site.block), family.router, None)
            if router is not None:
                self._hooks.append(router.register_forward_hook(self._capture(layer, family.router_logits)))
        self._sparse = sorted(sites)
        self._order = {l: i for i, l in enumerate(self._sparse)}
        first = next(iter(sites.values()))
        decoder_layers = model.get_submodule(first.decoder_layer.rsplit(".", 1)[0])
        router = getattr(model.get_submodule(first.block), family.router, None)
        norm = child(model.get_submodule(first.decoder_layer), family.norm)
        self._lead = FirstLayerPrefetch(self, first.layer, router=router, norm=norm, logits_index=family.router_logits)
        self._hooks.append(decoder_layers[0].register_forward_pre_hook(self._forward_start, with_kwargs=True))
        self._hooks.append(model.register_forward_pre_hook(self._enter))
        self._hooks.append(model.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module: nn.Module, args: tuple) -> None:
        """Forwards from several threads take turns: one at a time runs its layers."""
        me = threading.get_ident()
        if self._owner != me:  # held by this thread already: its last forward was interrupted (Ctrl-C)
            self._lock.acquire()
            self._owner = me

    def _leave(self, module: nn.Module, args: tuple, out) -> None:
        if self._owner == threading.get_ident():
            self._owner = None
            self._lock.release()

    def _capture(self, layer: int, index: int):
        def hook(module: nn.Module, args: tuple, out) -> None:
            self._logits[layer] = out[index] if isinstance(out, tuple) else out
            self._router_input[layer] = args[0]

        return hook

    def _forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden.dim() != 3:
            return
        self.phase = "decode" if hidden.shape[1] == 1 else "prefill"
        self._step_requested = False
        self.cache.core.miss_low = self.cache.low_store is not None and self.phase == "decode"  # --miss-copy: decode misses
        start = getattr(self.predictor, "start", None)
        routed_ahead = getattr(self.routing, "needs_start", False) and self.phase in self.routing.applies_to
        if start is None:
            if self.prefetch_enabled and not self._all_held():
                self._lead(hidden)
            return
        if not (self.prefetch_enabled or routed_ahead):
            return
        reset = getattr(self.predictor, "reset", None)
        if reset is not None and _starts_sequence(hidden, kwargs):
            reset()  # a pre-gate's context is the sequence's: a new one (even of one token) continues nothing
        guesses = start(hidden)  # a pre-gate: every sparse layer's guess before the first one runs
        self.predictions.update(guesses)
        if not self.prefetch_enabled:
            return
        if routed_ahead:  # the guesses are the routing: the whole step's experts, requested in layer order
            for notify in self.guess_observers:
                notify(self._sparse[0], guesses)
            eids = [(l, e) for l, experts in guesses for e in experts]
            core = self.cache.core
            core.prefetch(eids)
            self._step_requested = all(e in core.entries for e in eids)  # all held or loading: the layers ask nothing more
            return
        first = dict(guesses).get(self._sparse[0])
        if first and not self.low_precision([self._sparse[0]]):
            self.lead(self._sparse[0], first)

    # --- one call ------------------------------------------------------------------------------
    def forward(self, module: nn.Module, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One experts call, for T tokens of one layer:

        x [T, H], ids [T, k], weights [T, k]    (the router's logits [T, E] were captured by a hook)
          -> routing policy, in the phases it applies to (exact: unchanged; a dropped slot is id -1)
          -> observers see (layer, x, logits, weights, ids)
          -> cache.stream(layer, needed, guesses): experts as they become ready; the predictor's
             guesses are requested once this call's demand loads are queued
               each expert: its tokens through (gate_up | gate, up) -> gate -> down, times its weight
          -> sum over k in transformers' own order and dtype -> [T, H]
        """
        logits = self._logits.pop(layer, None)  # [T, E]
        self._router_input.pop(layer, None)  # only scaled-rows experts read it: kept, a long prompt's would stay alive
        if self.phase in self.routing.applies_to:
            weights, ids = self.routing.select(layer, logits, weights, ids)  # dropped slots: id -1
        if self.token_mask is not None and self.token_mask.shape[0] == ids.shape[0]:
            ids = ids.masked_fill(~self.token_mask[:, None], -1)  # padding computes nothing, loads nothing
        for observe in self.observers:
            observe(layer, x, logits, weights, ids)
        single = ids[0].tolist() if ids.shape[0] == 1 and ONE_TOKEN_PATH else None  # a token's k experts, in slot order
        if single is not None and len(set(single)) < len(single):
            single = None  # an expert in two slots (no routing policy makes one): the general path covers both
        guessing = (self.prefetch_enabled and not self._step_requested and not self._gated(layer) and not self._all_held()
                    and not self._idle_gated(layer))
        guesses = (lambda: self._guess(layer, x, logits)) if guessing else None
        issued = self.cache.core.stats.prefetch_issued if guessing else None  # what this call's guesses start
        if (single is not None and len(single) <= 8 and min(single) >= 0
                and (weights.dtype == torch.float32 or (weights.dtype is torch.bfloat16 and x.dtype is torch.bfloat16))):
            # one token, every slot routed: no [1, k, H] buffer; the slots' float32 products added in
            # slot order, as torch's sum over k of that buffer adds them (k <= 8; tested); bf16 weights
            # (Qwen's routers): that buffer's own math, in one call where it gives its bits (gemm.combine)
            ys = [None] * len(single)
            # while every expert so far takes glu_expert alike: their parts, for one call with the combine
            fused, call, out = ([] if TOKEN_EXPERTS_CALL and gemm.combine_kernel(weights, x.dtype) else None), None, None
            with closing(self.cache.stream(layer, sorted(single), guesses)) as ready:
                for e, parts, quant in ready:
                    s = single.index(e)
                    if fused is not None:
                        c = glu_call(module, x, parts, quant)
                        if c is not None and c == (call or c):
                            call = c
                            fused.append((s, parts))
                            if len(fused) == len(single):  # the last: all of them and the combine, while still pinned
                                flat = [t for _, p in sorted(fused, key=lambda f: f[0]) for t in p]
                                out = torch.ops.expertcache.glu_experts(x, flat, call[0], call[1], weights)
                            continue
                        for i, p in fused:  # not all alike: the ones so far, one call each (as glu_expert)
                            ys[i] = torch.ops.expertcache.glu_expert(x, p, *call)
                        fused = None
                    ys[s] = expert_output(module, x, parts, e, quant, self.upcast)  # [1, H]
            self._note_idle(layer, issued)
            return out if out is not None else gemm.combine(ys, weights)
        if single is not None:
            needed = sorted(e for e in single if e >= 0)
        else:
            needed = [e for e in torch.unique(ids).tolist() if e >= 0]  # sorted distinct experts
        contrib = torch.zeros(
            (*ids.shape, x.shape[-1]), dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device
        )  # [T, k, H]
        if single is None:  # (token, slot) pairs grouped by expert, in token order, once for the call
            k = ids.shape[1]
            pairs = torch.argsort(ids.flatten(), stable=True)  # flat index token * k + slot
            tokens = torch.div(pairs, k, rounding_mode="floor")  # their tokens (once: Tensor.__floordiv__ is Python)
            ends = torch.bincount(ids.flatten() + 1, minlength=self.num_experts + 1).cumsum(0).tolist()  # slot -1 first
            flat_w, flat_c = weights.reshape(-1, 1), contrib.view(-1, contrib.shape[-1])
        with closing(self.cache.stream(layer, needed, guesses, each=single is None)) as ready:  # each computed as it comes
            for e, parts, quant in ready:
                if single is not None:  # one token (a decode step): its slot, no index search
                    s = single.index(e)
                    contrib[0, s] = expert_output(module, x, parts, e, quant, self.upcast)[0] * weights[0, s : s + 1]  # [1], not 0-d: dtype promotion as the general path
                else:
                    mine = pairs[ends[e] : ends[e + 1]]  # expert e's (token, slot) pairs
                    rows = x.index_select(0, tokens[ends[e] : ends[e + 1]])
                    if (self.row_blocks and quant is None and rows.shape[0] > AMX_ROWS
                            and (call := glu_call(module, rows[:AMX_ROWS], parts, quant))):
                        # a batch's bf16 expert in blocks of AMX_ROWS rows through glu_expert: no oneDNN primitive compiled
                        # for each new row count (its rows round as a batch's may: every row is still its own sum); a
                        # quantized expert's many rows keep one dequantization and torch's GEMM
                        y = torch.cat([torch.ops.expertcache.glu_expert(rows[i : i + AMX_ROWS], parts, *call)
                                       for i in range(0, rows.shape[0], AMX_ROWS)])
                    else:
                        y = expert_output(module, rows, parts, e, quant, self.upcast)
                    flat_c.index_copy_(0, mine, (y * flat_w.index_select(0, mine)).to(flat_c.dtype))
        self._note_idle(layer, issued)
        return contrib.sum(dim=1).to(x.dtype)  # as transformers' grouped_mm combines: over k, then the hidden dtype

    def forward_rows(self, module: nn.Module, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """One call of experts fed router-scaled rows [E*T, H] (architectures.ScaledRowsExperts):
        the router chose the top-k of its logits and scaled each token's input to expert e by
        sigmoid(logit); unselected rows are zero and stay zero. Only the selected rows compute."""
        logits = self._logits.pop(layer)  # [T, E]
        if self.phase in self.routing.applies_to and not getattr(self.routing, "exact", False):
            raise ValueError(f"routing {self.routing.name!r} re-mixes softmax router weights, and this model's router "
                             "scales the experts' input by a sigmoid: use exact")
        x = self._router_input.pop(layer).reshape(logits.shape[0], -1)  # [T, H], before scaling
        values, ids = logits.topk(self.top_k, dim=-1)  # [T, k], as the router picks them
        weights = torch.sigmoid(values.float()).to(logits.dtype)
        for observe in self.observers:
            observe(layer, x, logits, weights, ids)
        needed = torch.unique(ids).tolist()
        out = torch.zeros_like(rows)  # [E*T, H]
        guesses = (lambda: self._guess(layer, x, logits)) if self.prefetch_enabled else None
        with closing(self.cache.stream(layer, needed, guesses)) as ready:
            for e, parts, quant in ready:
                mine = (ids == e).any(dim=-1).nonzero().flatten() + e * x.shape[0]  # expert e's rows
                out[mine] = expert_output(module, rows[mine], parts, e, quant, self.upcast)
        return out

    def _all_held(self) -> bool:
        """Whether every expert of the model holds a slot (resident or loading), so that no guess
        could start a load, and no one reads guesses (exact routing, no guess observers): then
        guessing is skipped, its compute saved."""
        return (len(self.cache.core.entries) >= self.num_experts * len(self._sparse) and not self.guess_observers
                and getattr(self.routing, "exact", False))

    def _idle_gated(self, layer: int) -> bool:
        """Whether a decode call at `layer` skips guessing because its last IDLE_GUESSES guesses
        started no load (every expert they named held a slot already: a budget that holds what the
        routing uses), so a guess would cost its compute for nothing. One such call in PRECISION_PROBE
        guesses anyway, and a load it starts reopens the layer. Only where no one reads guesses (exact
        routing, no guess observers), as _all_held."""
        if (self.phase != "decode" or self._idle.get(layer, 0) < IDLE_GUESSES or self.guess_observers
                or not getattr(self.routing, "exact", False)):
            return False
        self._idle_calls += 1
        return self._idle_calls % PRECISION_PROBE != 0

    def _note_idle(self, layer: int, issued: int | None) -> None:
        """After a decode call that guessed: whether its guesses started a load (_idle_gated)."""
        if issued is None or self.phase != "decode":
            return
        self._idle[layer] = self._idle.get(layer, 0) + 1 if self.cache.core.stats.prefetch_issued == issued else 0

    def _gated(self, layer: int) -> bool:
        """Whether a decode call at `layer` skips guessing: every layer it guesses for has issued
        PRECISION_WARMUP guesses or more at a precision (used / issued) below min_precision. One
        gated call in PRECISION_PROBE guesses anyway, so a layer whose guesses improve reopens."""
        i = self._order.get(layer)
        if i is None:
            return False
        return self.low_precision(self._sparse[i + 1 : i + 1 + self.prefetch_depth])

    def low_precision(self, targets: list[int]) -> bool:
        """Whether, in a decode step, guesses for `targets` are skipped (see _gated); also the
        first layer's lead guesses, which its own precision gates."""
        if self.phase != "decode" or self.min_precision <= 0:
            return False
        stats = self.cache.core.stats
        for target in targets:
            ls = stats.layers.get(target)
            if ls is None or ls.prefetch_issued < PRECISION_WARMUP or ls.prefetch_used >= self.min_precision * ls.prefetch_issued:
                return False
        self._gated_calls += 1
        return self._gated_calls % PRECISION_PROBE != 0

    def _guess(self, layer: int, x: torch.Tensor, logits: torch.Tensor | None) -> Prediction:
        guesses = self.predictor.predict(layer, x, logits)
        self.predictions.update(guesses)
        for notify in self.guess_observers:
            notify(layer, guesses)
        return guesses

    def lead(self, layer: int, experts: list[int]) -> None:
        """Request `layer`'s experts before its call (FirstLayerPrefetch)."""
        for notify in self.guess_observers:
            notify(layer, [(layer, experts)])
        self.cache.core.request_lead(layer, experts)

    def run_expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert of `layer` on x [n, H], its weights through the cache (for tools)."""
        module = self._modules[layer]
        with closing(self.cache.stream(layer, [expert])) as ready:
            for e, parts, quant in ready:
                return expert_output(module, x, parts, e, quant, self.upcast)
        raise RuntimeError(f"expert {(layer, expert)} was not streamed")

    def unbind(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class FirstLayerPrefetch:
    """The first sparse layer, which no predictor sees ahead of time (each guesses from an earlier
    MoE layer): its experts are requested when the first decoder layer starts, so they load behind
    the embeddings and attention. A prompt long enough to use every expert gets all of them; a
    shorter call (a decode step) gets what the layer's own norm and router choose for the token's
    input without the attention's contribution (docs/prefetch-experiments.md: most of a token's
    first routing is decided by its embedding). `router`, `norm` None: only long prompts are served.

    A token's input to the first decoder layer is a function of its id alone, so a decode step's
    guess is remembered by the input's bytes (MEMO_BYTES of keys at most)."""

    MEMO_BYTES = 16 << 20

    def __init__(self, runtime: ExpertsRuntime, layer: int, *, router: nn.Module | None, norm: nn.Module | None,
                 logits_index: int = 0) -> None:
        self.runtime, self.layer = runtime, layer
        self.router, self.norm, self.logits_index = router, norm, logits_index
        self._memo: dict[bytes, list[int]] = {}
        self._memo_bytes = 0

    def __call__(self, hidden: torch.Tensor) -> None:
        rt = self.runtime
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > 1 and all_experts_likely(tokens, rt.num_experts, rt.top_k):
            experts = list(range(rt.num_experts))
        elif self.router is not None and self.norm is not None:
            if rt.low_precision([self.layer]):  # its guesses have been wrong (the precision gate)
                return
            experts = self._guess(hidden, tokens)
        else:
            return
        rt.lead(self.layer, experts)

    def _guess(self, hidden: torch.Tensor, tokens: int) -> list[int]:
        key = hidden.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() if tokens == 1 else None
        experts = self._memo.get(key) if key is not None else None
        if experts is None:
            out = self.router(self.norm(hidden).reshape(tokens, hidden.shape[-1]))
            logits = out[self.logits_index] if isinstance(out, tuple) else out  # [T, E]
            experts = rank(logits, self.runtime.top_k)
            if key is not None:
                if self._memo_bytes + len(key) > self.MEMO_BYTES:
                    self._memo.clear()
                    self._memo_bytes = 0
                self._memo[key] = experts
                self._memo_bytes += len(key)
        return list(experts)
