"""The synthetic 1 GB Mixtral-shaped checkpoint of the memory test and the decode benchmark: random
weights given a trained model's routing structure (a persistent residual stream, favoured experts,
correlated routers; CkptSpec documents each), built once per spec, one layer at a time."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CKPT_ROOT = REPO / "results" / "ckpt"
BUILD_VERSION = 1  # bump when the builder changes what it writes


# per family: router name, an expert's tensor prefix, its (gate, up, down) names, attention q/k norms
LAYOUTS = {
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"), False),
    "qwen3_moe": ("mlp.gate", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"), True),
}


@dataclass(frozen=True)
class CkptSpec:
    family: str = "mixtral"  # a key of LAYOUTS: "qwen3_moe" for many small experts (FINE_SPEC)
    hidden: int = 1024
    intermediate: int = 2816
    layers: int = 8
    experts: int = 8
    top_k: int = 2
    vocab: int = 4096
    heads: int = 8
    kv_heads: int = 2
    seed: int = 0
    embed_std: float = 1.0  # token embeddings: the persistent part of the residual stream
    init_std: float = 0.02  # every projection (attention, experts, lm_head): small per-layer updates
    common: float = 0.25  # weight of the direction c shared by all embeddings (relative to embed_std)
    router_std: float = 1.0  # std of a router logit's token-dependent part (input normalised by RMSNorm)
    popularity: float = 0.3  # expert popularity logit offsets = popularity x normal quantiles
    router_rho: float = 0.6  # AR(1) correlation of adjacent layers' routers
    version: int = BUILD_VERSION

    def key(self) -> str:
        fields = asdict(self)
        if self.family == "mixtral":  # the first spec had no family: its checkpoints keep their names
            del fields["family"]
        h = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.family.replace('_', '')}-h{self.hidden}-i{self.intermediate}-l{self.layers}-e{self.experts}-k{self.top_k}-v{self.vocab}-{h}"

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.intermediate * 2  # w1, w3, w2 in bf16

    @property
    def total_expert_bytes(self) -> int:
        return self.layers * self.experts * self.expert_bytes

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def dense_bytes(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * kv * h + self.experts * h + 2 * h + (2 * self.head_dim if LAYOUTS[self.family][3] else 0)
        return 2 * (2 * self.vocab * h + h + self.layers * per_layer)


class DiskSpaceError(OSError):
    """Not enough free disk space to build the checkpoint."""


# Many small experts, Qwen3-MoE-shaped (4.8 GB of bf16 experts): per-expert and per-layer overheads
# multiply here as in Qwen3-30B-A3B (48 layers x top-8 of 128)
FINE_SPEC = CkptSpec(family="qwen3_moe", intermediate=512, layers=24, experts=64, top_k=8)


def _config(spec: CkptSpec):
    if spec.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
            moe_intermediate_size=spec.intermediate, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim, num_experts=spec.experts,
            num_experts_per_tok=spec.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
        )  # fmt: skip
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        num_local_experts=spec.experts,
        num_experts_per_tok=spec.top_k,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def _write(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    try:  # on disk now, and out of the page cache: the benchmark's reads start cold
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def build_checkpoint(root: str | os.PathLike | None = None, spec: CkptSpec = CkptSpec(), *, log=print) -> Path:
    """The checkpoint directory for `spec` under `root`, built on first use (one layer at a time)."""
    import torch

    root = Path(root or os.environ.get("EXPERTCACHE_BENCH_DIR") or DEFAULT_CKPT_ROOT)
    final = root / spec.key()
    if (final / "DONE").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    need = spec.total_expert_bytes + spec.dense_bytes + (512 << 20)
    free = shutil.disk_usage(root).free
    if free < need:
        raise DiskSpaceError(f"{root}: {free / 1e9:.2f} GB free, building the checkpoint needs {need / 1e9:.2f} GB")
    tmp = root / f".{spec.key()}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    log(f"building {final} ({spec.total_expert_bytes / 1e9:.2f} GB of experts) ...")

    H, I, E, L = spec.hidden, spec.intermediate, spec.experts, spec.layers
    kv = spec.kv_heads * spec.head_dim
    bf16 = torch.bfloat16
    gen = torch.Generator().manual_seed(spec.seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    c = randn(H)  # the common direction of the residual stream
    c_hat = c / c.norm()
    # u . RMSNorm(h) for h = g + common*c (g, c ~ N(0, 1)): sqrt(H) * common / sqrt(1 + common^2)
    along_c = math.sqrt(H) * spec.common / math.sqrt(1 + spec.common**2)
    quantiles = torch.tensor([statistics.NormalDist().inv_cdf((e + 0.5) / E) for e in range(E)])
    rho, fresh_w = spec.router_rho, math.sqrt(1 - spec.router_rho**2)

    weight_map: dict[str, str] = {}
    dense_name = "model-dense.safetensors"
    dense = {
        "model.embed_tokens.weight": (spec.embed_std * (randn(spec.vocab, H) + spec.common * c)).to(bf16),
        "model.norm.weight": torch.ones(H, dtype=bf16),
        "lm_head.weight": randn(spec.vocab, H, std=spec.init_std).to(bf16),
    }
    token_part = popularity = None
    router_name, expert_prefix, (gate, up, down), qk_norm = LAYOUTS[spec.family]
    for layer in range(L):
        p = f"model.layers.{layer}."
        dense[p + "input_layernorm.weight"] = torch.ones(H, dtype=bf16)
        dense[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=bf16)
        if qk_norm:
            dense[p + "self_attn.q_norm.weight"] = torch.ones(spec.head_dim, dtype=bf16)
            dense[p + "self_attn.k_norm.weight"] = torch.ones(spec.head_dim, dtype=bf16)
        for name, shape in (("q_proj", (H, H)), ("k_proj", (kv, H)), ("v_proj", (kv, H)), ("o_proj", (H, H))):
            dense[p + f"self_attn.{name}.weight"] = randn(*shape, std=spec.init_std).to(bf16)
        # router: token-dependent part + popularity along c, AR(1) across layers
        t_new = randn(E, H, std=spec.router_std / math.sqrt(H))
        t_new -= (t_new @ c_hat)[:, None] * c_hat[None, :]  # popularity comes from `popularity` alone
        p_new = spec.popularity * quantiles[torch.randperm(E, generator=gen)]
        token_part = t_new if token_part is None else rho * token_part + fresh_w * t_new
        popularity = p_new if popularity is None else rho * popularity + fresh_w * p_new
        router = token_part + (popularity / along_c)[:, None] * c_hat[None, :]
        dense[p + router_name + ".weight"] = router.to(bf16)
        experts = {}
        for e in range(E):
            q = p + expert_prefix.format(e=e)
            experts[q + gate + ".weight"] = randn(I, H, std=spec.init_std).to(bf16)
            experts[q + up + ".weight"] = randn(I, H, std=spec.init_std).to(bf16)
            experts[q + down + ".weight"] = randn(H, I, std=spec.init_std).to(bf16)
        fname = f"model-layer{layer:02d}.safetensors"
        _write(tmp / fname, experts)
        weight_map.update({k: fname for k in experts})
        del experts
    _write(tmp / dense_name, dense)
    weight_map.update({k: dense_name for k in dense})
    total = spec.total_expert_bytes + spec.dense_bytes
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1)
    )
    _config(spec).save_pretrained(tmp)
    (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    (tmp / "DONE").write_text("ok\n")
    try:
        tmp.rename(final)
    except OSError:  # built concurrently by another process: keep theirs
        if not (final / "DONE").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {final} in {time.perf_counter() - t0:.1f} s")
    return final


def prompt_ids(spec: CkptSpec, n: int = 32, seed: int = 1234) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, spec.vocab) for _ in range(n)]
