"""Model families as data, and where a transformers model keeps its experts.

transformers routes each MoE family's experts through its experts interface: the family's experts
module is decorated with `use_experts_implementation`, which marks every instance (has_gate,
is_transposed, ...). `experts_sites` finds those modules on a model built on the meta device, with
their layer and per-expert shapes. A Family row adds only what the model cannot tell: how its
checkpoints name experts on disk, and how its router's weights follow from logits (lossy routing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointError
from .routing import WeightRule

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Family:
    """What expertcache needs to know of one model family beyond what transformers' model says."""

    model_type: str
    per_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # disk names of (gate, up, down), one tensor per expert
    disk_renames: tuple[tuple[str, str], ...] = ()  # (disk fragment, in-memory fragment)
    router: str = "gate"  # the MoE block's child that routes; its forward returns (logits, weights, ids)
    router_weight: str = "weight"  # the router's [E, H] weight, from the router (Hunyuan: "wg.weight")
    router_logits: int = 0  # which output of the router is its logits (Llama 4's comes second)
    scaled_rows: str | None = None  # an experts class outside the interface that takes router-scaled rows [E*T, H] (Llama 4)
    norm: str = "post_attention_layernorm"  # the decoder layer's norm in front of its MoE block
    softmax_router: bool = True  # weights are a softmax of the logits, so lossy routing can re-mix them
    renormalize: bool | None = None  # top-k weights renormalised; None: config.norm_topk_prob says
    weights_in_logits_dtype: bool = True  # router weights cast back to the logits' dtype (Qwen, OLMoE)
    quirks: str = ""  # what is particular to the family, for `expertcache info --families`

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def weight_rule(self, config) -> WeightRule | None:
        """How mixing weights follow from logits for another expert set; None: not a softmax router."""
        if not self.softmax_router:
            return None
        renorm = self.renormalize if self.renormalize is not None else bool(getattr(config, "norm_topk_prob", False))
        return WeightRule(renormalize=renorm, in_logits_dtype=self.weights_in_logits_dtype)

    def canonical_name(self, disk_name: str) -> str:
        """A tensor's name as saved on disk -> its name in the transformers module tree."""
        for old, new in self.disk_renames:
            disk_name = disk_name.replace(old, new)
        return disk_name


class ScaledRowsExperts(nn.Module):
    """Experts whose block hands them one row per (expert, token) of inputs already scaled by the
    router (Llama 4: rows [E*T, H], every expert on every token, unselected rows zero) and sums
    their outputs itself. transformers 5.23 keeps such a module outside its experts interface;
    this stand-in, swapped in for it in expertcache's own model, carries the interface's marks and
    the same weights, and its calls go to the engine (ExpertsRuntime.forward_rows), which computes
    only the selected rows."""

    has_gate, is_transposed, is_concatenated, has_bias, has_post_expert_norm = True, True, True, False, False

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.num_experts = original.num_experts
        self.gate_up_proj = original.gate_up_proj  # [E, H, 2I]: gate then up
        self.down_proj = original.down_proj  # [E, I, H]
        self.act_fn = original.act_fn

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return up * self.act_fn(gate)  # as Llama4TextExperts computes it

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        binding = self.__dict__.get("_expertcache")
        if binding is None:
            raise RuntimeError("these experts belong to no expertcache engine: load the model with expertcache.load()")
        runtime, layer = binding
        return runtime.forward_rows(self, layer, rows)


