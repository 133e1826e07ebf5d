"""A decode step that walks the model's layers itself: transformers' operations on its weights,
in its order, without its module calls.

transformers' forward of one token costs ~250 tensor operations and a dozen module calls a layer;
on a small model that fixed cost is the step. For the families it knows (FAMILIES), LeanDecoder
calls each projection's and router's own forward directly, takes RMSNorms and the rotary embedding
as gemm's exact chains (one kernel call each where it can), writes attention out as the family
does (sdpa, no mask: what one query without padding gets), and sends experts through the runtime
as transformers' interface would: the same bits (tests/core/test_lean.py). It runs only where no
hook but the engine's watches a bypassed module and the cache is transformers' DynamicCache (or native.KVCache);
otherwise the step is the model's forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm, native
from .config import AMX_ROWS
from .experts import ExpertsRuntime

# model types whose decoder layer LeanDecoder writes out, and the classes it expects in them: the model,
# its decoder layer, attention, the MoE block whose router and experts it calls itself (None: the block's
# own forward runs, shared experts and all), the RMSNorm
FAMILIES = {
    "mixtral": ("MixtralForCausalLM", "MixtralDecoderLayer", "MixtralAttention", "MixtralSparseMoeBlock", "MixtralRMSNorm"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeDecoderLayer", "Qwen3MoeAttention", "Qwen3MoeSparseMoeBlock", "Qwen3MoeRMSNorm"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeDecoderLayer", "Qwen2MoeAttention", None, "Qwen2MoeRMSNorm"),
    "olmoe": ("OlmoeForCausalLM", "OlmoeDecoderLayer", "OlmoeAttention", "OlmoeSparseMoeBlock", "OlmoeRMSNorm"),
    "glm4_moe": ("Glm4MoeForCausalLM", "Glm4MoeDecoderLayer", "Glm4MoeAttention", None, "Glm4MoeRMSNorm"),
}
WIDE_QK_NORM = {"olmoe"}  # query and key norms over the whole projection, before the heads split (and clip_qkv after)
ROPE_MEMO = 8192  # positions whose (cos, sin) are kept: the rotary module's own output for one position
KV_ROOM = 256  # positions of room a layer's keys and values get, so a step writes in place (not a whole-cache copy)
ROOM_ATTR = "_expertcache_room"  # a DynamicLayer's buffers with room, its keys and values their first positions
ROOM_LIMIT_ATTR = "_expertcache_room_limit"  # at most this many positions of room over the rows (a server's KV budget); default KV_ROOM a row


class _Product:
    """One row through one or more Linears side by side ([1, in] -> [1, sum of outs]): one amm call
    on their weights (and biases, all or none) where each is a plain Linear whose forward
    (install_dense's) would take amm for a row, one qmm call where all are QuantLinears of one
    scheme (whose forwards are qmm calls), else each module's own forward, concatenated.
    Either way each output is the module's own bits (amm computes every output as its own sum
    over the same inputs, its bias added in float32 before the one rounding, as for one Linear)."""

    __slots__ = ("modules", "weights", "bias", "quant")

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.weights, self.bias, self.quant = None, None, None
        if _quant_side_by_side(modules):  # QuantLinears of one scheme: one qmm call on all their weights
            ops = [m.operands() for m in modules]
            self.quant = ([p for o in ops for p in o[0]], [s for o in ops for s in o[1]], [z for o in ops for z in o[2]],
                          modules[0].scheme.bits, modules[0].group)
            return
        if not all(type(m) is nn.Linear and getattr(m.forward, "__func__", None) is gemm.dense_forward for m in modules):
            return
        biases = [m.bias for m in modules]
        if any(b is not None for b in biases) and not all(b is not None and b.dtype == m.weight.dtype for b, m in zip(biases, modules)):
            return  # some with a bias, some without (or in another dtype): each its own forward
        row = torch.zeros(1, modules[0].in_features, dtype=modules[0].weight.dtype)
        if all(gemm._amm(row, m.weight) for m in modules):  # what dense_forward would take for one row
            self.weights = [m.weight for m in modules]
            self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])  # amm adds it per output

    def __call__(self, x: torch.Tensor, direct: bool) -> torch.Tensor:
        if self.quant is not None and direct:  # one thread: each weight's rows split as in its own call
            return torch.ops.expertcache.qmm(x, *self.quant)
        if direct and self.weights is not None:
            return torch.ops.expertcache.amm(x, self.weights, self.bias)
        if len(self.modules) == 1:
            return self.modules[0].forward(x)
        return torch.cat([m.forward(x) for m in self.modules], dim=-1)


def _quant_side_by_side(modules: tuple[nn.Module, ...]) -> bool:
    """Whether `modules` are QuantLinears (the class itself, its own forward) of one scheme and input
    size, none with a bias, zero points in all or none: qmm on their weights together gives each
    output the bits of its own module's forward (every output is its own row's sum)."""
    from .quant import QuantLinear

    if not all(type(m) is QuantLinear and "forward" not in m.__dict__ and m.bias is None for m in modules):
        return False
    first = modules[0]
    return all(m.scheme == first.scheme and m.in_features == first.in_features and m.group == first.group
               and (m.weight_zero_point is None) == (first.weight_zero_point is None) for m in modules)


@dataclass
class _Layer:
    index: int
    norm1: nn.Module
    attn: nn.Module
    qkv: _Product  # the query, key and value projections side by side
    o: _Product
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    norm2: nn.Module
    mlp: nn.Module
    sparse: int | None  # the sparse layer's number (its MoE block's router and experts), None: a dense MLP
    router: nn.Module | None
    route: Callable | None  # the router's forward with its logits through gemm.linear (None: its own forward)
    experts: nn.Module | None
    nq: int  # query heads
    nkv: int  # key/value heads
    sdpa: dict | None  # torch's sdpa keywords transformers passes for one query without a mask (None: call its function)
    wide_norm: bool  # q_norm and k_norm over the whole projections (OLMoE), not per head (Qwen3)
    clip: float | None  # clip_qkv: the projections clamped to [-clip, clip] after the norms (OLMoE)
    fused: tuple | None = None  # lean_layer's arguments that do not change between steps (None: it does not apply)


@dataclass
class Chunk:
    """Prompt tokens that go in beside a batch's decode step (LeanDecoder.mixed): `tokens` at
    positions start, start + 1, ... of a sequence whose cache `past` (transformers' DynamicCache,
    empty for a fresh prompt) holds the positions before and takes theirs; `logits`: whether the
    last token's logits are wanted (the prompt's end)."""

    tokens: list[int]
    start: int
    past: object
    logits: bool


class _ChunkState:
    """A chunk's hidden states [T, H] on their way through the layers, with what its attention
    takes at every layer, made as the model's forward makes them for these tokens: the rotary
    module's output for their positions and transformers' causal mask over its cache."""

    __slots__ = ("chunk", "h", "pos", "cos_sin", "mask", "norm")

    def __init__(self, decoder: LeanDecoder, chunk: Chunk) -> None:
        self.chunk, self.norm = chunk, decoder._norm
        self.h = decoder.embed.forward(torch.tensor(chunk.tokens))  # [T, H]
        self.pos = torch.arange(chunk.start, chunk.start + len(chunk.tokens))[None]  # [1, T]
        self.cos_sin = decoder.rotary.forward(self.h[None], self.pos)
        self.mask = decoder.causal_mask(inputs_embeds=self.h[None], attention_mask=None,
                                       past_key_values=chunk.past, position_ids=self.pos)

    def attention(self, L: _Layer) -> torch.Tensor:
        """Layer L's attention on these tokens: the family's module itself (its projections, norms,
        rotary embedding, cache update and attention function), after the layer's first norm."""
        out, _ = L.attn.forward(self.norm(L.norm1, self.h)[None], position_embeddings=self.cos_sin, attention_mask=self.mask,
                                past_key_values=self.chunk.past)
        return out[0]


