"""Every supported family through everything that reads a model: transformers' own outputs from
both on-disk layouts, every predictor (the trained ones fitted on a quick calibration) keeping them
exact, and a trace of each tiny model replaying to its run's exact counters. Adding a family is a
row in families.FAMILIES and in tests/helpers/checkpoints.py (TINY, FAMILY_CASES)."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import FAMILY_CASES, TINY, make_llama4_multimodal_checkpoint, make_mxfp4_checkpoint, prompt_ids
from helpers.invariants import check_engine_invariants
from helpers.reference import Reference

import expertcache
from expertcache.architectures import FAMILIES
from expertcache.checkpoint import Checkpoint
from expertcache.predictors import PREDICTORS
from expertcache.ids import TRAINED_KINDS
from expertcache.sim.hardware import PRESETS
from expertcache.sim.recorder import Recorder
from expertcache.sim.simulate import replay
from expertcache.tools.predictor_training import TrainSettings, record_calibration, train_predictor, train_pregate

PROMPT = prompt_ids(24)
TOKENS = 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _exact(model_dir, ref, **options) -> dict:
    with expertcache.load(model_dir, **options) as eng:
        with torch.no_grad():
            logits = eng.model(input_ids=torch.tensor([PROMPT])).logits[0]
        torch.testing.assert_close(logits, ref.logits)
        assert eng.generate(PROMPT, max_new_tokens=TOKENS, stop_at_eos=False).token_ids == ref.generated
        check_engine_invariants(eng)
        return eng.stats()


def _slots(model_dir, n: int) -> int:
    ck = Checkpoint.open(model_dir)
    return (ck.top_k + n) * ck.expert_bytes


def test_every_family_has_a_tiny_model_and_a_case():
    assert set(FAMILIES) == set(TINY) == set(FAMILY_CASES)


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_the_fused_layout_matches_transformers(family, checkpoint, reference):
    model_dir = checkpoint(family, fused=True, **FAMILY_CASES[family])
    assert all(p.fused for p in Checkpoint.open(model_dir).experts.values())
    ref = reference(model_dir, PROMPT, TOKENS)
    for budget in (_slots(model_dir, 0), "50%"):
        _exact(model_dir, ref, expert_budget=budget, prefetch="next-gate", io="buffered")


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_each_dense_tensor_has_the_dtype_from_pretrained_gives_it(family, checkpoint):
    """In a bf16 model some tensors stay float32, by the module (Hunyuan's router) or by the model
    class's keep-in-float32 list (DeepSeek-V3's score-correction bias): the engine follows both."""
    from transformers import AutoModelForCausalLM

    model_dir = checkpoint(family, dtype=torch.bfloat16, **FAMILY_CASES[family])
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    want = {n: t.dtype for n, t in (*ref.named_parameters(), *ref.named_buffers())}
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none") as eng:
        got = {n: t.dtype for n, t in (*eng.model.named_parameters(), *eng.model.named_buffers())}
    assert got and {n: d for n, d in got.items() if want.get(n, d) != d} == {}


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_every_predictor_keeps_the_outputs_exact(family, checkpoint, reference, tmp_path):
    model_dir = checkpoint(family, **FAMILY_CASES[family])
    ref = reference(model_dir, PROMPT, TOKENS)
    files = {}
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        trace = record_calibration(eng, [prompt_ids(48, seed=s) for s in range(3)], max_tokens=144, window=48, progress=False)
        for kind in TRAINED_KINDS:
            if kind == "pregate":  # from token documents: a trace holds no embeddings
                art = train_pregate(eng, [prompt_ids(48, seed=s) for s in range(3)], settings=TrainSettings(steps=5), progress=False)
            else:
                art = train_predictor(eng, kind, trace=trace, depths=[1], settings=TrainSettings(steps=5), progress=False)
            files[kind] = str(art.save(tmp_path / f"{kind}.pt"))
    for name in sorted(PREDICTORS):
        stats = _exact(model_dir, ref, expert_budget=_slots(model_dir, 3), prefetch=name, predictor=files.get(name), io="direct")
        assert (stats["prefetch_issued"] > 0) == (name != "none"), name


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_a_trace_of_each_family_replays_to_the_runs_counters(family, checkpoint):
    model_dir = checkpoint(family, **FAMILY_CASES[family])
    with expertcache.load(model_dir, expert_budget="30%", prefetch="none", io="buffered") as eng:
        with Recorder(eng) as rec:
            eng.generate(PROMPT, max_new_tokens=TOKENS, stop_at_eos=False)
        stats, budget = eng.stats(), eng.budget_bytes
    r = replay(rec.trace, "lfu", budget, mode="engine")
    assert (r.lookups, r.hits, r.misses) == (stats["lookups"], stats["hits"], stats["misses"])
    with expertcache.load(model_dir, expert_budget="30%", prefetch="next-gate", io="buffered") as eng:
        with Recorder(eng) as rec:
            eng.generate(PROMPT, max_new_tokens=TOKENS, stop_at_eos=False)
    timed = replay(rec.trace, "lfu", budget, mode="engine", prefetch=True, hardware=PRESETS["nvme4"])
    assert timed.lookups == stats["lookups"] and timed.prefetch["prefetch_issued"] > 0


@torch.no_grad()
def test_llama4_as_published_runs_its_text_model(tmp_path):
    """A multimodal Llama 4 checkpoint (text tensors under `language_model.`, a vision tower beside
    them): the engine runs its text model, equal to transformers' multimodal model on text, and
    reads none of the vision tensors."""
    from transformers import Llama4ForConditionalGeneration

    model_dir = make_llama4_multimodal_checkpoint(tmp_path, **FAMILY_CASES["llama4_text"])
    model = Llama4ForConditionalGeneration.from_pretrained(model_dir).eval()
    ids = torch.tensor([PROMPT])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                               do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    ref = Reference(logits=model(input_ids=ids).logits[0], generated=generated, dtype=torch.float32)
    for budget in (_slots(model_dir, 0), "50%"):
        _exact(model_dir, ref, expert_budget=budget, prefetch="next-gate", io="direct")
    ck = Checkpoint.open(model_dir)
    assert ck.family.model_type == "llama4_text"
    assert ck.dense and not [n for n, r in ck.dense.items() if "vision" in n or "projector" in n]


def test_gpt_oss_mxfp4_experts_are_read_as_published(tmp_path):
    """Blocks and scales of one expert are read as saved (the cache budgets the packed bytes) and
    decoded on use: outputs equal transformers' own model dequantized at load."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model_dir = make_mxfp4_checkpoint(tmp_path / "m", **{k: v for k, v in FAMILY_CASES["gpt_oss"].items() if k != "fused"})
    ck = Checkpoint.open(model_dir)
    assert all(p.mxfp4 for p in ck.experts.values()) and ck.dtype == torch.bfloat16
    assert ck.expert_bytes < 2 * sum(sh[0] * sh[1] for sh in ck.sites[0].shapes) / 3  # bf16 would be 2 bytes a weight
    ref_model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=Mxfp4Config(dequantize=True),
                                                     dtype=torch.bfloat16).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = ref_model(input_ids=ids).logits[0]
        gen = ref_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, min_new_tokens=TOKENS,
                                 do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()

    ref = Reference(logits=logits, generated=gen, dtype=torch.bfloat16)
    for budget in (_slots(model_dir, 0), "50%", "100%"):
        for prefetch in ("none", "next-gate"):
            _exact(model_dir, ref, expert_budget=budget, prefetch=prefetch, io="direct")


def test_the_mxfp4_decoder_gives_transformers_own_values():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from expertcache import mxfp4
    from helpers.checkpoints import quantize_mxfp4

    w = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 96)  # scales far apart
    blocks, scales = quantize_mxfp4(w)
    for dtype in (torch.float32, torch.bfloat16):
        want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
        got = torch.stack([mxfp4.decode(blocks[e], scales[e], dtype).t() for e in range(3)])
        assert torch.equal(got, want)
