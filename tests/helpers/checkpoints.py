"""Tiny random MoE checkpoints of every supported family, written by transformers' own
save_pretrained (so the on-disk layout is exactly what a user has). Seeded: the same arguments
give the same weights bit for bit."""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch


BOS, EOS, PAD = 1, 2, 0  # special ids of every tiny checkpoint (inside the tiny vocabulary)


# --------------------------------------------------------------------------------------------------
# tiny checkpoints
# --------------------------------------------------------------------------------------------------
WORDS = "the a cat dog sat ran on mat big small red blue and it was happy sad".split()


def make_word_model(directory: Path, *, num_layers: int = 2, num_experts: int = 4) -> Path:
    """A tiny top-2 Mixtral (hidden 32, seed 0) with a word-level tokenizer over WORDS ([UNK] is
    id 0, word i is id i + 1): text in, text out, for the commands that read text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    cfg = MixtralConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=16, num_hidden_layers=num_layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=num_experts, num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(directory)
    return directory


# One row per family: its config's own keywords for the tiny shapes (hidden h, heads n, experts e,
# expert intermediate i). Adding a family: a row here, a row in families.FAMILIES, and its
# name in the test matrices.
TINY: dict[str, Callable[[int, int, int, int], dict]] = {
    "mixtral": lambda h, n, e, i: dict(intermediate_size=i, num_local_experts=e),
    "qwen2_moe": lambda h, n, e, i: dict(intermediate_size=3 * i, moe_intermediate_size=i, num_experts=e,
                                         shared_expert_intermediate_size=2 * i),
    "qwen3_moe": lambda h, n, e, i: dict(head_dim=h // n, intermediate_size=3 * i, moe_intermediate_size=i, num_experts=e),
    "olmoe": lambda h, n, e, i: dict(intermediate_size=i, num_experts=e),
    # sigmoid router with a score-correction bias, group-limited top-k, a shared expert, dense first layers
    "glm4_moe": lambda h, n, e, i: dict(head_dim=h // n, intermediate_size=3 * i, moe_intermediate_size=i, n_routed_experts=e),
    # biased router, interleaved gate/up with a clamped SwiGLU (the clamp bites at this scale), expert
    # biases, [in, out] weights; a window shorter than the prompt; yarn RoPE
    "gpt_oss": lambda h, n, e, i: dict(
        head_dim=h // n, intermediate_size=i, num_local_experts=e, sliding_window=8, swiglu_limit=1.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 64}),
    # linear attention (gated delta net) but every second layer; a sigmoid-gated shared expert
    "qwen3_next": lambda h, n, e, i: dict(
        head_dim=h // n, intermediate_size=3 * i, moe_intermediate_size=i, shared_expert_intermediate_size=2 * i,
        num_experts=e, full_attention_interval=2, linear_conv_kernel_dim=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4),
    # Mamba at 0 and 2, attention at 1 and 3; MoE at 0 and 3 (four layers)
    "jamba": lambda h, n, e, i: dict(
        intermediate_size=i, num_experts=e, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=3,
        expert_layer_offset=0, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4),
    # sparsemixer (always top-2): router_jitter_noise is its mask width at inference (0.3 mixes weights)
    "phimoe": lambda h, n, e, i: dict(intermediate_size=i, num_local_experts=e, router_jitter_noise=0.3,
                                      input_jitter_noise=0.01, attention_bias=True, lm_head_bias=True),
    # every Granite multiplier away from 1
    "granitemoe": lambda h, n, e, i: dict(intermediate_size=i, num_local_experts=e, embedding_multiplier=12.0,
                                          attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=4.0),
    "granitemoeshared": lambda h, n, e, i: dict(intermediate_size=i, num_local_experts=e, shared_intermediate_size=3 * i // 2,
                                                embedding_multiplier=12.0, attention_multiplier=0.0625,
                                                residual_multiplier=0.22, logits_scaling=4.0),
    # MLA attention (low-rank q and kv, a rope/nope split of the heads), a shared expert
    "deepseek_v2": lambda h, n, e, i: dict(intermediate_size=4 * i, moe_intermediate_size=i, n_routed_experts=e,
                                           n_shared_experts=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                                           qk_nope_head_dim=8, v_head_dim=16),
    "deepseek_v3": lambda h, n, e, i: dict(intermediate_size=4 * i, moe_intermediate_size=i, n_routed_experts=e,
                                           n_shared_experts=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                                           qk_nope_head_dim=8, v_head_dim=16),
    "ernie4_5_moe": lambda h, n, e, i: dict(intermediate_size=3 * i, moe_intermediate_size=i, moe_num_experts=e,
                                            moe_num_shared_experts=1),
    "hunyuan_v1_moe": lambda h, n, e, i: dict(head_dim=h // n, intermediate_size=i, num_experts=e),
    # sigmoid-scaled inputs, a shared expert, MoE every second layer; chunked attention shorter than the
    # prompt, a no-RoPE layer, QK-norm, attention temperature tuning; llama3 RoPE
    "llama4_text": lambda h, n, e, i: dict(
        head_dim=h // n, intermediate_size=i, intermediate_size_mlp=3 * i, num_local_experts=e,
        interleave_moe_layer_step=2, attention_chunk_size=8, no_rope_layer_interval=4, use_qk_norm=True,
        attn_temperature_tuning=True, floor_scale=8, attn_scale=0.1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # experts as row blocks of 2-D w1/v1/w2, weights divided by their L1 norm; QKV clipped at a value
    # that bites at this scale; attention and FFN settings in sub-configs (top-k: tiny_config sets it)
    "dbrx": lambda h, n, e, i: dict(
        ffn_config=dict(hidden_size=h, ffn_hidden_size=i, moe_num_experts=e, moe_normalize_expert_weights=1.0),
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=0.5)),
    # lightning attention in blocks of 16 (a 40-token prompt spans three), linear in layer 0 as in MiniMax-Text-01
    "minimax": lambda h, n, e, i: dict(head_dim=h // n, intermediate_size=i, num_local_experts=e, block_size=16),
}
FAMILIES = tuple(TINY)

# One tiny checkpoint per family for the matrices (equivalence, predictors, replays): expert count,
# top-k and renormalisation varied; a family's quirks switched on by its TINY row.
FAMILY_CASES: dict[str, dict] = {
    "mixtral": dict(num_experts=8, top_k=2, expert_intermediate=32),  # always renormalises
    "qwen2_moe": dict(num_experts=12, top_k=4, norm_topk_prob=False, expert_intermediate=24),
    "qwen3_moe": dict(num_experts=16, top_k=3, norm_topk_prob=True, expert_intermediate=16),
    "olmoe": dict(num_experts=10, top_k=2, norm_topk_prob=True, expert_intermediate=40),
    # not supported before the experts seam: a row of on-disk names, no block code (families.FAMILIES)
    "glm4_moe": dict(num_experts=8, top_k=2, expert_intermediate=24, num_layers=3, n_group=2, topk_group=1,
                     routed_scaling_factor=1.5),
    "gpt_oss": dict(num_experts=8, top_k=2, num_layers=4),
    "qwen3_next": dict(num_experts=8, top_k=2, norm_topk_prob=True, num_layers=4),
    "jamba": dict(num_experts=8, top_k=2, num_layers=4),
    "phimoe": dict(num_experts=8, top_k=2, num_layers=3),  # sparsemixer: always top-2
    "granitemoe": dict(num_experts=8, top_k=2, num_layers=3),
    "granitemoeshared": dict(num_experts=8, top_k=2, num_layers=3),
    # group-limited greedy top-k: with top-2, one group of two is the setting where the limit bites
    "deepseek_v2": dict(num_experts=8, top_k=2, expert_intermediate=24, num_layers=3, first_k_dense_replace=1,
                        topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5),
    "deepseek_v3": dict(num_experts=8, top_k=2, norm_topk_prob=True, expert_intermediate=24, num_layers=3,
                        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "ernie4_5_moe": dict(num_experts=8, top_k=2, expert_intermediate=32, num_layers=3, moe_layer_start_index=1),
    "hunyuan_v1_moe": dict(num_experts=8, top_k=2, expert_intermediate=32, num_layers=3),
    "llama4_text": dict(num_experts=8, top_k=2, num_layers=4),
    "dbrx": dict(num_experts=8, top_k=2, num_layers=3),
    "minimax": dict(num_experts=8, top_k=2, expert_intermediate=32, num_layers=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
}
DENSE_LAYER_OPTIONS = ("decoder_sparse_step", "mlp_only_layers")  # the Qwen families' dense MLP layers


def tiny_config(
    family: str,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    norm_topk_prob: bool | None = None,
    num_layers: int = 2,
    hidden_size: int = 64,
    expert_intermediate: int = 32,
    vocab_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.1,
    **extra,
):
    """A tiny transformers config of `family` (fp32). `norm_topk_prob=None` keeps the family's
    default; Mixtral has no such flag (it always renormalises) and refuses an explicit one.
    `extra` goes to the config as it is (decoder_sparse_step, first_k_dense_replace, ...)."""
    from transformers import AutoConfig

    if family not in TINY:
        raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")
    if family == "mixtral" and norm_topk_prob is not None:
        raise ValueError("Mixtral always renormalises its top-k weights: leave norm_topk_prob=None")
    if family not in ("qwen2_moe", "qwen3_moe", "qwen3_next") and any(k in extra for k in DENSE_LAYER_OPTIONS):
        raise ValueError(f"{family} has no dense MLP layers (decoder_sparse_step / mlp_only_layers are Qwen options)")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        num_experts_per_tok=top_k,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    norm = {} if norm_topk_prob is None else {"norm_topk_prob": bool(norm_topk_prob)}
    own = TINY[family](hidden_size, num_heads, num_experts, expert_intermediate)
    if family == "dbrx":  # its top-k lives in ffn_config
        own["ffn_config"]["moe_top_k"] = top_k
    # each config's own names for the common keys (DBRX copies d_model into its ffn_config only
    # when given as d_model, not as its alias hidden_size)
    aliases = getattr(type(AutoConfig.for_model(family)), "attribute_map", {})
    common = {aliases.get(k, k): v for k, v in common.items()}
    return AutoConfig.for_model(family, **{**common, **own, **norm, **extra})


def make_checkpoint(
    tmp_dir: str | os.PathLike,
    family: str,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    norm_topk_prob: bool | None = None,
    fused: bool = False,
    dtype: torch.dtype = torch.float32,
    shards: int | None = None,
    seed: int = 0,
    eos_unreachable: bool = True,
    **config_kw,
) -> Path:
    """Write a tiny random checkpoint of `family` into `tmp_dir` (created) and return it.

    fused=False: save_pretrained's default, one tensor per expert (w1/w3/w2 for Mixtral under
    block_sparse_moe, gate/up/down_proj otherwise); fused=True: transformers 5's own
    [E, 2I, H] gate_up_proj / [E, H, I] down_proj (save_original_format=False).
    shards=N: split into about N safetensors files with a model.safetensors.index.json.
    eos_unreachable: zero the EOS row of the LM head so greedy decoding never picks EOS (its logit
    is exactly 0 while the max of the other 127 random logits is positive), so a 32-token greedy
    run is the same whether or not a generator stops at EOS. config_kw go to tiny_config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(family, num_experts=num_experts, top_k=top_k, norm_topk_prob=norm_topk_prob, **config_kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # exercise the QK-norm / RMSNorm weights too: their init (ones) would hide a missing tensor
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight", "norm_f.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith((".bias", "_bias")):  # zeros at init: biases would go untested
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("sinks"):  # attention sinks (gpt-oss)
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith((".D", ".A_log")):  # Mamba's skip and decay (Jamba): ones and a fixed ladder at init
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():  # a router's score-correction bias (zeros at init) steers routing too
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
        if eos_unreachable:
            head = model.get_output_embeddings()
            head.weight[EOS].zero_()
            if head.bias is not None:
                head.bias[EOS] = -1.0  # below the other logits' max, which is positive
    model = model.to(dtype)
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    kwargs = {"save_original_format": not fused}
    if shards is not None and shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        kwargs["max_shard_size"] = max(1, math.ceil(total / shards))
    model.save_pretrained(out, **kwargs)
    if shards is not None and shards > 1:
        assert (out / "model.safetensors.index.json").is_file(), "save_pretrained wrote no shard index"
    return out


def make_llama4_multimodal_checkpoint(tmp_dir: str | os.PathLike, **kw) -> Path:
    """A tiny Llama 4 checkpoint as Meta publishes them: the multimodal model (a one-layer vision
    tower and projector beside the text model, whose tensors carry `language_model.`), its text
    model the llama4_text one make_checkpoint writes with `kw` (float32)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, GenerationConfig, Llama4ForConditionalGeneration

    text_dir = make_checkpoint(Path(tmp_dir) / "text", "llama4_text", **kw)
    text = AutoConfig.from_pretrained(text_dir)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=16, vision_output_dim=32,
                  projector_input_dim=32, projector_output_dim=text.hidden_size, image_size=28, patch_size=14)
    config = AutoConfig.for_model("llama4", text_config=text.to_dict(), vision_config=vision)
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(config)
    missing = model.language_model.load_state_dict(load_file(text_dir / "model.safetensors"), strict=False).missing_keys
    assert not missing, missing
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    out = Path(tmp_dir) / "multimodal"
    model.save_pretrained(out)
    return out


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] (K a multiple of 32) -> MXFP4 blocks u8 [..., K/32, 16] and scales u8 [..., K/32]:
    each group of 32 shares the power of two that puts its largest magnitude in [4, 8), each value
    the nearest E2M1 code (clamped at 6), two codes a byte, the even element in the low nibble."""
    from expertcache.mxfp4 import E2M1

    groups = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-120)
    exp = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)
    scaled = groups / torch.exp2(exp)
    codes = (scaled.abs().clamp(max=6.0)[..., None] - torch.tensor(E2M1[:8])).abs().argmin(-1) + 8 * (scaled < 0)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8)


