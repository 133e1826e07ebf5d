"""Model families: one small adapter each.

An adapter knows a family's tensor names on disk (one tensor per expert, or transformers 5's fused
[E, 2I, H] gate_up_proj / [E, H, I] down_proj), which decoder layers are sparse, how the router
turns logits into (weights, ids) exactly as transformers does, and whether the block has a shared
expert. Everything family-specific lives here; the rest of the engine is family-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class Architecture:
    """What the engine needs to know about one model family."""

    model_type: str
    num_experts_key: str  # config attribute holding the number of routed experts per layer
    expert_intermediate_key: str  # config attribute holding one expert's intermediate size
    per_expert_names: tuple[str, str, str]  # disk names of (gate, up, down) in the per-expert layout
    disk_renames: tuple[tuple[str, str], ...] = ()  # (disk fragment, in-memory fragment)
    weights_in_logits_dtype: bool = True  # router weights cast back to the logits' dtype (Qwen, OLMoE)
    always_renormalize: bool = False  # Mixtral renormalises top-k weights regardless of config
    has_shared_expert: bool = False  # Qwen2-MoE: a dense shared expert scaled by sigmoid(gate)

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_key))

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def renormalize(self, config) -> bool:
        return self.always_renormalize or bool(getattr(config, "norm_topk_prob", False))

    def expert_intermediate(self, config) -> int:
        return int(getattr(config, self.expert_intermediate_key))

    def sparse_layers(self, config) -> list[int]:
        """Decoder layers whose MLP is a sparse-MoE block, by transformers' own rule."""
        n = int(config.num_hidden_layers)
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        dense_only = set(getattr(config, "mlp_only_layers", None) or [])
        return [i for i in range(n) if i not in dense_only and (i + 1) % step == 0]

    def canonical_name(self, disk_name: str) -> str:
        """Map a tensor name as saved on disk to the name it has in the transformers module tree."""
        for old, new in self.disk_renames:
            disk_name = disk_name.replace(old, new)
        return disk_name

    def route(self, logits: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k routing of this family: logits [T, E] -> (weights [T, k], ids [T, k]).

        Mirrors transformers' TopKRouter.forward op for op, so dtypes and rounding match."""
        if self.weights_in_logits_dtype:
            probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)  # [T, E]
        else:
            probs = torch.nn.functional.softmax(logits.float(), dim=-1)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k(config), dim=-1)  # [T, k]
        if self.renormalize(config):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_logits_dtype:
            weights = weights.to(logits.dtype)
        return weights, ids


ARCHITECTURES: dict[str, Architecture] = {
    "mixtral": Architecture(
        model_type="mixtral",
        num_experts_key="num_local_experts",
        expert_intermediate_key="intermediate_size",
        per_expert_names=("w1", "w3", "w2"),
        disk_renames=((".block_sparse_moe.", ".mlp."),),
        weights_in_logits_dtype=False,
        always_renormalize=True,
    ),
    "qwen2_moe": Architecture(
        model_type="qwen2_moe",
        num_experts_key="num_experts",
        expert_intermediate_key="moe_intermediate_size",
        per_expert_names=("gate_proj", "up_proj", "down_proj"),
        has_shared_expert=True,
    ),
    "qwen3_moe": Architecture(
        model_type="qwen3_moe",
        num_experts_key="num_experts",
        expert_intermediate_key="moe_intermediate_size",
        per_expert_names=("gate_proj", "up_proj", "down_proj"),
    ),
    "olmoe": Architecture(
        model_type="olmoe",
        num_experts_key="num_experts",
        expert_intermediate_key="intermediate_size",
        per_expert_names=("gate_proj", "up_proj", "down_proj"),
    ),
}


def architecture_for(config) -> Architecture:
    """The adapter for a transformers config, or a one-line error naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise CheckpointError(
            f"unsupported architecture {model_type!r}: expertcache supports {supported}"
        )
    return ARCHITECTURES[model_type]
