"""Eviction policies driven through CacheCore on hand-made access streams: exact hit and miss
counts and eviction order for every policy, the global-LRU cliff below one token cycle, and
invariants of the slot accounting under random streams.

The driver below replays a list of batches the way ExpertCache.acquire does: one tick per batch;
each distinct expert of the batch is looked up once, in order (hit -> policy.access; miss ->
make_room + add); the batch's experts stay pinned until the batch is over.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collections import defaultdict

from expertcache.cache import CacheCore, equal_quotas
from expertcache.config import EngineConfig
from expertcache.policies import POLICIES, make_policy
from expertcache.sim.clock import InstantReader
from expertcache.stats import Stats

DEFAULT_CACHE_POLICY = EngineConfig().cache_policy


def core_of(capacity: int, policy, quotas=None, **kw) -> CacheCore:
    """A CacheCore whose loads land at once (the tests below pin and count by hand)."""
    return CacheCore(capacity=capacity, policy=policy, reader=InstantReader(), stats=Stats(),
                     expert_bytes=defaultdict(lambda: 1), quotas=quotas, **kw)

ExpertId = tuple[int, int]


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------
def replay(core: CacheCore, batches: list[list[ExpertId]], evicted: list[ExpertId] | None = None) -> tuple[int, int]:
    """Replay `batches` through `core` as CacheCore.acquire does; returns (hits, misses).
    Evictions are appended to `evicted` in the order they happen."""
    if evicted is not None:
        remove = core.remove

        def recording_remove(eid):
            evicted.append(eid)
            return remove(eid)

        core.remove = recording_remove  # make_room evicts through self.remove
    hits = misses = 0
    for batch in batches:
        core.tick()
        pinned = []
        for eid in dict.fromkeys(batch):  # a repeat inside a batch is looked up once
            ent = core.entries.get(eid)
            if ent is not None:
                hits += 1
                core.policy.access(eid, core.now)
            else:
                misses += 1
                assert core.make_room(eid), f"no room for {eid}: every entry pinned"
                ent = core.add(eid, speculative=False)
                ent.ready = True
            ent.pins += 1
            pinned.append(eid)
        for eid in pinned:
            core.entries[eid].pins -= 1
    return hits, misses


def make_core(name: str, capacity: int, layers: list[int] | None = None, **kw) -> CacheCore:
    policy, partitioned = make_policy(name, **kw)
    quotas = equal_quotas(capacity, layers if layers is not None else [0]) if partitioned else None
    return core_of(capacity, policy, quotas)


def run(name: str, batches, capacity: int, layers: list[int] | None = None, **kw):
    """(hits, misses, evictions) of policy `name` on `batches`."""
    core = make_core(name, capacity, layers, **kw)
    evicted: list[ExpertId] = []
    hits, misses = replay(core, batches, evicted)
    return hits, misses, evicted


def singles(*experts: int, layer: int = 0) -> list[list[ExpertId]]:
    """One batch per expert, all of one layer."""
    return [[(layer, e)] for e in experts]


A, B, C, D, E, F, G = range(7)


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------
def test_unknown_policy_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        make_policy("mru")
    for name in POLICIES:
        assert name in str(err.value)


def test_belady_without_a_future_refuses_any_use():
    from expertcache.errors import ExpertCacheError

    policy, _ = make_policy("belady")
    policy.remove((0, 1))  # evicting (emptying a cache) is fine
    for use in (lambda: policy.insert((0, 1), 0), lambda: policy.access((0, 1), 0), lambda: policy.victim(lambda e: True, 0)):
        with pytest.raises(ExpertCacheError, match="future"):
            use()


def test_partitioned_flag_of_each_policy():
    assert {n for n, (_, part) in POLICIES.items() if part} == {"layer", "layerlfu"}
    assert DEFAULT_CACHE_POLICY in POLICIES


def test_equal_quotas_give_the_remainder_to_earlier_layers():
    assert equal_quotas(7, [0, 1, 2, 3]) == {0: 2, 1: 2, 2: 2, 3: 1}
    assert equal_quotas(8, [3, 5]) == {3: 4, 5: 4}
    assert sum(equal_quotas(13, list(range(5))).values()) == 13


# --------------------------------------------------------------------------------------------------
# exact counts and eviction order
# --------------------------------------------------------------------------------------------------
def test_lru_evicts_the_least_recently_touched():
    # A B C | A hit -> order B C A | D evicts B | B evicts C | E evicts A | A evicts D
    hits, misses, evicted = run("lru", singles(A, B, C, A, D, B, E, A), capacity=3)
    assert (hits, misses) == (1, 7)
    assert evicted == [(0, B), (0, C), (0, A), (0, D)]


def test_a_pinned_expert_is_never_the_victim():
    # LFU, capacity 2: A has 3 touches, B 1. Batch [C, D]: C evicts B; then D's best victim by
    # count is C (1 touch) but C is pinned by the running batch, so A (3 touches) goes
    hits, misses, evicted = run("lfu", singles(A, A, A, B) + [[(0, C), (0, D)]], capacity=2)
    assert (hits, misses) == (2, 4)
    assert evicted == [(0, B), (0, A)]


def test_a_repeat_inside_a_batch_is_one_lookup():
    hits, misses, _ = run("lru", [[(0, A), (0, A), (0, B), (0, A)]], capacity=2)
    assert (hits, misses) == (0, 2)


def test_lfu_evicts_the_fewest_touches_ties_to_the_oldest():
    # A A B C: counts A2 B1 C1 -> D evicts B (tie at 1, B touched before C)
    # C hit (C2) -> E: A2 C2 D1 -> evicts D;  B comes back (2 touches in all): A2 C2 E1 -> evicts E
    # A hit (A3) -> F: A3 C2 B2 -> tie at 2, C touched before B -> evicts C;  G: A3 B2 F1 -> evicts F
    seq = singles(A, A, B, C, D, C, E, B, A, F, G)
    hits, misses, evicted = run("lfu", seq, capacity=3)
    assert (hits, misses) == (3, 8)
    assert evicted == [(0, B), (0, D), (0, E), (0, C), (0, F)]


def test_lfu_ties_among_equal_counts_above_one_go_to_the_oldest_touch():
    # A A B B C C: all count 2; the oldest touch is A -> D evicts A
    hits, misses, evicted = run("lfu", singles(A, A, B, B, C, C, D), capacity=3)
    assert (hits, misses) == (3, 4)
    assert evicted == [(0, A)]


def test_lfu_counts_survive_eviction():
    # A twice, B three times: C evicts A (2 < 3); A comes back with 3 touches and evicts C (1);
    # D then meets A3 and B3: the tie goes to B, touched longest ago (a count restarted at
    # insert would have evicted A instead)
    hits, misses, evicted = run("lfu", singles(A, A, B, B, B, C, A, D), capacity=2)
    assert (hits, misses) == (3, 5)
    assert evicted == [(0, A), (0, C), (0, B)]


def test_lfru_keeps_a_frequent_expert_that_lru_drops():
    # A is touched four times, then B and C once each: LRU evicts A for C, LFRU evicts B
    seq = singles(A, A, A, A, B, C, A)
    assert run("lru", seq, capacity=2) == (3, 4, [(0, A), (0, B)])
    assert run("lfru", seq, capacity=2) == (4, 3, [(0, B)])


def test_lfru_half_life_lets_stale_frequency_age_out():
    # A touched 4 times early, then 5 idle batches, then B, then C: with a long half-life A's
    # score (~4) still beats B's (1) and B goes; with half_life=1 A decayed to ~0.03 and goes.
    seq = singles(A, A, A, A) + [[]] * 5 + singles(B, C)
    assert run("lfru", seq, capacity=2, half_life=64.0)[2] == [(0, B)]
    assert run("lfru", seq, capacity=2, half_life=1.0)[2] == [(0, A)]


def test_layer_partition_evicts_inside_the_layer_at_its_share():
    # capacity 4, layers 0 and 1 own 2 slots each
    seq = [[(1, A)], [(0, A)], [(0, B)], [(0, C)], [(1, B)], [(1, C)]]
    # (0, C): layer 0 holds its 2 -> evicts its own LRU (0, A) though a slot is still free
    # (1, B) takes the free slot; (1, C): layer 1 at its share -> evicts (1, A), not layer 0's
    assert run("layer", seq, capacity=4, layers=[0, 1]) == (0, 6, [(0, A), (1, A)])
    # a global LRU on the same stream: no eviction until full, then the globally oldest
    assert run("lru", seq, capacity=4) == (0, 6, [(1, A), (0, A)])


def test_layer_partition_never_evicts_another_layer_within_its_share():
    # layer 1's entries are the oldest, but layer 0 at its share only evicts its own
    seq = [[(1, A), (1, B)], [(0, A), (0, B)], [(0, C)], [(0, D)], [(1, A), (1, B)]]
    hits, misses, evicted = run("layer", seq, capacity=4, layers=[0, 1])
    assert (hits, misses) == (2, 6)
    assert evicted == [(0, A), (0, B)]
    assert run("lru", seq, capacity=4)[:2] == (0, 8)  # global LRU throws layer 1 out instead


def test_a_layer_over_its_share_gives_its_borrowed_slot_back_first():
    # capacity 4 over 4 layers: a share of 1 each. Layer 0's top-2 batch borrows a slot; when the
    # cache is full, the next miss of a layer within its share evicts from layer 0 (over its
    # share), though layer 1's entry is the globally least recent
    seq = [[(0, A), (0, B)], [(1, A)], [(2, A)], [(0, B), (0, A)], [(3, A)]]
    assert run("layer", seq, capacity=4, layers=[0, 1, 2, 3]) == (2, 5, [(0, B)])
    assert run("lru", seq, capacity=4) == (2, 5, [(1, A)])


def test_layerlfu_orders_a_layer_by_frequency():
    # layer 0 at its share (2 of 4) when (0, C) arrives: layerlfu evicts (0, B) (1 touch) while
    # layer (LRU inside the layer) evicts (0, A) (touched before B); global policies evict nothing
    seq = [[(1, A)], [(0, A)], [(0, A)], [(0, B)], [(0, C)]]
    assert run("layerlfu", seq, capacity=4, layers=[0, 1]) == (1, 4, [(0, B)])
    assert run("layer", seq, capacity=4, layers=[0, 1]) == (1, 4, [(0, A)])
    assert run("lfu", seq, capacity=4) == (1, 4, [])


def test_belady_evicts_the_furthest_next_use():
    # A B C A B C A, capacity 2: LRU misses all 7; Belady keeps the sooner-needed one each time:
    # C evicts B (A next at 3, B at 4); B evicts A (A next at 6, C at 5); A: neither B nor C is used
    # again -> the first of them (C)
    seq = singles(A, B, C, A, B, C, A)
    assert run("lru", seq, capacity=2)[:2] == (0, 7)
    hits, misses, evicted = run("belady", seq, capacity=2, future=seq)
    assert (hits, misses) == (2, 5)
    assert evicted == [(0, B), (0, A), (0, C)]


def test_belady_never_evicts_what_the_running_batch_still_needs():
    # batch [D, A]: D misses while A (resident, not yet looked up) is needed by this very batch;
    # B and C are never used again -> B goes, and A is a hit
    seq = [[(0, A), (0, B)], [(0, C)], [(0, D), (0, A)]]
    assert run("belady", seq, capacity=3, future=seq) == (1, 4, [(0, B)])


def test_belady_next_use_is_indexed_by_batch_from_zero():
    # the future's batch 2 is the third batch replayed: B, touched in batch 1, is needed again in
    # batch 2, where C misses first: C must evict A (next use 3), not B (next use 2)
    seq = [[(0, A)], [(0, B)], [(0, C), (0, B)], [(0, A)]]
    assert run("belady", seq, capacity=2, future=seq) == (1, 4, [(0, A), (0, B)])


def test_belady_next_use_counts_the_very_next_batch():
    # A B C A B, capacity 2: C evicts B, because A is needed by the very next batch and B only by
    # the one after; then B evicts A (neither A nor C is used again: the first of them goes)
    seq = singles(A, B, C, A, B)
    assert run("belady", seq, capacity=2, future=seq) == (1, 4, [(0, B), (0, A)])


def test_random_is_reproducible_for_a_seed_and_varies_across_seeds():
    rng = random.Random(7)
    seq = [[(rng.randrange(2), rng.randrange(6))] for _ in range(200)]
    first = run("random", seq, capacity=4, seed=3)
    assert run("random", seq, capacity=4, seed=3) == first
    assert 0 < first[0] < len(seq)
    others = {tuple(run("random", seq, capacity=4, seed=s)[2]) for s in range(4, 8)}
    assert len(others | {tuple(first[2])}) > 1, "eviction order does not depend on the seed"


def test_random_never_evicts_a_pinned_expert():
    # each batch of 3 new experts leaves one unpinned entry in a 4-slot cache: whatever the seed,
    # the whole batch is resident when it ends
    seq = [[(0, e) for e in range(i, i + 3)] for i in range(0, 30, 3)]
    for seed in range(5):
        core = make_core("random", 4, seed=seed)
        for batch in seq:
            assert replay(core, [batch]) == (0, 3)
            assert all(eid in core.entries for eid in batch)


# --------------------------------------------------------------------------------------------------
# the cliff (REFERENCES.md: a global LRU gets 0% hits below one token cycle)
# --------------------------------------------------------------------------------------------------
L, K, N_EXPERTS, TOKENS = 4, 2, 8, 50
WARMUP = 5  # tokens after which every hot expert has more touches than any cold one (seeded stream)


def token_cycles(*, hot_only: bool, tokens: int = TOKENS, seed: int = 0):
    """Decode-like stream: each token runs layers 0..L-1 in order, each layer looks up K experts.

    hot_only=True: a layer uses the same K experts every token (its set repeats exactly).
    hot_only=False: a layer's first expert (its hot one) is used by every token, the other K-1
    are drawn at random among the layer's other experts (skewed, as real routing is).
    The hot expert is looked up first, so every expert keeps its place in its layer's batch."""
    rng = random.Random(seed)
    sets = [rng.sample(range(N_EXPERTS), K) for _ in range(L)]
    stream = []
    for _ in range(tokens):
        for layer in range(L):
            hot = sets[layer][0]
            rest = sets[layer][1:] if hot_only else rng.sample([e for e in range(N_EXPERTS) if e != hot], K - 1)
            stream.append([(layer, e) for e in [hot, *rest]])
    return stream


