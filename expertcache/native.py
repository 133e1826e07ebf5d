"""Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE and GLM-4.5 built by the engine itself, without importing transformers.

transformers' modelling import loads torch._dynamo, sympy and scipy before any weight, more memory
than the rest of the engine's fixed cost (docs/memory.md). For the families whose
layers it writes out here, the engine builds the model from config.json with these modules:
transformers' names, shapes and operations (the same torch calls on the same shapes, so the same
bits: tests/core/test_native.py compares them with transformers' own model), its KV-cache layout
and its sdpa mask rules. Anything else in a config (a rope type other than the default, a sliding
window, another activation, a partial rotary embedding outside GLM-4.5) is not written out:
`config_for` says so and the engine builds transformers' model instead (architectures.build_model),
as it does for every other family.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm

# transformers 5.23's defaults for what a config.json of these families may leave out
DEFAULTS = {
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=None, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
                    use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                    rope_theta=1e6, sliding_window=None, attention_dropout=0.0, num_experts_per_tok=2, num_local_experts=8,
                    output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0),
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
                      num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, use_cache=True,
                      tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False, use_sliding_window=False,
                      sliding_window=4096, attention_dropout=0.0, decoder_sparse_step=1, moe_intermediate_size=768,
                      num_experts_per_tok=8, num_local_experts=128, norm_topk_prob=False, output_router_logits=False,
                      router_aux_loss_coef=0.001, mlp_only_layers=None, pad_token_id=None, bos_token_id=None, eos_token_id=None),
    "qwen2_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=16, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6, use_cache=True,
                      tie_word_embeddings=False, rope_theta=10000.0, use_sliding_window=False, sliding_window=4096,
                      max_window_layers=28, attention_dropout=0.0, decoder_sparse_step=1, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_local_experts=60, norm_topk_prob=False,
                      output_router_logits=False, router_aux_loss_coef=0.001, mlp_only_layers=None, qkv_bias=True,
                      layer_types=None, pad_token_id=None, bos_token_id=None, eos_token_id=None),
    "olmoe": dict(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=None, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5, use_cache=True,
                  pad_token_id=1, bos_token_id=None, eos_token_id=50279, tie_word_embeddings=False, rope_theta=10000.0,
                  attention_bias=False, attention_dropout=0.0, clip_qkv=None, num_experts_per_tok=8, num_local_experts=64,
                  output_router_logits=False, router_aux_loss_coef=0.01, norm_topk_prob=False),
    "glm4_moe": dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46, num_attention_heads=96,
                     num_key_value_heads=8, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5, use_cache=True,
                     tie_word_embeddings=False, rope_theta=10000.0, attention_bias=False, attention_dropout=0.0,
                     moe_intermediate_size=1408, num_experts_per_tok=8, output_router_logits=False, n_shared_experts=1,
                     num_local_experts=128, routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=1,
                     norm_topk_prob=True, use_qk_norm=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                     num_nextn_predict_layers=1),
}
# the experts' count, kept here as num_local_experts and readable as num_experts / n_routed_experts too
ALIASES = {"num_experts": "num_local_experts", "n_routed_experts": "num_local_experts"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class NativeConfig:
    """A config.json of a family here, as transformers' config reads it: the family's defaults,
    the file's values, rope_parameters from rope_theta, num_experts as num_local_experts."""

    _attn_implementation = "sdpa"
    _experts_implementation = "expertcache"  # experts.IMPLEMENTATION: the engine computes every experts call
    is_encoder_decoder = False

    def __init__(self, raw: dict) -> None:
        kind = raw["model_type"]
        values = {**DEFAULTS[kind], **{ALIASES.get(k, k): v for k, v in raw.items()}}
        rope = values.pop("rope_parameters", None) or {}
        theta = rope.get("rope_theta", values.pop("rope_theta"))
        values["rope_parameters"] = {"rope_type": rope.get("rope_type", "default"), "rope_theta": theta}
        partial = values.pop("partial_rotary_factor", None)
        if kind == "glm4_moe":  # a partial rotary embedding, half the head by default
            values["rope_parameters"]["partial_rotary_factor"] = rope.get("partial_rotary_factor", partial if partial is not None else 0.5)
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if kind == "qwen3_moe":
            values["sliding_window"] = values["sliding_window"] if values["use_sliding_window"] else None
            values["mlp_only_layers"] = values["mlp_only_layers"] or []
        if kind == "qwen2_moe":  # as its config's __post_init__: a window of 0 and every layer full unless use_sliding_window
            values["sliding_window"] = values["sliding_window"] if values["use_sliding_window"] else 0
            values["mlp_only_layers"] = values["mlp_only_layers"] or []
            if values["layer_types"] is None:
                values["layer_types"] = ["sliding_attention" if (i + 1) % 2 and i < values["max_window_layers"] and values["use_sliding_window"]
                                         else "full_attention" for i in range(values["num_hidden_layers"])]
        dtype = values.pop("torch_dtype", None) or values.get("dtype")
        values["dtype"] = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
        self.__dict__.update(values)

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    @property
    def n_routed_experts(self) -> int:
        return self.num_local_experts

    def __repr__(self) -> str:
        return f"NativeConfig({self.model_type}, {self.num_hidden_layers} layers, hidden {self.hidden_size})"