def why_not(model: nn.Module, upcast: bool) -> str | None:
    """Why `model`'s decode steps cannot take the lean path (None: they can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    names = FAMILIES.get(kind)
    if names is None:
        return f"model type {kind!r} is not one the lean step writes out ({', '.join(FAMILIES)})"
    if upcast:
        return "half_matmul=float32 replaces the attention"
    if isinstance(model, native.CausalLM):
        return None  # the engine's own modules (native.py): full attention, the default rope, sdpa
    if type(model).__name__ != names[0]:
        return f"{type(model).__name__} is not {names[0]}"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r}: the lean step writes out sdpa only"
    types = getattr(config, "layer_types", None)
    if types is not None and kind == "qwen2_moe":  # its masks follow the layer types; sliding_window may be set unused
        if any(t != "full_attention" for t in types):
            return "sliding-window layers need the causal mask"
    elif getattr(config, "sliding_window", None) is not None:
        return "a sliding window needs the causal mask"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope type {rope.get('rope_type')!r} updates its frequencies with the position"
    for layer in model.model.layers:
        got = (type(layer).__name__, type(layer.self_attn).__name__, type(layer.input_layernorm).__name__,
               type(layer.post_attention_layernorm).__name__)
        if got != (names[1], names[2], names[4], names[4]):
            return f"an unexpected layer ({', '.join(got)})"
    return None


class LeanDecoder:
    """One-token decode steps of a supported model (why_not(model) is None), bound to its runtime."""

    def __init__(self, model: nn.Module, runtime: ExpertsRuntime) -> None:
        self.model, self.runtime = model, runtime
        base = model.model
        self.embed, self.rotary, self.norm, self.lm_head = base.embed_tokens, base.rotary_emb, base.norm, model.lm_head
        block_name = FAMILIES[model.config.model_type][3]
        sparse = {id(m): layer for layer, m in runtime._modules.items()}  # experts module -> its sparse layer
        self.layers: list[_Layer] = []
        for i, layer in enumerate(base.layers):
            a, mlp = layer.self_attn, layer.mlp
            moe = (isinstance(mlp, native.SparseMoeBlock) if isinstance(model, native.CausalLM)
                   else block_name is not None and type(mlp).__name__ == block_name) and id(mlp.experts) in sparse
            self.layers.append(_Layer(
                i, layer.input_layernorm, a, _Product(a.q_proj, a.k_proj, a.v_proj), _Product(a.o_proj), getattr(a, "q_norm", None),
                getattr(a, "k_norm", None), layer.post_attention_layernorm, mlp, sparse[id(mlp.experts)] if moe else None,
                mlp.gate if moe else None, _lean_route(mlp.gate) if moe else None, mlp.experts if moe else None,
                a.q_proj.out_features // a.head_dim,
                a.k_proj.out_features // a.head_dim, _sdpa_keywords(a), model.config.model_type in WIDE_QK_NORM,
                getattr(model.config, "clip_qkv", None),
            ))  # fmt: skip
        self.logits = _Product(self.lm_head)
        self._watched = [m for m in (model, base, self.embed, self.rotary, self.norm, self.lm_head) if m is not None]
        for L in self.layers:
            self._watched += [m for m in (base.layers[L.index], L.norm1, L.attn, *L.qkv.modules, *L.o.modules, L.q_norm,
                                          L.k_norm, L.norm2, L.mlp, L.router, L.experts) if m is not None]
        self.native = isinstance(model, native.CausalLM)
        if self.native:
            self._cache_types, self.new_cache, self.causal_mask = (native.KVCache, native.KVLayer), model.new_cache, native.causal_mask
        else:
            from transformers.cache_utils import DynamicCache, DynamicLayer
            from transformers.masking_utils import create_causal_mask

            self._cache_types, self.causal_mask = (DynamicCache, DynamicLayer), functools.partial(create_causal_mask, config=model.config)
            self.new_cache = functools.partial(DynamicCache, config=model.config)
        self._own_hooks = frozenset(h.id for h in runtime._hooks)  # the runtime's, installed at bind, before this
        self._rms_chain = all(_is_rms_chain(m) for m in self._norms())
        for L in self.layers:
            L.fused = _fused_arguments(L, self._rms_chain)
        self._rope: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _norms(self) -> list[nn.Module]:
        return [self.norm] + [m for L in self.layers for m in (L.norm1, L.norm2, L.q_norm, L.k_norm) if m is not None]

    def usable(self, past) -> bool:
        """Whether this step may run on `past`: transformers' DynamicCache of full-attention layers
        for every layer, and no hook on a bypassed module but the runtime's own."""
        DynamicCache, DynamicLayer = self._cache_types
        if type(past) is not DynamicCache or len(past.layers) != len(self.layers):
            return False
        if any(type(layer) is not DynamicLayer for layer in past.layers):
            return False
        g = nn.modules.module
        if g._global_forward_hooks or g._global_forward_pre_hooks:
            return False
        own = self._own_hooks
        for m in self._watched:
            if (m._forward_hooks or m._forward_pre_hooks) and not (m._forward_hooks.keys() | m._forward_pre_hooks.keys()) <= own:
                return False
        return True

    def _norm(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The RMSNorm `module` on h: gemm.rms_norm where its forward is that chain (checked at
        build), else its forward."""
        return gemm.rms_norm(h, module.weight, module.variance_epsilon) if self._rms_chain else module.forward(h)

    def _cos_sin(self, h: torch.Tensor, position: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary module's output for one position (what the model computes each step), kept."""
        key = (position, h.dtype)
        got = self._rope.get(key)
        if got is None:
            if len(self._rope) >= ROPE_MEMO:
                self._rope.clear()
            got = self._rope[key] = self.rotary.forward(h, positions)
        return got

    def step(self, token: int, position: int, past) -> torch.Tensor:
        """The logits [1, V] after `token` at `position`, the cache `past` holding the positions before."""
        return self.rows([token], [position], past)

    def rows(self, tokens: list[int], positions: list[int], past, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of B rows (a server's batch: row i's token at its position, `past` the
        batch's cache, `attention_mask` [B, S] with padding as zeros, None: no padding): logits
        [B, V]. Hidden states are [B, H] throughout (transformers' [B, 1, H]: the same values in
        the same order, and every operation on them is per row). One row without a mask takes the
        shortcuts (its rotary output kept by position, torch's sdpa called as transformers would);
        otherwise the rotary module, transformers' causal mask and its sdpa function run as in its
        forward."""
        return self.mixed(tokens, positions, past, attention_mask)[0]

    def mixed(self, tokens: list[int], positions: list[int], past, attention_mask: torch.Tensor | None = None,
              chunks: Sequence[Chunk] = ()) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """`rows`' decode step with prompt chunks going in beside the rows, in the same walk over
        the layers: each chunk's attention is its family's own module on its own cache (as the
        model's forward of those tokens runs it), and each layer's router and experts take the
        rows' and the chunks' tokens in one call, so a batch's step and the prompts joining it
        load each expert once, not once a forward. Returns the rows' logits [B, V] and, per chunk,
        its last token's logits [V] where `chunk.logits` asks for them (else None). The chunks'
        tokens share the rows' expert calls, so they round as a batch does (the rows' own steps
        already do)."""
        rt = self.runtime
        rt._enter(self.model, ())
        try:
            n = len(tokens)
            direct = torch.get_num_threads() == 1 and n <= AMX_ROWS  # amm's conditions that can change between steps
            h = self.embed.forward(torch.tensor(tokens))  # [B, H]
            pos = torch.tensor(positions)[:, None]  # [B, 1]
            parts = [_ChunkState(self, c) for c in chunks]
            every, where = h, pos  # [N, H], [N, 1]: the rows' tokens, then the chunks'
            if parts:
                every, where = torch.cat([h, *(p.h for p in parts)]), torch.cat([pos, *(p.pos[0, :, None] for p in parts)])
            rt._forward_start(None, (every[:, None],), {"position_ids": where})  # the phase, the first layer's guesses
            mask = None
            if n == 1 and attention_mask is None:
                cos, sin = self._cos_sin(h, positions[0], pos)
            else:
                cos, sin = self.rotary.forward(h[:, None], pos)  # [B, 1, d]
                mask = self.causal_mask(inputs_embeds=h[:, None], attention_mask=attention_mask,
                                          past_key_values=past, position_ids=pos)
            norm = self._norm
            one = (direct and mask is None and n == 1 and not parts and not getattr(past, "offloading", False)
                   and h.dtype is torch.bfloat16 and cos.is_contiguous() and sin.is_contiguous())
            for L, cached in zip(self.layers, past.layers):
                if one and L.fused is not None and cached.is_initialized and cos.numel() == L.attn.head_dim:
                    # the Python below in one kernel call, the router's too (lean_layer: its ATen operations and kernels)
                    room = _room(cached)
                    h, x, cached.keys, cached.values, logits, weights, ids = torch.ops.expertcache.lean_layer(
                        h, *L.fused[0], cos, sin, cached.keys, cached.values, *room, *L.fused[1])
                    if L.sparse is not None and logits is not None:
                        rt._logits[L.sparse], rt._router_input[L.sparse] = logits, x
                        h = h + rt.forward(L.experts, L.sparse, x, ids, weights)
                        continue
                else:
                    h = h + self._attention(L, norm(L.norm1, h), cos, sin, past, direct, mask)
                    x = norm(L.norm2, h)
                    for p in parts:
                        p.h = p.h + p.attention(L)
                    if parts:
                        x = torch.cat([x, *(norm(L.norm2, p.h) for p in parts)])
                y = self._moe(L, x) if L.sparse is not None else L.mlp(x[:, None])[:, 0]  # a block's own forward: [B, 1, H]
                h = h + y[:n]
                for p, y in zip(parts, y[n:].split([p.h.shape[0] for p in parts])):
                    p.h = p.h + y
            ends = [p.h[-1:] for p in parts if p.chunk.logits]
            if not ends:
                return self.logits(norm(self.norm, h), direct), [None] * len(parts)  # logits_to_keep=1
            out = self.logits(norm(self.norm, torch.cat([h, *ends])), torch.get_num_threads() == 1 and n + len(ends) <= AMX_ROWS)
            last = iter(out[n:])
            return out[:n], [next(last) if p.chunk.logits else None for p in parts]
        finally:
            rt._leave(self.model, (), None)

    def _attention(self, L: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past, direct: bool,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """The family's attention forward for one query a row: its projections (and per-head
        norms), the rotary embedding, the cache's update, transformers' sdpa. The rotary
        embedding runs once over the query and key heads together (elementwise: the same bits)."""
        a, d, nq, nkv, n = L.attn, L.attn.head_dim, L.nq, L.nkv, x.shape[0]
        if L.wide_norm:  # OLMoE: norms over the whole projections, then the clip, then the heads
            qkv = L.qkv(x, direct)  # [B, (Hq + 2 Hkv) d]
            q, k, v = (self._norm(L.q_norm, qkv[:, : nq * d]), self._norm(L.k_norm, qkv[:, nq * d : (nq + nkv) * d]),
                       qkv[:, (nq + nkv) * d :])
            if L.clip is not None:
                for t in (q, k, v):
                    t.clamp_(min=-L.clip, max=L.clip)
            qk, v = torch.cat((q.view(n, -1, d), k.view(n, -1, d)), dim=1), v.view(n, -1, d)
        else:
            qkv = L.qkv(x, direct).view(n, -1, d)  # [B, Hq + 2 Hkv, d]
            if L.q_norm is not None:  # Qwen3: per head
                qk = torch.cat((self._norm(L.q_norm, qkv[:, :nq]), self._norm(L.k_norm, qkv[:, nq : nq + nkv])), dim=1)
            else:
                qk = qkv[:, : nq + nkv]
            v = qkv[:, nq + nkv :]
        if cos.shape[-1] == d:
            qk = gemm.rotary(qk, cos, sin)  # apply_rotary_pos_emb ([B, heads, d] against [B, 1, d])
        else:  # a partial rotary embedding (GLM-4.5): the first cos.shape[-1] of each head turn, the rest pass
            r = cos.shape[-1]
            qk = torch.cat((gemm.rotary(qk[..., :r], cos, sin), qk[..., r:]), dim=-1)
        q, k, v = qk[:, :nq, None], qk[:, nq:, None], v[:, :, None]  # [B, heads, 1, d]: transposes are views
        cached = past.layers[a.layer_idx]
        if cached.is_initialized:  # DynamicLayer.update's cat, written into the room after the keys (_room)
            rk, rv = _room(cached)
            s = cached.keys.shape[-2]
            rk[..., s : s + 1, :], rv[..., s : s + 1, :] = k, v
            k, v = cached.keys, cached.values = rk[..., : s + 1, :], rv[..., : s + 1, :]
        else:
            k, v = past.update(k, v, a.layer_idx)
        if L.sdpa is not None and mask is None and n == 1:  # transformers' sdpa_attention_forward for this case, written out
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=a.scaling, is_causal=False, **L.sdpa)
        elif self.native:
            out = native.sdpa_attention(a, q, k, v, mask, a.scaling)
        else:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            out, _ = sdpa_attention_forward(a, q, k, v, mask, dropout=0.0, scaling=a.scaling,
                                            sliding_window=getattr(a, "sliding_window", None))
        return L.o(out.reshape(n, -1), direct)  # [1, Hq, 1, d] or [B, 1, Hq, d]: a row's heads then d, either way

    def _moe(self, L: _Layer, x: torch.Tensor) -> torch.Tensor:
        """The sparse block: its router's forward, then its experts through the runtime (what the
        router's hook and transformers' experts interface would do)."""
        logits, weights, ids = (L.route or L.router.forward)(x)
        rt = self.runtime
        rt._logits[L.sparse], rt._router_input[L.sparse] = logits, x
        return rt.forward(L.experts, L.sparse, x, ids, weights)


def _room(cached) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers whose first positions are the layer's keys and values (which become views of them),
    with room for the next: kept on the DynamicLayer itself (its lifetime), made again (one copy)
    when full or when the keys are no longer their view (another forward's cat, a batch's rows).
    DynamicLayer.update copies the whole cache every step; this copies it every KV_ROOM steps (or
    every ROOM_LIMIT_ATTR's positions over the rows, which a server's KV budget sets on its cache's
    layers: a batch's rows share it)."""
    keys, values = cached.keys, cached.values
    room = cached.__dict__.get(ROOM_ATTR)
    n = keys.shape[-2]
    if room is not None:
        rk, rv = room
        if (rk.shape[-2] > n and keys.data_ptr() == rk.data_ptr() and values.data_ptr() == rv.data_ptr()
                and keys.stride() == rk.stride() and values.stride() == rv.stride()
                and keys.shape[:-2] == rk.shape[:-2] and values.shape[:-2] == rv.shape[:-2]):
            return room
    rows = max(1, keys.shape[0])
    more = max(1, min(KV_ROOM, cached.__dict__.get(ROOM_LIMIT_ATTR, KV_ROOM * rows) // rows))  # (1: a copy a step, as DynamicLayer's)
    size = lambda t: (*t.shape[:-2], n + more, t.shape[-1])  # noqa: E731
    rk, rv = keys.new_empty(size(keys)), values.new_empty(size(values))
    rk[..., :n, :] = keys
    rv[..., :n, :] = values
    cached.keys, cached.values = rk[..., :n, :], rv[..., :n, :]
    cached.__dict__[ROOM_ATTR] = (rk, rv)
    return rk, rv


def room_positions(past) -> int:
    """Positions the cache's room buffers (_room's) hold beyond its keys, over all its rows (at most
    KV_ROOM a row)."""
    layers = getattr(past, "layers", ())
    return max(((room[0].shape[-2] - layer.keys.shape[-2]) * room[0].shape[0] for layer in layers
                if (room := layer.__dict__.get(ROOM_ATTR)) is not None), default=0)


def _fused_arguments(L: _Layer, rms_chain: bool) -> tuple | None:
    """lean_layer's fixed arguments for layer L (before and after the per-step ones), or None where
    the kernel would not run the Python's operations: norms other than bf16 RMSNorm chains, OLMoE's
    whole-projection norms or clip, an attention that needs transformers' function, projections
    other than one amm or one qmm call, a router other than the lean ones."""
    if not (rms_chain and gemm.tail_kernels()) or L.wide_norm or L.clip is not None or L.sdpa is None:
        return None
    norms = [m for m in (L.norm1, L.norm2, L.q_norm, L.k_norm) if m is not None]
    if any(m.weight.dtype is not torch.bfloat16 for m in norms) or (L.q_norm is None) != (L.k_norm is None):
        return None
    if L.q_norm is not None and L.q_norm.variance_epsilon != L.k_norm.variance_epsilon:
        return None

    def product(p: _Product):
        if p.quant is not None:
            return p.quant
        if p.weights is not None:
            return p.weights, [], [], 16, 0
        return None

    qkv, o = product(L.qkv), product(L.o)
    if qkv is None or o is None or L.o.bias is not None or (L.qkv.bias is not None and qkv[3] != 16):
        return None
    kind, k, renorm, router = 0, 0, False, None  # kind 0: the router runs after the call, in Python
    route = L.route
    if L.sparse is not None and route is not None and route.__name__ in ("mixtral", "qwen"):
        w = L.router.weight
        if gemm._amm(torch.zeros(1, w.shape[1], dtype=w.dtype), w):  # its logits through amm, as gemm.linear's
            kind, k, router = (1 if route.__name__ == "mixtral" else 2), L.router.top_k, w
            renorm = True if kind == 1 else bool(getattr(L.router, "norm_topk_prob", False))
    a = L.attn
    before = (L.norm1.weight, L.norm1.variance_epsilon, *qkv, L.qkv.bias,
              None if L.q_norm is None else L.q_norm.weight, None if L.k_norm is None else L.k_norm.weight,
              0.0 if L.q_norm is None else L.q_norm.variance_epsilon)
    after = (L.nq, L.nkv, a.scaling, bool(L.sdpa.get("enable_gqa", False)), *o, L.norm2.weight, L.norm2.variance_epsilon,
             router, kind, k, renorm)
    return before, after


def _sdpa_keywords(attn: nn.Module) -> dict | None:
    """What transformers' sdpa_attention_forward adds to torch's call for one query, no mask, on
    this CPU: enable_gqa where key heads are shared and it would pass it; {} without shared heads;
    None where it would reshape instead (pack_gqa: its own function is called then)."""
    if isinstance(attn, native.Attention):
        use_gqa_in_sdpa = native.use_gqa_in_sdpa
    else:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    groups = getattr(attn, "num_key_value_groups", 1)
    if groups <= 1:
        return {}
    kv = torch.empty(1, 1, 1, attn.head_dim)
    return {"enable_gqa": True} if use_gqa_in_sdpa(None, kv, kv) else None


def _lean_route(router: nn.Module) -> Callable | None:
    """The router's forward with its logits through gemm.linear (one bf16 row on an AMX CPU: amm,
    a few microseconds against oneDNN's tens), then its own softmax and top-k, written out: Mixtral's
    (float32 softmax of the logits, top-k renormalised, float32 scores) or Qwen's (softmax in
    float32, top-k renormalised where norm_topk_prob says, scores in the logits' dtype). Taken only
    where its outputs equal the router's own forward's, bit for bit, on random rows (a subclass, a
    changed forward or another routing says no: the router's own forward runs)."""
    w, k = getattr(router, "weight", None), getattr(router, "top_k", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(k, int):
        return None
    norm = getattr(router, "norm_topk_prob", None)

    def mixtral(x: torch.Tensor):
        logits = gemm.linear(x, w)
        top, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
        top /= top.sum(dim=-1, keepdim=True)
        return logits, top, ids

    def qwen(x: torch.Tensor):
        logits = gemm.linear(x, w)
        top, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), k, dim=-1)
        if norm:
            top /= top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), ids

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, w.shape[1], generator=g).to(w.dtype) * 2 for n in (1, 1, 3)]
    with torch.no_grad():
        want = [router.forward(x) for x in rows]
        for route in (mixtral, qwen) if norm is None else (qwen,):
            got = [route(x) for x in rows]
            if all(len(a) == len(b) == 3 and all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(a, b))
                   for a, b in zip(got, want)):
                return route
    return None


def _is_rms_chain(norm: nn.Module) -> bool:
    """Whether an RMSNorm module's forward is gemm.rms_chain with its weight and epsilon: asked of
    its output on a random input (bit for bit), so a subclass or a kernel swapped in says no."""
    w, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(w, torch.Tensor) or not isinstance(eps, float) or w.dim() != 1:
        return False
    h = torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.dtype) * 3
    with torch.no_grad():
        return torch.equal(norm.forward(h), gemm.rms_chain(h, w, eps))
