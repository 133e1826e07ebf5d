"""Every cache policy name runs in the engine, Belady included (sim/belady.py): its future comes
from a trace of the same run or from a recording run inside belady.generate(); it never misses more
than any other policy on the same generation, outputs stay exact, and a run that leaves its future stops.
"""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import prompt_ids

import expertcache
from expertcache.checkpoint import Checkpoint
from expertcache.cli import main
from expertcache.policies import POLICIES
from expertcache.sim import belady
from expertcache.sim.recorder import Recorder
from expertcache.sim.simulate import replay
from expertcache.sim.trace import Trace

PROMPT = prompt_ids(12)
TOKENS = 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("belady"), "mixtral", num_layers=4, num_experts=8, top_k=2)


def _generate(model_dir, policy, budget, *, prefetch="none", future_trace=None):
    with expertcache.load(model_dir, expert_budget=budget, cache_policy=policy, prefetch=prefetch) as engine:
        if policy == "belady":
            return belady.generate(engine, PROMPT, future_trace=future_trace, max_new_tokens=TOKENS, stop_at_eos=False)
        return engine.generate(PROMPT, max_new_tokens=TOKENS, stop_at_eos=False)


def _min_budget(model_dir) -> int:
    ckpt = Checkpoint.open(model_dir)
    return ckpt.top_k * ckpt.expert_bytes


@pytest.mark.parametrize("budget", ["min", "30%", "60%"])
def test_belady_misses_no_more_than_any_policy_and_outputs_equal(tiny, budget):
    smallest = budget == "min"  # two slots for a top-2 call: every policy must evict the same way
    budget = _min_budget(tiny) if smallest else budget
    runs = {name: _generate(tiny, name, budget) for name in POLICIES}
    belady = runs["belady"]
    tokens = belady.token_ids
    assert len(tokens) == TOKENS
    for name, out in runs.items():
        assert out.token_ids == tokens, name
        assert out.stats["lookups"] == belady.stats["lookups"], name
        assert belady.stats["misses"] <= out.stats["misses"], name
    if not smallest:  # the bound is not vacuous
        assert belady.stats["misses"] < max(o.stats["misses"] for o in runs.values())
    assert belady.stats["cache_policy"] == "belady"


def test_belady_from_a_trace_equals_the_recording_run_and_the_engine_mode_replay(tiny, tmp_path):
    with expertcache.load(tiny, expert_budget="30%", cache_policy="lru", prefetch="none") as engine:
        with Recorder(engine) as rec:
            engine.generate(PROMPT, max_new_tokens=TOKENS, stop_at_eos=False)
        budget = engine.budget_bytes
    path = rec.trace.save(tmp_path / "lru.npz")
    from_trace = _generate(tiny, "belady", "30%", future_trace=str(path))
    recorded = _generate(tiny, "belady", "30%")
    assert from_trace.token_ids == recorded.token_ids
    assert (from_trace.stats["hits"], from_trace.stats["misses"]) == (recorded.stats["hits"], recorded.stats["misses"])
    r = replay(Trace.load(path), "belady", budget, mode="engine")  # the simulator drives the same policy
    assert (r.hits, r.misses, r.bytes_read) == (from_trace.stats["hits"], from_trace.stats["misses"], from_trace.stats["bytes_read"])


def test_belady_with_prefetch_and_sampling_keeps_the_outputs(tiny):
    kw = dict(max_new_tokens=TOKENS, stop_at_eos=False, greedy=False, temperature=0.9, seed=3)
    with expertcache.load(tiny, expert_budget="40%", cache_policy="lfu", prefetch="next-gate") as engine:
        ref = engine.generate(PROMPT, **kw)
    with expertcache.load(tiny, expert_budget="40%", cache_policy="belady", prefetch="next-gate") as engine:
        out = belady.generate(engine, PROMPT, **kw)
        assert out.token_ids == ref.token_ids
        assert out.stats["prefetch_issued"] > 0 and out.stats["lookups"] == ref.stats["lookups"]
        # a sampled run without a seed draws one seed for both of its runs
        unseeded = belady.generate(engine, PROMPT, max_new_tokens=8, stop_at_eos=False, greedy=False)
        assert len(unseeded.token_ids) == 8


def test_a_callers_recorder_sees_only_the_belady_run(tiny):
    with expertcache.load(tiny, expert_budget="40%", cache_policy="belady", prefetch="next-gate") as engine:
        with Recorder(engine) as rec:
            belady.generate(engine, PROMPT, max_new_tokens=6, stop_at_eos=False)
        observers = (list(engine.runtime.observers), list(engine.runtime.guess_observers))
    assert {r.turn for r in rec.trace.routes} == {0}
    assert len(rec.trace.routes) == 4 * 6  # one prefill and five decode forwards of four layers
    assert all(r.guesses is not None for r in rec.trace.routes)
    assert observers == ([], [])  # every observer taken off again


def test_belady_stops_a_run_that_leaves_its_future(tiny, tmp_path):
    with expertcache.load(tiny, expert_budget="30%", cache_policy="lru", prefetch="none") as engine:
        with Recorder(engine) as rec:
            engine.generate(PROMPT, max_new_tokens=4, stop_at_eos=False)
    path = rec.trace.save(tmp_path / "short.npz")
    with expertcache.load(tiny, expert_budget="30%", cache_policy="belady", prefetch="none") as engine:
        with pytest.raises(expertcache.ExpertCacheError, match="past the end of its future"):
            belady.generate(engine, PROMPT, future_trace=path, max_new_tokens=8, stop_at_eos=False)
        with pytest.raises(expertcache.ExpertCacheError, match="routed other experts than its future"):
            belady.generate(engine, prompt_ids(12, seed=99), future_trace=path, max_new_tokens=4, stop_at_eos=False)


def test_belady_without_a_future_refuses_calls_outside_belady_generate(tiny):
    with expertcache.load(tiny, expert_budget="30%", cache_policy="belady", prefetch="none") as engine:
        with pytest.raises(expertcache.ExpertCacheError, match="needs the future access stream"):
            with torch.inference_mode():
                engine.model(torch.tensor([PROMPT]))


def test_cli_generate_with_every_policy_and_belady_flags(tiny, tmp_path, capsys):
    ids = ",".join(map(str, PROMPT))
    for name in POLICIES:
        assert main(["generate", "--model", str(tiny), "--prompt-ids", ids, "--max-new-tokens", "4", "--cache-policy", name,
                     "--expert-budget", "30%", "--json"]) == 0, name
    capsys.readouterr()
    out = tmp_path / "run.npz"
    assert main(["trace", "--model", str(tiny), "--prompt-ids", ids, "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert main(["generate", "--model", str(tiny), "--prompt-ids", ids, "--max-new-tokens", "4", "--cache-policy", "belady",
                 "--trace", str(out), "--json"]) == 0
    capsys.readouterr()
    for args, message in [
        (["--cache-policy", "lru", "--trace", str(out)], "needs --cache-policy belady"),
        (["--cache-policy", "belady", "--routing", "cache-aware"], "routing that does not read the cache"),
        (["--cache-policy", "belady", "--max-new-tokens", "9", "--trace", str(out)], "past the end"),
    ]:
        argv = ["generate", "--model", str(tiny), "--prompt-ids", ids, "--max-new-tokens", "4", *args]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