def make_mxfp4_checkpoint(tmp_dir: str | os.PathLike, **kw) -> Path:
    """A tiny gpt-oss checkpoint with its experts in MXFP4 as the published ones store them
    (`*_blocks`, `*_scales`, quantization_config in config.json), the rest bf16."""
    from safetensors.torch import load_file, save_file

    out = make_checkpoint(tmp_dir, "gpt_oss", fused=True, dtype=torch.bfloat16, **kw)
    tensors = load_file(out / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(tensors.pop(name).transpose(1, 2))  # [E, in, out] -> quantized along `in`
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def checkpoint_key(family: str, **kw) -> str:
    """A directory name that identifies a make_checkpoint call."""
    parts = [family] + [f"{k}={_short(v)}" for k, v in sorted(kw.items())]
    return "-".join(parts).replace("/", "_").replace(" ", "")


def _short(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, (list, tuple)):
        return "_".join(map(str, v)) or "none"
    return str(v)


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")


def prompt_ids(n: int, *, vocab_size: int = 128, seed: int = 1234) -> list[int]:
    """A fixed random prompt of n ids, special ids excluded."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(3, vocab_size, (n,), generator=g)).tolist()


def o_direct_supported(directory: Path) -> bool:
    """Whether files under `directory` can be opened and read with O_DIRECT (ext4: yes; tmpfs: no)."""
    probe = Path(directory) / ".o_direct_probe"
    probe.write_bytes(b"\0" * 8192)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        try:
            os.preadv(fd, [buf], 0)
            return True
        except OSError:
            return False
        finally:
            buf.close()
    finally:
        os.close(fd)
        probe.unlink()