def config_for(raw: dict) -> NativeConfig | None:
    """config.json's contents as a NativeConfig where this module writes the model out, else None
    (the engine then builds transformers' model)."""
    try:
        return _config_for(raw)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None  # a malformed file: transformers' reader says what is wrong with it


def _config_for(raw: dict) -> NativeConfig | None:
    kind = raw.get("model_type")
    if not isinstance(kind, str) or kind not in DEFAULTS or raw.get("architectures") not in (None, [_CLASS_NAMES[kind]]):
        return None
    rope = raw.get("rope_parameters") or {}
    if raw.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        return None  # other rope types update their frequencies with the position
    if kind != "glm4_moe" and ("partial_rotary_factor" in raw or "partial_rotary_factor" in rope):
        return None  # a partial rotary embedding is written out for GLM-4.5 only
    if raw.get("hidden_act", "silu") != "silu" or raw.get("auto_map"):
        return None
    if raw.get("attn_implementation") not in (None, "sdpa") or raw.get("_attn_implementation") not in (None, "sdpa"):
        return None
    config = NativeConfig(raw)
    full = getattr(config, "layer_types", None) in (None, ["full_attention"] * config.num_hidden_layers)
    window = config.use_sliding_window if kind == "qwen2_moe" else getattr(config, "sliding_window", None) is not None
    return config if full and not window else None