@pytest.mark.parametrize("hot_only", [True, False], ids=["repeating", "skewed"])
@pytest.mark.parametrize("capacity", range(K, L * K))
def test_global_lru_collapses_below_one_token_cycle(capacity, hot_only):
    """Between two uses of an expert every other layer runs: at least L*K - 1 other experts are
    touched, so with fewer than L*K slots LRU has always just evicted the one needed next."""
    hits, misses, _ = run("lru", token_cycles(hot_only=hot_only), capacity=capacity)
    assert hits == 0
    assert misses == L * K * TOKENS


def test_global_lru_holds_everything_at_one_token_cycle():
    hits, misses, evicted = run("lru", token_cycles(hot_only=True), capacity=L * K)
    assert (hits, misses, evicted) == (L * K * (TOKENS - 1), L * K, [])


def test_default_policy_avoids_the_cliff():
    """Skewed stream at capacity (L-1)*K = 6 < L*K = 8, where LRU gets 0 hits whatever the order
    of lookups. Every token touches each layer's hot expert and one cold one (1 in 7 of the
    others). After WARMUP tokens each hot expert has more touches than any cold expert, and
    C - L = 2 slots are left for K - 1 = 1 cold miss per batch, so a cold, unpinned entry is
    always there to evict: the L hot experts stay resident and hit on every later token.
    Lower bound: L * (TOKENS - WARMUP) hits of L*K*TOKENS lookups = 180/400 = 45%."""
    capacity = (L - 1) * K
    stream = token_cycles(hot_only=False)
    core = make_core(DEFAULT_CACHE_POLICY, capacity, list(range(L)))
    hits = misses = 0
    for i, batch in enumerate(stream):
        if i >= WARMUP * L:
            assert batch[0] in core.entries, f"{DEFAULT_CACHE_POLICY} evicted hot expert {batch[0]} (batch {i})"
        h, m = replay(core, [batch])
        hits, misses = hits + h, misses + m
    assert hits + misses == L * K * TOKENS
    assert hits >= L * (TOKENS - WARMUP), f"{DEFAULT_CACHE_POLICY}: {hits} hits of {hits + misses}"
    assert run("lru", stream, capacity=capacity)[0] == 0  # the same stream and budget


