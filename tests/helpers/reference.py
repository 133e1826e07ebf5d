"""What transformers' own model computes for a checkpoint and prompt: the reference of every
equivalence test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import PAD, checkpoint_dtype


@dataclass
class Reference:
    """What transformers' own model computes for one checkpoint and prompt."""

    logits: torch.Tensor  # [T, V] for the prompt
    generated: list[int]  # greedy continuation
    dtype: torch.dtype


def reference_model(model_dir: Path):
    """transformers.AutoModelForCausalLM.from_pretrained(dir), checked to run in the checkpoint's dtype."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    ref.eval()
    want = checkpoint_dtype(model_dir)
    assert ref.dtype == want, f"reference loaded in {ref.dtype}, checkpoint is {want}"
    return ref


@torch.no_grad()
def reference_outputs(model_dir: Path, prompt: list[int], max_new_tokens: int = 32) -> Reference:
    ref = reference_model(model_dir)
    ids = torch.tensor([prompt])
    logits = ref(input_ids=ids).logits[0]
    out = ref.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=PAD,
    )
    generated = out[0, len(prompt) :].tolist()
    assert len(generated) == max_new_tokens
    return Reference(logits=logits, generated=generated, dtype=ref.dtype)
