"""Exactness: the engine computes what transformers' own model computes, through the experts seam.

Per family, tiny random checkpoints written by save_pretrained give the same prompt logits as
AutoModelForCausalLM.from_pretrained and the same 32 greedy tokens, at the minimum budget (waves),
50% and 100%, prefetch none / next-gate, io direct / buffered; across expert counts, top-k,
norm_topk_prob, both on-disk layouts, shards, dense layers, tied embeddings, bf16 and every cache
policy; after each run the cache's invariants hold (slots, pins, bytes read).
"""

from __future__ import annotations

import json

import pytest
import torch

import expertcache
from expertcache import experts
from expertcache.architectures import is_experts_module
from expertcache.policies import POLICIES

from helpers.checkpoints import EOS, FAMILY_CASES
from helpers.compare import NEW_TOKENS, PROMPT, run_and_compare


MAIN = FAMILY_CASES  # the main matrix: one checkpoint per family (tests/helpers/checkpoints.py)
BUDGETS = ("min", "50%", "100%")

# Layouts and checkpoint shapes beyond the main matrix: (family, make_checkpoint kwargs).
VARIANTS = {
    "mixtral-fused": ("mixtral", dict(num_experts=8, top_k=2, fused=True)),
    "qwen2-fused-e6k2-norm": ("qwen2_moe", dict(num_experts=6, top_k=2, norm_topk_prob=True, fused=True)),
    "qwen3-fused-e8k2-nonorm": ("qwen3_moe", dict(num_experts=8, top_k=2, norm_topk_prob=False, fused=True)),
    "olmoe-fused-e9k1": ("olmoe", dict(num_experts=9, top_k=1, norm_topk_prob=False, fused=True)),
    "mixtral-sharded": ("mixtral", dict(num_experts=8, top_k=2, shards=4)),
    "olmoe-sharded-fused": ("olmoe", dict(num_experts=8, top_k=3, fused=True, shards=3)),
    "qwen2-sparse-step2": ("qwen2_moe", dict(num_experts=8, top_k=2, num_layers=4, decoder_sparse_step=2)),
    "qwen2-mlp-only-fused": ("qwen2_moe", dict(num_experts=8, top_k=3, num_layers=3, mlp_only_layers=[1], fused=True)),
    "qwen3-mlp-only-tied": (
        "qwen3_moe",
        dict(num_experts=8, top_k=2, norm_topk_prob=True, num_layers=4, mlp_only_layers=[0, 2], tie_word_embeddings=True),
    ),
    "qwen2-bf16": ("qwen2_moe", dict(num_experts=8, top_k=2, dtype=torch.bfloat16)),
    # routers built in float32 in a bf16 model: loaded in the dtype their module builds them in
    "hunyuan-bf16": ("hunyuan_v1_moe", dict(num_experts=8, top_k=2, expert_intermediate=32, num_layers=3, dtype=torch.bfloat16)),
    "ernie-bf16-fused": ("ernie4_5_moe", dict(num_experts=8, top_k=2, expert_intermediate=32, num_layers=3,
                                              moe_layer_start_index=1, dtype=torch.bfloat16, fused=True)),
    "glm4-fused-bf16-dense2": ("glm4_moe", dict(num_experts=8, top_k=2, fused=True, dtype=torch.bfloat16, num_layers=4,
                                                first_k_dense_replace=2, n_group=4, topk_group=2)),
    "mixtral-bf16-fused": ("mixtral", dict(num_experts=8, top_k=2, dtype=torch.bfloat16, fused=True)),
    "qwen3-bf16-sharded-step2": (
        "qwen3_moe",
        dict(num_experts=12, top_k=2, norm_topk_prob=True, dtype=torch.bfloat16, num_layers=4, decoder_sparse_step=2, shards=3),
    ),
}
# At the minimum budget every slot is pinned by the running layer's waves, so prefetch never gets a
# slot there (the main matrix checks both prefetch settings); 50% is where prefetch really runs.
VARIANT_RUNS = (("min", "next-gate", "direct"), ("50%", "next-gate", "buffered"))