GRANITE_RENAMES = (  # Granite keeps its experts fused under other names, in both save formats
    (".block_sparse_moe.input_linear.weight", ".block_sparse_moe.experts.gate_up_proj"),
    (".block_sparse_moe.output_linear.weight", ".block_sparse_moe.experts.down_proj"),
    (".block_sparse_moe.router.layer.weight", ".block_sparse_moe.router.weight"),
)

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("mixtral", per_expert_names=("w1", "w3", "w2"), disk_renames=((".block_sparse_moe.", ".mlp."),),
               renormalize=True, weights_in_logits_dtype=False, quirks="softmax top-k, always renormalised"),
        Family("qwen2_moe", quirks="softmax top-k; a sigmoid-gated shared expert; dense layers by decoder_sparse_step / mlp_only_layers"),
        Family("qwen3_moe", quirks="softmax top-k; dense layers by decoder_sparse_step / mlp_only_layers"),
        Family("olmoe", quirks="softmax top-k"),
        Family("glm4_moe", softmax_router=False, quirks="sigmoid scores with a score-correction bias, group-limited top-k, "
                                                         "routed scaling; a shared expert; dense leading layers (first_k_dense_replace)"),
        Family("gpt_oss", router="router", renormalize=True,
               quirks="softmax over the top-k logits of a biased router; interleaved gate/up with a clamped SwiGLU, expert "
                      "biases, [in, out] weights, fused on disk; attention sinks, sliding and full attention"),
        Family("qwen3_next", quirks="softmax top-k; a sigmoid-gated shared expert; gated-delta-net linear attention but "
                                    "every full_attention_interval-th layer"),
        Family("jamba", router="router", norm="pre_ff_layernorm", renormalize=False,
               quirks="softmax top-k, never renormalised; MoE every expert_layer_period-th layer; Mamba and attention "
                      "layers interleaved"),
        Family("phimoe", per_expert_names=("w1", "w3", "w2"), router="router", softmax_router=False,
               disk_renames=((".block_sparse_moe.", ".mlp."), (".mlp.gate.weight", ".mlp.router.weight")),
               quirks="sparsemixer routing: always top-2, each choice weighted by a softmax over the logits near it, "
                      "not a top-k softmax; LayerNorm and attention biases"),
        Family("granitemoe", disk_renames=GRANITE_RENAMES, router="router", renormalize=True, weights_in_logits_dtype=False,
               quirks="softmax over the top-k logits; embedding, attention, residual and logits multipliers; experts "
                      "fused on disk (input_linear / output_linear)"),
        Family("granitemoeshared", disk_renames=GRANITE_RENAMES, router="router", renormalize=True,
               weights_in_logits_dtype=False, quirks="as granitemoe, with a shared MLP beside the MoE block"),
        Family("deepseek_v2", softmax_router=False,
               quirks="softmax over all experts times routed_scaling_factor, not renormalised; group-limited greedy "
                      "top-k; MLA attention; shared experts; dense leading layers (first_k_dense_replace)"),
        Family("deepseek_v3", softmax_router=False,
               quirks="sigmoid scores with a score-correction bias, group-limited top-k, routed scaling; MLA "
                      "attention; a shared expert; dense leading layers (first_k_dense_replace)"),
        Family("ernie4_5_moe", disk_renames=((".mlp.moe_statics.", ".mlp.gate.moe_statics."),), renormalize=True,
               weights_in_logits_dtype=False,
               quirks="softmax top-k chosen with a score-correction bias (moe_statics), renormalised; the router in "
                      "float32; shared experts; dense layers before moe_layer_start_index"),
        Family("hunyuan_v1_moe", router_weight="wg.weight", renormalize=True,
               quirks="softmax top-k, renormalised; the router's weight is gate.wg, in float32; a shared MLP; QK-norm"),
        Family("llama4_text", router="router", router_logits=1, softmax_router=False, scaled_rows="Llama4TextExperts",
               quirks="sigmoid of the top-k logits scales the experts' input, not their output (its experts module "
                      "stands outside the experts interface: a stand-in takes its place); a shared expert; MoE every "
                      "interleave_moe_layer_step-th layer; chunked attention, no-RoPE layers"),
        Family("minimax", per_expert_names=("w1", "w3", "w2"), disk_renames=((".block_sparse_moe.", ".mlp."),),
               renormalize=True, weights_in_logits_dtype=False,
               quirks="softmax top-k, renormalised (Mixtral's names on disk); lightning linear-attention layers with a "
                      "cache of their own"),
    )
}