def test_layer_partition_avoids_the_cliff_on_a_repeating_cycle():
    """At capacity L*K - 1 the equal partition gives layers 0..L-2 their whole working set (K
    slots) and the last layer K-1. The last layer borrows one slot per token from another layer,
    which costs that layer at most one miss when it runs next (it takes the slot back from the
    layer over its share). So every token after the first hits at least (L-1)*K - 1 of its L*K
    lookups: 5 of 8 here."""
    bound = ((L - 1) * K - 1) * (TOKENS - 1)
    for name in ("layer", "layerlfu"):
        hits, misses, _ = run(name, token_cycles(hot_only=True), capacity=L * K - 1, layers=list(range(L)))
        assert hits + misses == L * K * TOKENS
        assert hits >= bound, (name, hits, bound)


@pytest.mark.parametrize("name", ["lfu", "lfru"])
def test_global_frequency_policies_do_not_escape_a_repeating_cycle(name):
    """Documented limit: when every expert is touched equally often, frequency ties everywhere
    and the tie-break (oldest touch / most decayed score) is LRU's order: the same collapse.
    Only a partition (or the offline optimum) avoids it there."""
    assert run(name, token_cycles(hot_only=True), capacity=L * K - 1)[0] == 0


def test_lfru_falls_off_the_cliff_even_on_a_skewed_stream():
    """lfru forgets an expert's score when it is evicted, so on a stream that never hits it never
    learns which experts are hot: 0 hits, where lfu (counts kept across evictions) gets ~50%."""
    stream = token_cycles(hot_only=False)
    assert run("lfru", stream, capacity=(L - 1) * K)[0] == 0
    assert run("lfu", stream, capacity=(L - 1) * K)[0] >= L * (TOKENS - WARMUP)


