"""Prefetch in the simulator: traces carry the predictor's guesses, and an engine-mode replay of
them through the engine's own CacheCore, on a simulated clock (sim/clock.py), loads guesses behind
the previous layer's compute. The timing
rules are checked on hand-made traces whose timelines are worked out on paper; an engine run's
counters are reproduced where timing cannot change them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.checkpoints import prompt_ids

import expertcache
from expertcache.cli import main
from expertcache.sim.hardware import Hardware
from expertcache.sim.measure import _make_resident
from expertcache.sim.recorder import Recorder
from expertcache.sim.simulate import Stream, modeled_token_seconds, modeled_tpot, replay
from expertcache.sim.trace import ModelShape, Route, Trace

EB = 1000  # bytes per expert in the hand-made traces
PROMPT = prompt_ids(10)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("timeline"), "mixtral", num_layers=4, num_experts=8, top_k=2)


def _hw(compute: float) -> Hardware:
    """One expert read takes exactly 1 s (1000 bytes at 1000 B/s, no latency)."""
    return Hardware("paper", "paper", bandwidth_bytes_per_s=1000.0, latency_seconds=0.0, layer_compute_seconds=compute)


def _trace(decode_guess: list[int], layer1_needs: int = 2) -> Trace:
    """2 layers, 4 experts, top-1. Prefill routes expert 0 at both layers; one decode token routes
    expert 1 at layer 0 (guessing `decode_guess` for layer 1) and `layer1_needs` at layer 1."""
    shape = ModelShape("paper", 2, (0, 1), 4, 1, {0: EB, 1: EB})
    w = np.ones((1, 1), np.float32)

    def route(phase, step, layer, e, guesses):
        return Route(0, step, phase, layer, np.array([[e]], np.int32), w, guesses=guesses)

    return Trace(shape, [
        route("prefill", 0, 0, 0, [(1, [0])]),
        route("prefill", 0, 1, 0, []),
        route("decode", 1, 0, 1, [(1, decode_guess)]),
        route("decode", 1, 1, layer1_needs, []),
    ])  # fmt: skip


def _timed(trace: Trace, compute: float):
    stream = Stream(trace)
    hw = _hw(compute)
    r = replay(stream, "lru", 8 * EB, mode="engine", prefetch=True, hardware=hw)  # room for all: no eviction
    return r, modeled_tpot(r, stream, hw)


def test_a_guess_loads_behind_the_demand_read_and_the_compute_of_its_layer():
    # layer 0 at t=0: demand read of (0,1) 0-1 s, then the guess (1,2) 1-2 s; waits 1 s, computes 2 s.
    # layer 1 at t=3: (1,2) arrived at 2 s: a hit, no wait. Token: (1 + 2) + (0 + 2) = 5 s.
    r, tpot = _timed(_trace([2]), compute=2.0)
    assert tpot == pytest.approx(5.0)
    assert (r.decode_hits, r.decode_lookups) == (1, 2)
    # prefill's guess (1,0) lands at once and is used; then the decode guess (1,2)
    assert r.prefetch == {"prefetch_issued": 2, "prefetch_used": 2, "prefetch_late": 0, "prefetch_wasted": 0, "prefetch_cancelled": 0}
    assert r.bytes_read == 4 * EB  # (0,0), (1,0), (0,1), (1,2)
    # the same routing without its guesses: layer 1 misses and waits its own read (overlap 0)
    none, _ = _timed(_trace([]), compute=2.0)
    assert modeled_tpot(none, Stream(_trace([])), _hw(2.0)) == pytest.approx((1 + 2) + (1 + 2))


def test_a_late_guess_is_waited_for_only_for_what_is_left_of_its_read():
    # compute 0.5 s: layer 1 routes at 1.5 s while (1,2) reads 1-2 s: it waits 0.5 s.
    r, tpot = _timed(_trace([2]), compute=0.5)
    assert tpot == pytest.approx((1 + 0.5) + (0.5 + 0.5))
    assert r.prefetch["prefetch_late"] == 1 and r.prefetch["prefetch_used"] == 2  # with prefill's guess


def test_a_wrong_guess_already_read_delays_the_right_one_and_a_queued_one_is_cancelled():
    # guesses (1,3) then (1,2): (1,3) reads 1-2 s, (1,2) 2-3 s; layer 1 routes at 1.5 s: (1,3) has
    # started (wasted, read), (1,2) is promoted and arrives at 3 s: wait 1.5 s.
    r, tpot = _timed(_trace([3, 2]), compute=0.5)
    assert tpot == pytest.approx((1 + 0.5) + (1.5 + 0.5))
    assert (r.prefetch["prefetch_wasted"], r.prefetch["prefetch_cancelled"], r.prefetch["prefetch_late"]) == (1, 0, 1)
    assert r.bytes_read == 5 * EB
    # guesses (1,2) then (1,3): (1,3) is still queued when layer 1 routes: cancelled, never read
    r, tpot = _timed(_trace([2, 3]), compute=0.5)
    assert tpot == pytest.approx((1 + 0.5) + (0.5 + 0.5))
    assert (r.prefetch["prefetch_wasted"], r.prefetch["prefetch_cancelled"]) == (1, 1)
    assert r.bytes_read == 4 * EB


def test_without_guesses_the_timeline_is_the_demand_loading_formula(tiny):
    with expertcache.load(tiny, expert_budget="40%", cache_policy="lfu", prefetch="next-gate") as engine:
        with Recorder(engine) as rec:
            engine.generate(PROMPT, max_new_tokens=12, stop_at_eos=False)
        budget = engine.budget_bytes
    trace = rec.trace
    for r in trace.routes:
        r.guesses = []
    stream = Stream(trace)
    hw = Hardware("t", "t", 2e6, 3e-4, 1e-3)
    timed = replay(stream, "lfu", budget, mode="engine", prefetch=True, hardware=hw)
    plain = replay(stream, "lfu", budget, mode="engine")
    assert (timed.hits, timed.misses, timed.bytes_read) == (plain.hits, plain.misses, plain.bytes_read)
    assert modeled_tpot(timed, stream, hw) == pytest.approx(modeled_tpot(plain, stream, hw, 0.0))
    tokens = modeled_token_seconds(plain, stream, hw)
    assert len(tokens) == stream.decode_tokens == 11 and sum(tokens) / 11 == pytest.approx(modeled_tpot(plain, stream, hw))


def test_recorded_guesses_round_trip_and_replay_the_runs_prefetching(tiny, tmp_path):
    with expertcache.load(tiny, expert_budget="100%", cache_policy="lfu", prefetch="next-gate") as engine:
        with Recorder(engine) as rec:
            engine.generate(PROMPT, max_new_tokens=16, stop_at_eos=False)
        stats, budget = engine.stats(), engine.budget_bytes
    trace = Trace.load(rec.trace.save(tmp_path / "ng.npz"))
    assert [r.guesses for r in trace.routes] == [r.guesses for r in rec.trace.routes]
    assert all(r.guesses == [] for r in trace.routes if r.layer == 3)  # nothing after the last layer
    ahead = {id(r): [g for g in r.guesses if g[0] != r.layer] for r in trace.routes}
    assert all(ahead[id(r)] and ahead[id(r)][0][0] == r.layer + 1 for r in trace.routes if r.layer < 3)
    # the prompt (10 tokens, 8 experts top-2) uses all of layer 0: requested before its call, recorded
    # as a guess for the call's own layer; a decode step requests layer 0's router's top-2 for its
    # token; no other layer gets a guess of its own
    prefill0 = [r for r in trace.routes if r.layer == 0 and r.phase == "prefill"]
    assert prefill0 and all(r.guesses[0] == (0, list(range(8))) for r in prefill0)
    decode0 = [r for r in trace.routes if r.layer == 0 and r.phase == "decode"]
    assert decode0 and all(r.guesses[0][0] == 0 and len(r.guesses[0][1]) == 2 for r in decode0)
    assert all(g[0] != r.layer for r in trace.routes if r.layer != 0 for g in r.guesses)
    instant = Hardware("instant", "every read lands at once", 1e18, 0.0, 1e-3)
    r = replay(trace, "lfu", budget, mode="engine", prefetch=True, hardware=instant)
    assert r.lookups == stats["lookups"]
    assert r.prefetch["prefetch_issued"] > 0
    if stats["prefetch_cancelled"] == 0:  # every expert fits: only a cancelled guess can make a difference
        assert (r.hits, r.misses, r.bytes_read) == (stats["hits"], stats["misses"], stats["bytes_read"])
        for k in ("prefetch_issued", "prefetch_used", "prefetch_wasted"):
            assert r.prefetch[k] == stats[k], k
    # a trace recorded without prefetch has no guesses to replay
    with expertcache.load(tiny, expert_budget="100%", prefetch="none") as engine:
        with Recorder(engine) as rec:
            engine.generate(PROMPT, max_new_tokens=2, stop_at_eos=False)
    assert all(r.guesses is None for r in rec.trace.routes)
    with np.load(rec.trace.save(tmp_path / "none.npz")) as z:
        assert "guesses" not in z.files
    with pytest.raises(expertcache.ExpertCacheError, match="no recorded prefetch guesses"):
        replay(rec.trace, "lfu", budget, mode="engine", prefetch=True, hardware=instant)


def test_cli_simulate_replays_recorded_prefetch(tiny, tmp_path, capsys):
    out = tmp_path / "run.npz"
    ids = ",".join(map(str, PROMPT))
    assert main(["trace", "--model", str(tiny), "--prompt-ids", ids, "--max-new-tokens", "6", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["simulate", "--trace", str(out), "--budget", "40%,100%", "--policy", "lfu,belady", "--mode", "engine",
                 "--prefetch", "trace", "--hardware", "nvme4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefetch"] == "trace" and len(report["results"]) == 4
    for row in report["results"]:
        assert row["prefetch_issued"] > 0 and row["modeled_tpot_seconds"] > 0 and row["modeled_tpot_median_seconds"] > 0
    assert main(["simulate", "--trace", str(out), "--budget", "40%", "--prefetch", "trace"]) == 1
    err = capsys.readouterr().err.strip()
    assert "engine mode only" in err and len(err.splitlines()) == 1


def test_compute_calibration_makes_every_expert_resident_first(tiny):
    with expertcache.load(tiny, expert_budget="100%", prefetch="none") as engine:
        assert _make_resident(engine)
        assert len(engine.cache.resident()) == len(engine.checkpoint.experts)
    with expertcache.load(tiny, expert_budget="50%", prefetch="none") as engine:
        assert not _make_resident(engine)


def test_long_prompts_stream_guesses_through_the_finished_layer_and_replay_exactly(tiny, tmp_path):
    """Prompts one after another at 50 %: each prefill call is a sweep. Guesses then never take the
    slots kept for the next prompt; they load once the layer's own experts are done. Prefetch thus
    reads no more than demand loading plus what its wrong guesses cost, turns most misses into hits, and
    the prefetch replay follows the same rules (to within a load or two of the run's timing)."""
    prompts = [PROMPT[i:] + PROMPT[:i] for i in range(3)]
    runs = {}
    for prefetch in ("none", "next-gate"):
        with expertcache.load(tiny, expert_budget="50%", cache_policy="lfu", prefetch=prefetch) as engine:
            with Recorder(engine) as rec:
                for p in prompts:
                    engine.generate(p, max_new_tokens=1)
            runs[prefetch] = (engine.stats(), rec.trace, engine.budget_bytes, engine.checkpoint.expert_bytes)
    none, (ng, trace, budget, expert_bytes) = runs["none"][0], runs["next-gate"]
    assert ng["prefetch_issued"] > 0 and ng["misses"] < none["misses"] / 2
    # a wrong guess costs its own read and at most the read of the expert it displaced
    assert ng["bytes_read"] <= none["bytes_read"] + 2 * ng["prefetch_wasted"] * expert_bytes
    instant = Hardware("instant", "every read lands at once", 1e18, 0.0, 1e-3)
    r = replay(Trace.load(trace.save(tmp_path / "prompts.npz")), "lfu", budget, mode="engine", prefetch=True, hardware=instant)
    # the run's loads take real time (an entry still loading cannot be evicted) and the replay's
    # none, so a slow read can move a victim: the counters agree to within a couple of loads
    # (exactly, in 12 of 12 runs alone; one suite run under load differed)
    assert r.lookups == ng["lookups"]
    assert abs(r.misses - ng["misses"]) <= 2 and abs(r.prefetch["prefetch_issued"] - ng["prefetch_issued"]) <= 2