def read_config(model_dir: Path) -> NativeConfig | None:
    """The checkpoint's config as NativeConfig, or None (see config_for); never raises."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config_for(raw) if isinstance(raw, dict) else None


# --- modules: transformers' names, shapes and operations ---------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gemm.rms_chain(hidden_states, self.weight, self.variance_epsilon)  # transformers' RMSNorm, written out


class RotaryEmbedding(nn.Module):
    """The default rotary embedding: cos and sin of position x inverse frequency, in x's dtype."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.config = config
        base = config.rope_parameters["rope_theta"]
        dim = int(head_dim(config) * config.rope_parameters.get("partial_rotary_factor", 1.0))
        self.attention_scaling = 1.0
        # made on the CPU whatever the default device (on the meta device torch's arange imports torch._dynamo)
        self.inv_freq = nn.Buffer(1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, heads, s, d = x.shape
    return x if n == 1 else x[:, :, None].expand(b, heads, n, s, d).reshape(b, heads * n, s, d)


def use_gqa_in_sdpa(mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether transformers' sdpa attention passes enable_gqa on a CPU."""
    if os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1":
        return True
    return mask is None and key.shape[-1] == value.shape[-1] <= 256


def sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """transformers' sdpa attention on a CPU: [B, heads, q, d] in, [B, q, heads, d] out."""
    kwargs, q = {}, query.shape[2]
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        if use_gqa_in_sdpa(mask, key, value):
            kwargs["enable_gqa"] = True
        elif q == 1:  # one query: its heads packed on the key heads instead of the keys repeated
            query = query.reshape(query.shape[0], query.shape[1] // groups, groups, query.shape[-1])
            if mask is not None and mask.shape[1] != 1:
                mask = mask.reshape(mask.shape[0], mask.shape[1] // groups, groups, mask.shape[-1])
        else:
            key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    causal = q > 1 and mask is None
    if causal and key.shape[2] > q:
        key, value = key[:, :, :q], value[:, :, :q]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling, is_causal=causal, **kwargs)
    return out.reshape(out.shape[0], -1, q, value.shape[-1]).transpose(1, 2).contiguous()


class Attention(nn.Module):
    def __init__(self, config: NativeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = d = head_dim(config)
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = d**-0.5
        self.is_causal = True
        self.sliding_window = None
        self.float32_attention = False  # half_matmul="float32" on a slow half type: attention on float32 copies (gemm.install_attention)
        h, nq, nkv, kind = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.model_type
        bias = config.qkv_bias if kind == "qwen2_moe" else bool(getattr(config, "attention_bias", False)) and kind != "mixtral"
        self.q_proj = nn.Linear(h, nq * d, bias=bias)
        self.k_proj = nn.Linear(h, nkv * d, bias=bias)
        self.v_proj = nn.Linear(h, nkv * d, bias=bias)
        self.o_proj = nn.Linear(nq * d, h, bias=bias and kind not in ("qwen2_moe", "glm4_moe"))  # these two: q, k, v only
        self.wide_norm, self.clip = kind == "olmoe", getattr(config, "clip_qkv", None) if kind == "olmoe" else None
        if kind == "qwen3_moe" or (kind == "glm4_moe" and config.use_qk_norm):  # per-head norms of queries and keys
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        elif kind == "olmoe":  # norms over the whole projections, before the heads split (then clip_qkv)
            self.q_norm = RMSNorm(h, config.rms_norm_eps)
            self.k_norm = RMSNorm((h // nq) * nkv, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values=None, **kwargs) -> tuple[torch.Tensor, None]:
        shape = hidden_states.shape[:-1]
        heads = (*shape, -1, self.head_dim)
        if self.wide_norm:
            q, k, v = self.q_norm(self.q_proj(hidden_states)), self.k_norm(self.k_proj(hidden_states)), self.v_proj(hidden_states)
            if self.clip is not None:
                for t in (q, k, v):
                    t.clamp_(min=-self.clip, max=self.clip)
            q, k, v = q.view(heads), k.view(heads), v.view(heads)
        else:
            q, k, v = self.q_proj(hidden_states).view(heads), self.k_proj(hidden_states).view(heads), self.v_proj(hidden_states).view(heads)
            if "q_norm" in self._modules:
                q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        r = cos.shape[-1]
        if r == self.head_dim:  # apply_rotary_pos_emb, written out
            q, k = gemm.rotary_chain(q, cos, sin), gemm.rotary_chain(k, cos, sin)
        else:  # partial (GLM-4.5): the first r of each head turn, the rest pass
            q = torch.cat([gemm.rotary_chain(q[..., :r], cos, sin), q[..., r:]], dim=-1)
            k = torch.cat([gemm.rotary_chain(k[..., :r], cos, sin), k[..., r:]], dim=-1)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.float32_attention:  # as gemm's float32 attention does for transformers' model
            dtype, mask = q.dtype, attention_mask
            if mask is not None and mask.is_floating_point():
                mask = mask.float()
            out = sdpa_attention(self, q.float(), k.float(), v.float(), mask, self.scaling).to(dtype)
        else:
            out = sdpa_attention(self, q, k, v, attention_mask, self.scaling)
        return self.o_proj(out.reshape(*shape, -1).contiguous()), None


class Router(nn.Module):
    """The top-k router: logits, the top k of their float32 softmax (renormalised: Mixtral always,
    Qwen3 where norm_topk_prob says; Qwen3's weights back in the logits' dtype), their ids."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.hidden_dim = config.num_experts_per_tok, config.num_local_experts, config.hidden_size
        self.mixtral = config.model_type == "mixtral"
        if not self.mixtral:
            self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        if self.mixtral:
            top, ids = torch.topk(F.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
            top /= top.sum(dim=-1, keepdim=True)
            return logits, top, ids
        top, ids = torch.topk(F.softmax(logits, dtype=torch.float, dim=-1), self.top_k, dim=-1)
        if self.norm_topk_prob:
            top /= top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), ids


class GroupRouter(nn.Module):
    """GLM-4.5's router: float32 logits, sigmoid scores plus a correction bias choose the top-k
    within the best groups; weights are the scores themselves, renormalised and scaled."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.top_k, self.num_experts, self.hidden_dim = config.num_experts_per_tok, config.num_local_experts, config.hidden_size
        self.routed_scaling_factor, self.num_group, self.topk_group = config.routed_scaling_factor, config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.view(-1, self.hidden_dim)
        logits = F.linear(x.type(torch.float32), self.weight.type(torch.float32))
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        per_group = self.num_experts // self.num_group
        group_scores = choice.view(-1, self.num_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.num_group, per_group).reshape(-1, self.num_experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
        return logits, weights * self.routed_scaling_factor, ids


class Experts(nn.Module):
    """The experts as transformers' experts interface sees them (its marks, [E, ...] weights); the
    engine's runtime computes them (experts.experts_forward), its cache holds the weights."""

    has_gate, is_transposed, is_concatenated, has_bias, has_post_expert_norm = True, False, True, False, False
    expertcache_default_gate = True  # _apply_gate is transformers' default gate (experts._default_gate)

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.act_fn = nn.SiLU()

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        binding = self.__dict__.get("_expertcache")  # (runtime, layer): set by ExpertsRuntime.bind
        if binding is not None:  # bound to an engine: its runtime computes them from the cache
            runtime, layer = binding
            return runtime.forward(self, layer, hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)  # a model of its own (tests): transformers' eager loop on these weights
        for e in torch.unique(top_k_index).tolist():
            rank, token = torch.where(top_k_index.T == e)  # by rank, then token: transformers' order
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[e]) * top_k_weights[token, rank, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class SparseMoeBlock(nn.Module):
    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        inter = config.intermediate_size if config.model_type in ("mixtral", "olmoe") else config.moe_intermediate_size
        self.gate = Router(config)
        self.experts = Experts(config.num_local_experts, config.hidden_size, inter)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        _, weights, ids = self.gate(x)
        return self.experts(x, ids, weights).reshape(b, s, h)


class GatedSharedExpertBlock(nn.Module):
    """Qwen2-MoE's block: the routed experts plus a shared expert scaled by a sigmoid gate."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config.num_local_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = MLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        shared = self.shared_expert(x)
        _, weights, ids = self.gate(x)
        out = self.experts(x, ids, weights)
        return (out + F.sigmoid(self.shared_expert_gate(x)) * shared).reshape(b, s, h)


class SharedExpertsBlock(nn.Module):
    """GLM-4.5's block: the routed experts plus always-on shared experts."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.experts = Experts(config.num_local_experts, config.hidden_size, config.moe_intermediate_size)
        self.gate = GroupRouter(config)
        self.shared_experts = MLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        _, weights, ids = self.gate(hidden_states)
        out = self.experts(hidden_states.view(-1, shape[-1]), ids, weights).view(*shape)
        return out + self.shared_experts(hidden_states)


class MLP(nn.Module):
    """A dense layer's MLP (Qwen's mlp_only_layers, decoder_sparse_step) or Qwen2-MoE's shared expert."""

    def __init__(self, config: NativeConfig, intermediate: int | None = None) -> None:
        super().__init__()
        h, i = config.hidden_size, intermediate or config.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _sparse(config: NativeConfig, layer: int) -> bool:
    if config.model_type in ("mixtral", "olmoe"):
        return True
    if config.model_type == "glm4_moe":
        return layer >= config.first_k_dense_replace
    return layer not in config.mlp_only_layers and config.num_local_experts > 0 and (layer + 1) % config.decoder_sparse_step == 0


class DecoderLayer(nn.Module):
    def __init__(self, config: NativeConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        block = {"qwen2_moe": GatedSharedExpertBlock, "glm4_moe": SharedExpertsBlock}.get(config.model_type, SparseMoeBlock)
        self.mlp = block(config) if _sparse(config, layer_idx) else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids=None,
                past_key_values=None, position_embeddings=None, **kwargs) -> torch.Tensor:
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                 attention_mask=attention_mask, past_key_values=past_key_values)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Model(nn.Module):
    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        # its weight given, so no random init runs (on the meta device torch's normal_ imports torch._dynamo)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


@dataclass
class Output:
    logits: torch.Tensor
    past_key_values: object = None
    loss: torch.Tensor | None = None  # with labels: the mean next-token cross-entropy, as transformers' causal LM loss


class CausalLM(nn.Module):
    """The causal LM: transformers' forward (input ids, a 2-D padding mask, positions, a KV cache,
    logits_to_keep) for these families, with sdpa attention."""

    generation_config = None  # eos and the rest come from the config, as transformers' model built from a config has them

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Model(config)
        self.vocab_size = config.vocab_size
        if config.model_type == "glm4_moe":  # loaded in float32 in a half model, as from_pretrained does (engine._kept_in_float32)
            self._keep_in_fp32_modules_strict = ["e_score_correction_bias"]
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self) -> "KVCache":
        return KVCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, labels: torch.Tensor | None = None,
                **kwargs) -> Output:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        base = self.model
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache()
        h = base.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(h.shape[1], device=h.device) + seen).unsqueeze(0)
        mask = causal_mask(inputs_embeds=h, attention_mask=attention_mask, past_key_values=past_key_values, position_ids=position_ids)
        cos_sin = base.rotary_emb(h, position_ids=position_ids)
        for layer in base.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                      position_embeddings=cos_sin)
        h = base.norm(h)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(h[:, keep, :])
        loss = None
        if labels is not None:  # token t predicts label t + 1; -100 is ignored (transformers' ForCausalLMLoss)
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), shifted.view(-1).to(logits.device), ignore_index=-100)
        return Output(logits, past_key_values if use_cache else None, loss)


