"""The engine's own Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE and GLM-4.5 (native.py) against transformers' models.

Same checkpoint, same weights: the native model's logits equal transformers' bit for bit for a
prompt, a prompt's next chunk on its cache, a left-padded batch and a decode step; its config reads
as transformers' does; configs it does not write out go to transformers; an engine on a native
family never imports transformers (a fresh process).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertcache import native
from expertcache.checkpoint import Checkpoint, load_config
from helpers.fresh import printed_words

CASES = {
    "mixtral": dict(num_experts=8, top_k=2),
    "qwen3_moe": dict(num_experts=8, top_k=2, norm_topk_prob=True, num_layers=4, mlp_only_layers=[1], tie_word_embeddings=True),
    "qwen3_moe-bf16": dict(num_experts=8, top_k=2, norm_topk_prob=False, dtype=torch.bfloat16),
    "mixtral-bf16": dict(num_experts=8, top_k=2, dtype=torch.bfloat16),
    "qwen2_moe": dict(num_experts=8, top_k=2, num_layers=3, mlp_only_layers=[1]),  # a shared expert, q/k/v biases
    "qwen2_moe-bf16": dict(num_experts=6, top_k=2, norm_topk_prob=True, dtype=torch.bfloat16),
    "olmoe": dict(num_experts=8, top_k=2, norm_topk_prob=True),  # whole-projection q/k norms
    "olmoe-bf16-clip": dict(num_experts=8, top_k=3, dtype=torch.bfloat16, clip_qkv=0.5),
    # sigmoid group-limited router with a correction bias, shared experts, a partial rotary embedding, dense first layer
    "glm4_moe": dict(num_experts=8, top_k=2, expert_intermediate=24, num_layers=3, n_group=2, topk_group=1, routed_scaling_factor=1.5),
    "glm4_moe-bf16-dense2": dict(num_experts=8, top_k=2, fused=True, dtype=torch.bfloat16, num_layers=4, first_k_dense_replace=2,
                                 n_group=4, topk_group=2),
}


def _models(model_dir: Path):
    """transformers' model and the native one, the same weights in each."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, experts_implementation="eager").eval()
    config = native.read_config(model_dir)
    assert config is not None, "a plain checkpoint of a native family must build natively"
    mine = native.build(config, ref.dtype)
    state = ref.state_dict()
    mine_keys = set(mine.state_dict())
    missing = mine.load_state_dict({k: v for k, v in state.items() if k in mine_keys}, strict=False)
    assert not [k for k in missing.missing_keys if k != "lm_head.weight" or not config.tie_word_embeddings]
    if config.tie_word_embeddings:
        mine.tie_weights()
    mine.eval()
    return ref, mine


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"max difference {(a.float() - b.float()).abs().max().item()}"


@pytest.mark.parametrize("case", list(CASES))
def test_native_model_computes_transformers_bits(case, checkpoint):
    family = case.split("-")[0]
    ref, mine = _models(checkpoint(family, **CASES[case]))
    g = torch.Generator().manual_seed(0)
    vocab = ref.config.vocab_size
    ids = torch.randint(3, vocab, (1, 24), generator=g)
    with torch.no_grad():
        a, b = ref(input_ids=ids[:, :16], use_cache=True), mine(input_ids=ids[:, :16], use_cache=True)
        _same(a.logits, b.logits)  # a prompt (is_causal, no mask)
        pos = torch.arange(16, 24)[None]
        a2 = ref(input_ids=ids[:, 16:], position_ids=pos, past_key_values=a.past_key_values, use_cache=True)
        b2 = mine(input_ids=ids[:, 16:], position_ids=pos, past_key_values=b.past_key_values, use_cache=True)
        _same(a2.logits, b2.logits)  # its next chunk on the cache (a boolean causal mask)
        for la, lb in zip(a2.past_key_values.layers, b2.past_key_values.layers):
            _same(la.keys, lb.keys)
            _same(la.values, lb.values)
        step = torch.tensor([[5]])
        a3 = ref(input_ids=step, position_ids=torch.tensor([[24]]), past_key_values=a2.past_key_values, logits_to_keep=1)
        b3 = mine(input_ids=step, position_ids=torch.tensor([[24]]), past_key_values=b2.past_key_values, logits_to_keep=1)
        _same(a3.logits, b3.logits)  # a decode step
        # a left-padded batch of two prompts, as the server's batcher feeds them
        batch = torch.randint(3, vocab, (2, 10), generator=g)
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :4] = 0
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        _same(ref(input_ids=batch, attention_mask=mask, position_ids=pos).logits,
              mine(input_ids=batch, attention_mask=mask, position_ids=pos).logits)


def test_labels_give_transformers_loss(checkpoint):
    ref, mine = _models(checkpoint("mixtral", **CASES["mixtral"]))
    ids = torch.randint(3, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions
    with torch.no_grad():
        a, b = ref(input_ids=ids, labels=labels), mine(input_ids=ids, labels=labels)
    _same(a.loss, b.loss)
    assert mine(input_ids=ids).loss is None


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe"])
def test_native_config_reads_as_transformers(case, checkpoint):
    model_dir = checkpoint(case, **CASES[case])
    theirs, ours = load_config(model_dir), load_config(model_dir, native=True)
    assert isinstance(ours, native.NativeConfig) and not isinstance(theirs, native.NativeConfig)
    for name in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "num_experts_per_tok", "n_group", "topk_group",
                 "routed_scaling_factor", "first_k_dense_replace", "n_shared_experts", "use_qk_norm",
                 "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "dtype",
                 "layer_types", "clip_qkv", "qkv_bias", "attention_bias", "norm_topk_prob", "mlp_only_layers"):
        assert getattr(ours, name, None) == getattr(theirs, name, None), name
    assert native.head_dim(ours) == native.head_dim(theirs)
    counts = [getattr(theirs, n, None) for n in ("num_local_experts", "num_experts", "n_routed_experts")]
    assert ours.num_local_experts == next(c for c in counts if c is not None)
    assert Checkpoint.open(model_dir, native=True).sparse_layers == Checkpoint.open(model_dir).sparse_layers