@pytest.mark.parametrize("hot_only", [True, False], ids=["repeating", "skewed"])
def test_belady_bounds_every_policy_below_the_cliff(hot_only):
    stream = token_cycles(hot_only=hot_only)
    best = run("belady", stream, capacity=L * K - 1, future=stream)[0]
    for name in ("lru", "lfu", "lfru", "random", "layer", "layerlfu"):
        assert best >= run(name, stream, capacity=L * K - 1, layers=list(range(L)))[0], name
    # it keeps C - K = 5 experts for good and churns the rest through K slots
    assert best >= (L * K - 1 - K) * (TOKENS - 1)


# --------------------------------------------------------------------------------------------------
# invariants under random streams
# --------------------------------------------------------------------------------------------------
def check_core(core: CacheCore) -> None:
    slots = [e.slot for e in core.entries.values()]
    assert len(slots) == len(set(slots)), "two entries share a slot"
    assert sorted(slots + core.free) == list(range(core.capacity)), "a slot leaked or doubled"
    for layer, n in core.per_layer.items():
        assert n == sum(1 for e in core.entries if e[0] == layer)
    assert all(e.pins == 0 for e in core.entries.values())


batch_streams = st.lists(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5)), min_size=1, max_size=2), min_size=1, max_size=40
)


@settings(max_examples=40, deadline=None)
@given(stream=batch_streams, capacity=st.integers(2, 10), name=st.sampled_from(sorted(POLICIES)))
def test_accounting_holds_for_every_policy(stream, capacity, name):
    core = make_core(name, capacity, [0, 1, 2], future=stream, seed=1)
    hits, misses = replay(core, stream)
    assert hits + misses == sum(len(set(b)) for b in stream)
    assert len(core.entries) <= capacity
    check_core(core)


