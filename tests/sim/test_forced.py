"""Forced routing (sim/forced.py): a model's layers pick what a recorded trace picked, mapped onto
the model's shape by the documented rule, token by token across forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertcache.routing import WeightRule
from expertcache.sim.forced import TraceRouting
from expertcache.sim.trace import ModelShape, Route, Trace

RULE = WeightRule(renormalize=True, in_logits_dtype=False)


def _trace() -> Trace:
    """4 trace layers, 8 experts, top-2; two decode tokens and a prefill call (ignored)."""
    shape = ModelShape("t", 4, (0, 1, 2, 3), 8, 2, {l: 1 for l in range(4)})
    picks = {0: {0: [7, 6], 1: [0, 1], 2: [2, 5], 3: [4, 3]},  # token 0: trace layer -> experts
             1: {0: [1, 3], 1: [6, 7], 2: [0, 0], 3: [5, 2]}}
    routes = [Route(0, 0, "prefill", 0, np.array([[1, 2], [3, 4]], dtype=np.int32), np.ones((2, 2), np.float32))]
    for step, layers in picks.items():
        for layer, ids in layers.items():
            routes.append(Route(0, step + 2, "decode", layer, np.array([ids], dtype=np.int32), np.ones((1, 2), np.float32)))
    return Trace(shape, routes)


def test_layers_experts_and_free_slots_are_mapped_as_documented():
    """Model: 2 sparse layers (5, 9) of 4 experts, top-3. Layer 5 <- trace layer 0, 9 <- trace layer 2;
    expert e -> e * 4 // 8 (pairs merge); the third slot (and merged ones) take the model's best."""
    r = TraceRouting(_trace(), layers=[5, 9], num_experts=4, top_k=3, rule=RULE)
    logits = torch.tensor([[0.1, 0.4, 0.3, 0.2]])  # the model's own order: 1, 2, 3, 0
    w, ids = r.select(5, logits, torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long))
    assert ids.tolist() == [[3, 1, 2]]  # trace 7, 6 -> 3, 3 (merged) ; then the model's 1, 2
    torch.testing.assert_close(w, RULE.mix(logits, ids))
    w, ids = r.select(9, logits, torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long))
    assert ids.tolist() == [[1, 2, 3]]  # trace layer 2 picked 2, 5 -> 1, 2; then the model's best left: 3
    # the next forward takes the next trace token
    _, ids = r.select(5, logits, torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long))
    assert ids.tolist() == [[0, 1, 2]]  # trace 1, 3 -> 0, 1; then 2


def test_a_forward_of_several_rows_takes_consecutive_tokens_and_cycles():
    r = TraceRouting(_trace(), layers=[0, 1], num_experts=8, top_k=2, rule=RULE)
    logits = torch.zeros(3, 8)
    _, ids = r.select(0, logits, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long))
    assert ids.tolist() == [[7, 6], [1, 3], [7, 6]]  # tokens 0, 1, then back to 0
    _, ids = r.select(1, logits, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long))
    assert ids.tolist() == [[2, 5], [0, 1], [2, 5]]  # trace layer 2 for model layer 1 of 2 (of 4)


def test_a_trace_without_decode_tokens_is_refused():
    t = _trace()
    t.routes = [r for r in t.routes if not r.decode]
    with pytest.raises(ValueError, match="no decode tokens"):
        TraceRouting(t, layers=[0], num_experts=8, top_k=2, rule=RULE)