@pytest.mark.parametrize("change", [
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}},
    {"sliding_window": 16},
    {"hidden_act": "gelu"},
    {"architectures": ["SomethingElse"]},
    {"partial_rotary_factor": 0.5},
    {"model_type": "qwen2_moe", "use_sliding_window": True},
    {"model_type": "qwen2_moe", "layer_types": ["sliding_attention", "full_attention"]},
])
def test_configs_it_does_not_write_out_go_to_transformers(change):
    raw = {"model_type": "mixtral", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64}
    assert native.config_for(raw) is not None
    assert native.config_for({**raw, **change}) is None
    assert native.config_for({**raw, "model_type": "deepseek_v3"}) is None


def test_engine_on_a_native_family_never_imports_transformers(checkpoint):
    model_dir = checkpoint("mixtral", **CASES["mixtral"])
    code = ("import sys, expertcache\n"
            f"eng = expertcache.load({str(model_dir)!r}, expert_budget='50%')\n"
            "out = eng.generate([5, 6, 7, 8], max_new_tokens=4, stop_at_eos=False)\n"
            "print(eng.stats()['model_build'], eng.decode_step, len(out.token_ids), 'transformers' in sys.modules,"
            " 'torch._dynamo' in sys.modules, 'sympy' in sys.modules)\n")
    assert printed_words(code) == ["native", "lean", "4", "False", "False", "False"]


def test_model_build_transformers_still_builds_theirs(checkpoint):
    import expertcache

    model_dir = checkpoint("mixtral", **CASES["mixtral"])
    prompt = [5, 6, 7, 8, 9, 10]
    outs = {}
    for build in ("native", "transformers"):
        with expertcache.load(model_dir, expert_budget="50%", model_build=build) as eng:
            assert eng.stats()["model_build"] == build
            assert isinstance(eng.model, native.CausalLM) == (build == "native")
            outs[build] = eng.generate(prompt, max_new_tokens=8, stop_at_eos=False).token_ids
    assert outs["native"] == outs["transformers"]


def test_a_config_json_with_rope_theta_at_top_level():
    """Older checkpoints keep rope_theta at the top: it becomes rope_parameters, as transformers reads it."""
    raw = json.loads(json.dumps({"model_type": "qwen3_moe", "rope_theta": 5e5, "num_experts": 4}))
    c = native.config_for(raw)
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 5e5}
    assert c.num_local_experts == c.num_experts == 4


# config.json as published for a model of each family (the keys and values their hubs' files carry,
# written out here: no download), read and built on the meta device by both builders
PUBLISHED = {
    "Mixtral-8x7B-v0.1": {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
                          "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
                          "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
                          "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
                          "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                          "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
                          "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000},
    "Qwen3-30B-A3B": {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                      "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
                      "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
                      "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
                      "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
                      "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
                      "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
                      "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
                      "vocab_size": 151936},
    "Qwen1.5-MoE-A2.7B": {"architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
                          "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
                          "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
                          "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
                          "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                          "use_cache": True, "use_sliding_window": False, "vocab_size": 151936, "decoder_sparse_step": 1,
                          "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
                          "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001},
    "OLMoE-1B-7B-0924": {"architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
                         "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
                         "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
                         "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
                         "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
                         "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
                         "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304},
    "GLM-4.5-Air": {"architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "pad_token_id": 151329,
                    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
                    "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
                    "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408, "norm_topk_prob": True,
                    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
                    "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1, "num_hidden_layers": 46,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
                    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
                    "use_qk_norm": False, "vocab_size": 151552},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_a_published_config_builds_the_same_model(name, tmp_path):
    """A published model's config.json: the native reading agrees with AutoConfig, and the meta
    models of both builders have the same parameters and buffers (names, shapes, dtypes) and rotary
    frequencies."""
    from expertcache.architectures import build_model

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    theirs, ours = load_config(tmp_path), load_config(tmp_path, native=True)
    assert isinstance(ours, native.NativeConfig), f"{name} should build natively"
    for attr in ("rope_parameters", "eos_token_id", "pad_token_id", "tie_word_embeddings", "num_experts_per_tok", "dtype"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    a = build_model(theirs, dtype=torch.bfloat16, experts_implementation="eager")
    b = build_model(ours, dtype=torch.bfloat16)
    assert {n: (tuple(p.shape), p.dtype) for n, p in a.named_parameters()} == {n: (tuple(p.shape), p.dtype) for n, p in b.named_parameters()}
    persistent = lambda m: {n: (tuple(t.shape), t.dtype) for n, t in m.state_dict().items()}  # noqa: E731
    assert persistent(a) == persistent(b)
    assert torch.equal(type(a.model.rotary_emb)(config=theirs).inv_freq, b.model.rotary_emb.inv_freq)