@dataclass(frozen=True)
class ExpertsSite:
    """One experts module of a model: where it is and the shapes of one expert's weights."""

    layer: int  # decoder layer index
    path: str  # module name, e.g. "model.layers.3.mlp.experts"
    num_experts: int
    weights: tuple[str, ...]  # its expert weight parameters: ("gate_up_proj" | "up_proj", "down_proj")
    shapes: tuple[tuple[int, ...], ...]  # one expert's slice of each, in memory
    has_gate: bool
    transposed: bool  # weights are [in, out] (x @ W) instead of [out, in]

    @property
    def block(self) -> str:
        """The MoE block holding it."""
        return self.path.rsplit(".", 1)[0]

    @property
    def decoder_layer(self) -> str:
        m = _LAYER.search(self.path + ".")
        return self.path[: m.end() - 1]


def family_for(config) -> Family:
    """The row for a transformers config, or a one-line error saying what is missing."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise unsupported(model_type, why_unsupported(config))
    return FAMILIES[model_type]


def unsupported(model_type, why: str | None) -> CheckpointError:
    why = f" ({why})" if why else ""
    return CheckpointError(f"unsupported architecture {model_type!r}{why}: expertcache supports {', '.join(sorted(FAMILIES))}")


def why_unsupported(config) -> str | None:
    """The one thing that keeps a model of `config` from running here, read off its model."""
    text = getattr(config, "text_config", None)
    if getattr(text, "model_type", None) in FAMILIES:
        return (f"a multimodal checkpoint: its text model {text.model_type!r} is supported, reading it out of a "
                "multimodal checkpoint is not yet")
    try:
        model = build_model(config, family=FAMILIES.get(config.model_type))
    except CheckpointError as e:
        return str(e)
    try:
        sites = experts_sites(model)
    except CheckpointError as e:
        return str(e)
    if sites and config.model_type not in FAMILIES:
        return "its experts go through transformers' experts interface, but no row describes how its checkpoints name them on disk"
    if not sites:
        unrouted = next((m for n, m in model.named_modules() if n.endswith(".experts")), None)
        if unrouted is not None:
            return f"its experts module {type(unrouted).__name__} is not routed through transformers' experts interface"
        return "a dense model: it has no experts"
    return None


def is_experts_module(module: nn.Module) -> bool:
    """Whether transformers dispatches this module's forward through its experts interface."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated"))


def experts_sites(model: nn.Module) -> dict[int, ExpertsSite]:
    """Every experts module of `model` (built on any device, meta included), by decoder layer."""
    sites: dict[int, ExpertsSite] = {}
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        m = _LAYER.search(name + ".")
        if m is None:
            raise CheckpointError(f"experts module {name} sits outside the decoder layers: not supported")
        names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
        params = [getattr(module, n, None) for n in names]
        if any(not isinstance(p, torch.Tensor) or p.dim() != 3 for p in params):
            raise CheckpointError(f"experts module {name} does not keep its weights as [experts, ...] tensors {names}")
        layer = int(m.group(1))
        sites[layer] = ExpertsSite(
            layer=layer, path=name, num_experts=int(params[0].shape[0]), weights=names,
            shapes=tuple(tuple(p.shape[1:]) for p in params), has_gate=bool(module.has_gate),
            transposed=bool(module.is_transposed),
        )
    return dict(sorted(sites.items()))


def shared_expert_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """What a MoE block's shared experts add on x [n, H] (None: the block has none): Qwen2-MoE's
    sigmoid-gated shared_expert, DeepSeek-style shared_experts, Hunyuan's shared_mlp."""
    for name in ("shared_expert", "shared_experts", "shared_mlp"):
        shared = getattr(block, name, None)
        if shared is not None:
            gate = getattr(block, name + "_gate", None)
            y = shared(x)
            return torch.sigmoid(gate(x)) * y if gate is not None else y
    return None


def build_model(config, *, dtype: torch.dtype | None = None, experts_implementation: str | None = None,
                family: Family | None = None) -> nn.Module:
    """The transformers causal LM of `config` on the meta device: modules and shapes, no memory.
    A family whose experts stand outside the interface gets its stand-in (ScaledRowsExperts)."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    except Exception as e:  # a config transformers accepted but cannot build from (unknown activation, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot build the model from its config.json ({first})") from None
    if family is not None and family.scaled_rows is not None:
        for name, module in list(model.named_modules()):
            if type(module).__name__ == family.scaled_rows:
                model.set_submodule(name, ScaledRowsExperts(module))
    return model