@settings(max_examples=40, deadline=None)
@given(stream=batch_streams, capacity=st.integers(6, 12), name=st.sampled_from(["layer", "layerlfu"]))
def test_partitioned_layers_stay_within_their_share(stream, capacity, name):
    # every batch needs at most 2 slots of one layer and every share is >= 2: no layer ever
    # borrows, so none ever holds more than its share
    stream = [[(b[0][0], e) for _, e in b] for b in stream]  # one layer per batch, like a layer call
    core = make_core(name, capacity, [0, 1, 2])
    for batch in stream:
        replay(core, [batch])
        for layer, n in core.per_layer.items():
            assert n <= core.quotas[layer], (layer, n, core.quotas)
    check_core(core)


@settings(max_examples=60, deadline=None)
@given(
    stream=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4)), min_size=1, max_size=40),
    capacity=st.integers(1, 6),
)
def test_belady_is_optimal_on_single_expert_batches(stream, capacity):
    batches = [[eid] for eid in stream]
    best = run("belady", batches, capacity=capacity, future=batches)[0]
    for name in ("lru", "lfu", "lfru", "random"):
        assert best >= run(name, batches, capacity=capacity, seed=2)[0], name


# --------------------------------------------------------------------------------------------------
# sweeps: calls that need most of their layer (long prompts)
# --------------------------------------------------------------------------------------------------
def sweep_passes(core: CacheCore, layers: list[int], experts: int, passes: int, order=None) -> list[int]:
    """Hits per forward pass of calls that each need every expert of their layer, acquired as the
    engine does (route, then pin one by one in `order`, evicting as needed)."""
    hits_per_pass = []
    for _ in range(passes):
        hits = 0
        for layer in layers:
            needed = list(order or range(experts))
            core.route(layer, needed)
            core.tick()
            for e in needed:
                ent = core.entries.get((layer, e))
                if ent is not None:
                    hits += 1
                    core.policy.access((layer, e), core.now)
                else:
                    assert core.make_room((layer, e)), "every entry pinned"
                    ent = core.add((layer, e), speculative=False)
                    ent.ready = True
                ent.pins += 1
            for e in needed:
                core.entries[(layer, e)].pins -= 1
        hits_per_pass.append(hits)
    return hits_per_pass