POLICY_NAMES = sorted(name for name in POLICIES if name != "belady")  # belady needs a recorded trace


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _expected_sparse_layers(model_dir) -> list[int]:
    """Sparse layers by reading config.json with transformers' own rules, independently of the engine."""
    cfg = json.loads((model_dir / "config.json").read_text())
    step = cfg.get("decoder_sparse_step") or 1
    dense = set(cfg.get("mlp_only_layers") or []) | set(range(cfg.get("first_k_dense_replace") or 0))
    dense |= set(range(cfg.get("moe_layer_start_index") or 0))
    return [i for i in range(cfg["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0]


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("io", ["direct", "buffered"])
@pytest.mark.parametrize("prefetch", ["none", "next-gate"])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("family", list(MAIN))
def test_family_matches_transformers(family, budget, prefetch, io, checkpoint, reference, direct_io_works):
    model_dir = checkpoint(family, **MAIN[family])
    ref = reference(model_dir, PROMPT, NEW_TOKENS)
    assert EOS not in ref.generated
    stats = run_and_compare(model_dir, ref, budget=budget, prefetch=prefetch, io=io, direct_io_works=direct_io_works)
    if prefetch == "none":
        assert stats["prefetch_issued"] == 0


@pytest.mark.parametrize("budget,prefetch,io", VARIANT_RUNS, ids=["-".join(r) for r in VARIANT_RUNS])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_transformers(variant, budget, prefetch, io, checkpoint, reference, direct_io_works):
    family, kw = VARIANTS[variant]
    model_dir = checkpoint(family, **kw)
    ref = reference(model_dir, PROMPT, NEW_TOKENS)
    assert EOS not in ref.generated
    run_and_compare(model_dir, ref, budget=budget, prefetch=prefetch, io=io, direct_io_works=direct_io_works)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_checkpoint_is_what_it_claims(variant, checkpoint):
    """The checkpoint really has the layout the variant names, and the engine reads it that way."""
    family, kw = VARIANTS[variant]
    model_dir = checkpoint(family, **kw)
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        ck = eng.checkpoint
        assert {p.fused for p in ck.experts.values()} == {bool(kw.get("fused", False))}
        assert ck.dtype == kw.get("dtype", torch.float32)
        assert ck.sparse_layers == _expected_sparse_layers(model_dir)
        assert len(ck.experts) == len(ck.sparse_layers) * kw["num_experts"]
        assert eng.model.config._experts_implementation == experts.IMPLEMENTATION
        for i, layer in enumerate(eng.model.model.layers):
            moe = getattr(layer.mlp, "experts", None)
            assert (moe is not None and is_experts_module(moe)) == (i in ck.sparse_layers)
            if moe is not None:  # the cache serves its weights: none allocated in the model
                assert moe.gate_up_proj is None and moe.down_proj is None
        if "decoder_sparse_step" in kw or "mlp_only_layers" in kw:
            assert 0 < len(ck.sparse_layers) < len(eng.model.model.layers)
        if kw.get("shards"):
            assert (model_dir / "model.safetensors.index.json").is_file()
            assert len(list(model_dir.glob("*.safetensors"))) > 1
            assert len({r.path for p in ck.experts.values() for r in p.parts}) > 1, "experts all in one shard"
        if kw.get("tie_word_embeddings"):
            assert "lm_head.weight" not in ck.dense
            assert eng.model.lm_head.weight.data_ptr() == eng.model.model.embed_tokens.weight.data_ptr()


# each policy on two families (rotating), so every policy and every family is covered
POLICY_CASES = [(p, f) for i, p in enumerate(POLICY_NAMES) for f in (list(MAIN)[i % len(MAIN)], list(MAIN)[(i + 1) % len(MAIN)])]


@pytest.mark.parametrize("policy,family", POLICY_CASES, ids=[f"{p}-{f}" for p, f in POLICY_CASES])
def test_every_policy_exact_at_minimum_budget(family, policy, checkpoint, reference, direct_io_works):
    model_dir = checkpoint(family, **MAIN[family])
    ref = reference(model_dir, PROMPT, NEW_TOKENS)
    stats = run_and_compare(
        model_dir, ref, budget="min", prefetch="next-gate", io="direct", direct_io_works=direct_io_works, cache_policy=policy
    )
    assert stats["cache_policy"] == policy


# four sparse layers: prefetch protects the running layer and the layers up to its target, so
# with two layers a full cache would give a guess no slot at all
PRESSURE = ("qwen3_moe", dict(MAIN["qwen3_moe"], num_layers=4))


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_exact_with_prefetch_under_pressure(policy, checkpoint, reference, direct_io_works):
    """Three slots above the minimum: prefetches now get slots, so eviction, cancellation and
    wrong-guess handling all run under each policy; results must not change."""
    family, kw = PRESSURE
    model_dir = checkpoint(family, **kw)
    ref = reference(model_dir, PROMPT, NEW_TOKENS)
    stats = run_and_compare(
        model_dir, ref, budget="min+3", prefetch="next-gate", io="direct", direct_io_works=direct_io_works, cache_policy=policy
    )
    assert stats["cache_slots"] == kw["top_k"] + 3
    assert stats["prefetch_issued"] > 0


def test_dtype_override_matches_transformers_loaded_in_that_dtype(checkpoint):
    """EngineConfig(dtype="float32") on a bf16 checkpoint: experts stay bf16 in the cache (the budget
    counts the saved bytes) and are cast on use, so logits equal transformers' model loaded with
    dtype=float32 from the same files."""
    from transformers import AutoModelForCausalLM

    model_dir = checkpoint("mixtral", num_experts=8, top_k=2, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = ref(ids).logits
    with expertcache.load(model_dir, expert_budget="50%", prefetch="next-gate", io="buffered", dtype="float32") as eng:
        with torch.no_grad():
            got = eng.model(ids).logits
        assert eng.model.dtype == torch.float32
        assert eng.checkpoint.dtype == torch.bfloat16  # the cache holds the saved bf16 bytes
        eid = next(iter(eng.cache.core.entries))
        assert all(w.dtype == torch.bfloat16 for w in eng.cache.weights(eid))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("experts_k", [(8, 2), (16, 8)])
def test_one_token_path_equals_the_general_path_bit_for_bit(checkpoint, monkeypatch, weights_dtype, experts_k):
    """A decode step takes a shortcut past the token/slot search (with float32 weights and every
    slot routed, past the [1, k, H] buffer too: the slots' products added in slot order); its output
    must be the general path's to the bit, also when the routing weights are float32 and the hidden
    states bf16 (a 0-d weight would change the dtype the contributions are summed in), with eight
    slots of weights over 2^-6..2^6 (another summation order would show), and with a dropped slot."""
    num_experts, k = experts_k
    model_dir = checkpoint("mixtral", num_experts=num_experts, top_k=k, dtype=torch.bfloat16)
    with expertcache.load(model_dir, expert_budget="50%", prefetch="none", io="buffered") as eng:
        layer = eng.checkpoint.sparse_layers[0]
        module = eng.block(layer).experts
        g = torch.Generator().manual_seed(3)
        hidden = eng.model.config.hidden_size
        routed = torch.randperm(num_experts, generator=g)[:k].tolist()
        for ids in ([routed], [routed[:-1] + [-1]]):
            x = torch.randn(1, hidden, generator=g).to(torch.bfloat16)
            weights = (torch.rand(1, k, generator=g) * torch.exp2(torch.randint(-6, 7, (1, k), generator=g).float())).to(weights_dtype)
            ids_t = torch.tensor(ids)
            fast = eng.runtime.forward(module, layer, x, ids_t, weights)
            monkeypatch.setattr(experts, "ONE_TOKEN_PATH", False)
            general = eng.runtime.forward(module, layer, x, ids_t, weights)
            monkeypatch.setattr(experts, "ONE_TOKEN_PATH", True)
            assert fast.dtype == general.dtype == torch.bfloat16
            assert torch.equal(fast, general)
