"""What a checkpoint is, in figures (family, layers, experts, bytes, the minimum budget), and which
families expertcache runs."""

from __future__ import annotations

from pathlib import Path

from ..architectures import FAMILIES
from ..checkpoint import Checkpoint
from ..engine import demo_model_dir


def families() -> list[dict]:
    """Every supported family and what is particular to it."""
    return [{"model_type": f.model_type, "quirks": f.quirks, "lossy_routing": f.softmax_router} for f in FAMILIES.values()]


def model_info(model_dir: str | Path | None) -> dict:
    """The figures of a checkpoint directory (None = the bundled demo model)."""
    ckpt = Checkpoint.open(model_dir if model_dir is not None else demo_model_dir())
    eb, k, layers = ckpt.expert_bytes, ckpt.top_k, len(ckpt.sparse_layers)
    rule = ckpt.family.weight_rule(ckpt.config)
    return {
        "model": str(ckpt.model_dir),
        "supported": True,
        "family": ckpt.family.model_type,
        "layers": int(ckpt.config.num_hidden_layers),
        "sparse_layers": layers,
        "experts_per_layer": ckpt.num_experts,
        "top_k": k,
        "renormalize": rule.renormalize if rule is not None else None,
        "expert_layout": "fused" if next(iter(ckpt.experts.values())).fused else "per-expert",
        "dtype": str(ckpt.dtype).replace("torch.", ""),
        "bytes_per_expert": eb,
        "dense_bytes": ckpt.dense_bytes,
        "total_expert_bytes": ckpt.total_expert_bytes,
        "min_budget_bytes": k * eb,
        "token_cycle_bytes": layers * k * eb,
    }