_CLASS_NAMES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "olmoe": "OlmoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}


def build(config: NativeConfig, dtype: torch.dtype | None = None) -> CausalLM:
    """The model of `config` (on the current default device: meta for shapes alone), in `dtype`
    (default: the config's, else float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or config.dtype or torch.float32)
    try:
        return CausalLM(config)
    finally:
        torch.set_default_dtype(previous)


# --- KV cache and masks: transformers' DynamicCache layout and sdpa mask rules -----------------------


class KVLayer:
    """One layer's keys and values [B, kv heads, positions, d], grown by concatenation."""

    is_sliding = False
    is_croppable = True

    def __init__(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.keys = torch.tensor([], dtype=key_states.dtype, device=key_states.device)
            self.values = torch.tensor([], dtype=key_states.dtype, device=key_states.device)
            self.is_initialized = True
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to drop, not {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self.keys = self.keys[..., :tokens_to_remove, :]
            self.values = self.values[..., :tokens_to_remove, :]


class KVCache:
    """Every layer's KVLayer (transformers' DynamicCache of full-attention layers, for these models)."""

    is_croppable = True
    is_compileable = False

    def __init__(self, num_layers: int) -> None:
        self.layers = [KVLayer() for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def crop(self, max_length: int) -> None:
        for layer in self.layers:
            layer.crop(max_length)


def _all(t: torch.Tensor) -> bool:
    return bool(t.sum() == t.numel())


def causal_mask(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, past_key_values,
                position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' create_causal_mask for sdpa on a KVCache: None where sdpa's own causal flag
    does (no padding, and one query, queries as long as the keys, or an empty cache), else a boolean
    [B, 1, q, kv] mask (True: attend) of causality, padding and packed sequences."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=inputs_embeds.device, dtype=torch.bool)
    b, q = inputs_embeds.shape[0], inputs_embeds.shape[1]
    if past_key_values is not None:
        q_offset = past_key_values.get_seq_length()
        kv = q_offset + q
    else:
        q_offset, kv = 0, q if attention_mask is None else attention_mask.shape[-1]
    packed = None
    if position_ids is not None and attention_mask is None and past_key_values is None:
        pos = position_ids.expand(b, -1) if position_ids.shape[0] != b else position_ids
        diff = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
        packed = (diff != 1).cumsum(-1)
        if bool((packed[:, -1] == 0).all()):
            packed = None
    padding = attention_mask
    if padding is not None and kv - padding.shape[-1] > 0:
        padding = F.pad(padding, (0, kv - padding.shape[-1]))
    if packed is None:
        seen = padding if padding is None or padding.shape[-1] <= kv else padding[:, :kv]
        if (q == 1 or kv == q) and (seen is None or _all(seen)):
            return None
        if q_offset == 0 and (seen is None or (_all(seen[:, :q]) and _all(~seen[:, q:]))):
            return None
    q_at = torch.arange(q, device=inputs_embeds.device) + q_offset
    kv_at = torch.arange(kv, device=inputs_embeds.device)
    mask = (kv_at[None, :] <= q_at[:, None])[None, None]  # [1, 1, q, kv]
    if padding is not None:
        mask = mask & padding[:, None, None, :kv]
    if packed is not None:
        mask = mask & (packed[:, None, :, None] == packed[:, None, None, :])
    return mask.expand(b, -1, q, kv)
