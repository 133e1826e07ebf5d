"""The model families expertcache runs, as rows of data, readable without torch.

A Family row says only what transformers' model cannot tell: how its checkpoints name experts on
disk, which child of the MoE block routes and where its logits are, and how its router's weights
follow from logits (lossy routing re-mixes them only for a softmax). architectures.py finds the
experts themselves on transformers' model; `expertcache info` reads these rows with config.json
and the safetensors headers alone (tools/info.py), so it never waits for torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .routing import WeightRule


@dataclass(frozen=True)
class Family:
    """What expertcache needs to know of one model family beyond what transformers' model says."""

    model_type: str
    per_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # disk names of (gate, up, down), one tensor per expert
    disk_renames: tuple[tuple[str, str], ...] = ()  # (disk fragment, in-memory fragment)
    router: str = "gate"  # the MoE block's child that routes; its forward returns (logits, weights, ids)
    router_weight: str = "weight"  # the router's [E, H] weight, from the router (Hunyuan: "wg.weight")
    router_logits: int = 0  # which output of the router is its logits (Llama 4's comes second)
    stand_in: str | None = None  # an experts class outside the interface, replaced by a stand-in (architectures.STAND_INS)
    row_blocks: tuple[str, str, str] | None = None  # disk names under the experts module of (gate, up, down) as
    #   [E*I, H] tensors, each expert a block of I rows (DBRX's mlp.w1/v1/w2; its down is applied as h @ W)
    norm: str = "post_attention_layernorm"  # the decoder layer's norm in front of its MoE block (a dotted path)
    top_k_attr: str = "num_experts_per_tok"  # where the config keeps top-k (a dotted path: DBRX's ffn_config.moe_top_k)
    softmax_router: bool = True  # weights are a softmax of the logits, so lossy routing can re-mix them
    renormalize: bool | None = None  # top-k weights renormalised; None: config.norm_topk_prob says
    weights_in_logits_dtype: bool = True  # router weights cast back to the logits' dtype (Qwen, OLMoE)
    quirks: str = ""  # what is particular to the family, for `expertcache info --families`

    def top_k(self, config) -> int:
        for attr in self.top_k_attr.split("."):
            config = getattr(config, attr)
        return int(config)

    def weight_rule(self, config) -> "WeightRule | None":
        """How mixing weights follow from logits for another expert set; None: not a softmax router."""
        from .routing import WeightRule

        if not self.softmax_router:
            return None
        renorm = self.renormalize if self.renormalize is not None else bool(getattr(config, "norm_topk_prob", False))
        return WeightRule(renormalize=renorm, in_logits_dtype=self.weights_in_logits_dtype)

    def canonical_name(self, disk_name: str) -> str:
        """A tensor's name as saved on disk -> its name in the transformers module tree."""
        for old, new in self.disk_renames:
            disk_name = disk_name.replace(old, new)
        return disk_name



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
        Family("llama4_text", router="router", router_logits=1, softmax_router=False, stand_in="Llama4TextExperts",
               quirks="sigmoid of the top-k logits scales the experts' input, not their output (its experts module "
                      "stands outside the experts interface: a stand-in takes its place); a shared expert; MoE every "
                      "interleave_moe_layer_step-th layer; chunked attention, no-RoPE layers"),
        Family("dbrx", router="router", router_weight="layer.weight", norm="norm_attn_norm.norm_2", softmax_router=False,
               stand_in="DbrxExperts", row_blocks=("mlp.w1", "mlp.v1", "mlp.w2"), top_k_attr="ffn_config.moe_top_k",
               quirks="softmax top-k, its weights divided by their p-norm (moe_normalize_expert_weights); experts as "
                      "row blocks of 2-D w1/v1/w2 tensors, down applied as h @ W (its experts module stands outside the "
                      "experts interface: a stand-in takes its place); clipped fused QKV; layers under transformer.blocks"),
        Family("minimax", per_expert_names=("w1", "w3", "w2"), disk_renames=((".block_sparse_moe.", ".mlp."),),
               renormalize=True, weights_in_logits_dtype=False,
               quirks="softmax top-k, renormalised (Mixtral's names on disk); lightning linear-attention layers with a "
                      "cache of their own"),
    )
}

# Multimodal checkpoints whose text model is a family here: model_type -> the prefix its text
# model's tensors carry on disk. expertcache runs the text model (config.json's text_config) and
# leaves every other tensor (the vision tower, the projector) on disk.
TEXT_MODELS: dict[str, str] = {"llama4": "language_model."}


def text_prefix(model_type) -> str:
    """The prefix of the text model's tensors in a checkpoint of `model_type` ("" for a text model)."""
    return TEXT_MODELS.get(model_type, "") if isinstance(model_type, str) else ""
