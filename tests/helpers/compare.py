"""One engine run against transformers' reference: prompt logits, 32 greedy tokens, the cache's
invariants and the waves of the minimum budget (the equivalence tests' core)."""

from __future__ import annotations

import math

import torch

import expertcache
from expertcache.checkpoint import Checkpoint

from .checkpoints import prompt_ids
from .invariants import LoadRecorder, check_engine_invariants, check_io_mode, min_budget

PROMPT = prompt_ids(40)  # long enough that, at the minimum budget, every layer computes in waves
NEW_TOKENS = 32


def run_and_compare(model_dir, ref, *, budget, prefetch, io, direct_io_works, cache_policy=None, atol=None):
    """Load the engine, compare prompt logits and 32 greedy tokens with the reference, check the
    cache's invariants and that the minimum budget made the prefill compute in waves. `atol`: an
    absolute tolerance for the logits (kernels that round otherwise than the reference)."""
    if budget.startswith("min"):  # "min" or "min+N": one layer's top-k experts, plus N more slots
        extra = int(budget[4:] or 0)
        expert_budget = min_budget(model_dir) + extra * Checkpoint.open(model_dir).expert_bytes
    else:
        expert_budget = budget
    kwargs = {} if cache_policy is None else {"cache_policy": cache_policy}
    with expertcache.load(model_dir, expert_budget=expert_budget, prefetch=prefetch, io=io, **kwargs) as eng:
        ck = eng.checkpoint
        assert eng.model.dtype == ref.dtype
        if budget == "min":
            assert eng.cache.capacity == ck.top_k
        elif budget == "100%":
            assert eng.cache.capacity == len(ck.experts)
        recorder = LoadRecorder(eng)
        calls: list[tuple[int, int]] = []  # (layer, distinct experts) per layer call
        waves: list[int] = []  # experts acquired per wave
        acquire = eng.cache.core.acquire

        def counting_acquire(layer, experts):
            experts = list(experts)
            waves.append(len(experts))
            return acquire(layer, experts)

        eng.cache.core.acquire = counting_acquire

        with torch.no_grad(), eng.observe(lambda layer, x, logits, w, ids: calls.append((layer, len(torch.unique(ids))))):
            logits = eng.model(input_ids=torch.tensor([PROMPT])).logits[0]
        # dtype-aware defaults: fp32 1.3e-6 / bf16 1.6e-2 rel
        torch.testing.assert_close(logits, ref.logits, **({} if atol is None else dict(atol=atol, rtol=1.6e-2)))
        cap = eng.cache.capacity
        assert len(calls) == len(ck.sparse_layers)
        assert all(n <= cap for n in waves), "a wave pinned more experts than the cache has slots"
        assert len(waves) == sum(math.ceil(n / cap) for _, n in calls)
        if budget == "min":
            assert max(n for _, n in calls) > cap, "the prefill never needed more experts than fit: no waves"
            assert len(waves) > len(calls)

        result = eng.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
        assert result.token_ids == ref.generated

        check_engine_invariants(eng, recorder)
        check_io_mode(eng, io, direct_io_works)
        return eng.stats()