@pytest.mark.parametrize("name", ["lru", "lfu", "lfru", "random"])
def test_a_sweep_evicts_in_forward_order_so_the_next_prompt_hits(name):
    """Three layers of four experts, eight slots, every call needs its whole layer. An LRU or LFU
    alone evicts the layer the next pass needs first and never hits; in forward order (the running
    layer's unneeded experts, then the layer before it, ..., wrapping round to the one after it)
    every policy gets exactly what Belady gets on this stream."""
    layers = [0, 1, 2]
    future = [[(l, e) for e in range(4)] for _ in range(4) for l in layers]
    belady = core_of(8, make_policy("belady", future=future)[0], None, layers=layers, experts_per_layer=4)
    best = sweep_passes(belady, layers, 4, 4)  # the rule leaves Belady alone
    assert best == [0, 8, 4, 8]
    swept = core_of(8, make_policy(name, seed=1)[0], None, layers=layers, experts_per_layer=4)
    assert sweep_passes(swept, layers, 4, 4) == best
    check_core(swept)
    if name in ("lru", "lfu"):
        plain = core_of(8, make_policy(name)[0], None)  # no layer order given: the policy alone
        assert sweep_passes(plain, layers, 4, 4) == [0, 0, 0, 0]


def test_a_sweep_never_evicts_an_expert_its_own_call_still_needs():
    """The call pins its experts one by one: resident ones it reaches later must not be taken for
    the earlier misses (the running layer's experts come first in the sweep order otherwise)."""
    layers = [0, 1]
    core = core_of(6, make_policy("lru")[0], None, layers=layers, experts_per_layer=4)
    sweep_passes(core, layers, 4, 1)  # layer 0 then layer 1: two of layer 0 stay
    kept = sorted(e for l, e in core.entries if l == 0)
    assert len(kept) == 2
    order = [e for e in range(4) if e not in kept] + kept  # misses first, the resident ones last
    assert sweep_passes(core, [0], 4, 1, order=order) == [2]


def test_small_calls_are_no_sweep():
    core = core_of(8, make_policy("lfu")[0], None, layers=[0, 1], experts_per_layer=8)
    core.route(1, [3, 5])  # a decode step: top-2 of 8
    assert core.sweep is None
    core.route(1, [0, 1, 2, 3])  # half the layer
    assert core.sweep == 1
    core.route(0, [4])
    assert core.sweep is None
    part = core_of(8, make_policy("layer")[0], equal_quotas(8, [0, 1]), layers=[0, 1], experts_per_layer=8)
    part.route(0, range(8))
    assert part.sweep is None  # partitioned policies keep their shares
