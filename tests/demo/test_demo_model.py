"""The bundled demo model: its files load offline in plain transformers and in expertcache, give
equal logits, and generate text."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import expertcache
from expertcache.engine import DEMO_DIR

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").is_file(), reason="demo model not bundled")


def test_bundled_files_and_shape():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "MODEL_CARD.md"):
        assert (DEMO_DIR / name).is_file(), name
    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] >= 8 and cfg["num_experts_per_tok"] >= 2
    assert (DEMO_DIR / "model.safetensors").stat().st_size <= 60e6
    from expertcache.tools.info import model_info

    info = model_info(None)
    assert info["total_expert_bytes"] >= 0.75 * (info["total_expert_bytes"] + info["dense_bytes"])


def test_transformers_and_expertcache_logits_are_equal():
    tok = AutoTokenizer.from_pretrained(DEMO_DIR, local_files_only=True)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("Once upon a time, there was a little cat who")])
    ref = AutoModelForCausalLM.from_pretrained(DEMO_DIR, local_files_only=True)
    assert ref.dtype == torch.bfloat16
    with torch.no_grad():
        want = ref(ids).logits
    with expertcache.load(None, expert_budget="25%") as eng, torch.no_grad():
        got = eng.model(ids).logits
        assert eng.stats()["misses"] > 0
    torch.testing.assert_close(got, want)


def test_demo_generates_offline():
    with expertcache.load() as eng:
        out = eng.generate("Once upon a time", max_new_tokens=8)
    assert len(out.token_ids) >= 1 and isinstance(out.text, str) and out.text.strip()
    assert out.stats["budget_bytes"] == pytest.approx(0.5 * eng.checkpoint.total_expert_bytes, abs=1)
