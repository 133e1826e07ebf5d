"""The cache (ExpertCache over CacheCore) on a real tiny Mixtral checkpoint: the budget check, slot contents equal to the
checkpoint's tensors, occupancy (resident + in flight) within the capacity while loads are held,
speculative loads that never evict what the running layer pins or what the request wants,
wrong guesses evicted first, preempt's cancellation of unneeded guesses, late prefetches promoted.

Loads are held in flight by a Gate around the store's read_chunk (reads block until the test
lets them through), with one I/O thread so the order of reads is deterministic.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from expertcache.cache import ExpertCache
from expertcache.checkpoint import Checkpoint
from expertcache.errors import BudgetError, ExpertLoadError
from expertcache.ids import CANCELLED, DEMAND, DONE, PREFETCH
from expertcache.policies import make_policy
from expertcache.stats import Stats
from expertcache.store import ExpertStore
from helpers.gates import ReadGate as Gate

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    )
    out = tmp_path_factory.mktemp("mixtral")
    MixtralForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ckpt(model_dir) -> Checkpoint:
    return Checkpoint.open(model_dir)


@pytest.fixture(scope="module")
def tensors(model_dir) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
    """(gate, up, down) = (w1, w3, w2) of every expert, as safetensors loads them."""
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    pre = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"
    return {(l, e): tuple(sd[pre.format(l, e, w)] for w in ("w1", "w3", "w2")) for l in range(2) for e in range(8)}


class Rig:
    """An ExpertCache of `slots` experts over the tiny checkpoint, with a gate and a chunk log."""

    def __init__(self, ckpt: Checkpoint, slots: int, *, policy: str = "lru", io: str = "buffered", threads: int = 1):
        self.store = ExpertStore(ckpt.experts, io=io)
        self.gate = Gate(self.store)
        pol, partitioned = make_policy(policy)
        self.stats = Stats()
        self.cache = ExpertCache(
            store=self.store, budget_bytes=slots * ckpt.expert_bytes, expert_bytes=ckpt.expert_bytes,
            top_k=ckpt.top_k, policy=pol, partitioned=partitioned, layers=ckpt.sparse_layers,
            io_threads=threads, stats=self.stats,
        )
        self.log: list[tuple[tuple[int, int], int]] = []
        self.violations: list[str] = []
        self.cache.loader.on_chunk = self._on_chunk

    def _on_chunk(self, task, i):  # on the I/O thread: the slot being written must be the task's own
        self.log.append((task.eid, i))
        ent = self.cache.core.entries.get(task.eid)
        if ent is None or ent.slot != task.slot or ent.load is not task:
            self.violations.append(f"{task.eid} chunk {i} read into slot {task.slot} it does not own")
        if len(self.cache.core.entries) > self.cache.capacity:
            self.violations.append(f"{len(self.cache.core.entries)} entries > {self.cache.capacity} slots")

    def entries(self) -> set[tuple[int, int]]:
        return set(self.cache.core.entries)

    def task(self, eid):
        return self.cache.core.entries[eid].load

    def drain(self) -> None:
        self.gate.open()
        for ent in list(self.cache.core.entries.values()):
            assert ent.load.event.wait(TIMEOUT), "a load never finished"

    def check(self) -> None:
        core = self.cache.core
        assert not self.violations, self.violations
        assert len(core.entries) <= self.cache.capacity
        slots = [e.slot for e in core.entries.values()]
        assert sorted(slots + core.free) == list(range(self.cache.capacity)), "a slot leaked or is shared"
        assert self.cache.core.max_occupancy <= self.cache.capacity

    def close(self) -> None:
        self.gate.open()
        self.cache.close()


@pytest.fixture
def rig(ckpt):
    made = []

    def make(slots: int, **kw) -> Rig:
        r = Rig(ckpt, slots, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def use(cache: ExpertCache, layer: int, experts) -> None:
    """One layer call as the experts implementation makes it: stream() writes off the layer's
    unneeded guesses (which also settles loads that finished unobserved, so they can be evicted),
    pins the experts, waits for each and releases them."""
    for _ in cache.stream(layer, sorted(experts)):
        pass


def assert_weights(cache: ExpertCache, eid, tensors) -> None:
    for got, want in zip(cache.weights(eid), tensors[eid], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# budget
# --------------------------------------------------------------------------------------------------
def test_a_budget_below_top_k_experts_is_refused_with_the_minimum(ckpt):
    minimum = ckpt.top_k * ckpt.expert_bytes
    assert minimum == 2 * 3 * 16 * 32 * 4
    store = ExpertStore(ckpt.experts, io="buffered")
    kw = dict(store=store, expert_bytes=ckpt.expert_bytes, top_k=ckpt.top_k, partitioned=False,
              layers=ckpt.sparse_layers, io_threads=1, stats=Stats())
    with pytest.raises(BudgetError) as err:
        ExpertCache(budget_bytes=minimum - 1, policy=make_policy("lru")[0], **kw)
    assert str(minimum) in str(err.value)
    assert "one layer's top-2" in str(err.value)
    cache = ExpertCache(budget_bytes=minimum, policy=make_policy("lru")[0], **kw)
    assert cache.capacity == 2
    cache.loader.close()
    big = ExpertCache(budget_bytes=100 * minimum, policy=make_policy("lru")[0], **kw)
    assert big.capacity == 16  # never more slots than the model has experts
    big.close()


# --------------------------------------------------------------------------------------------------
# contents
# --------------------------------------------------------------------------------------------------
def test_weights_read_into_slots_equal_the_checkpoint(rig, tensors):
    r = rig(2, io="direct")  # the smallest budget: every pair reuses both slots
    r.gate.open()
    cache = r.cache
    for layer in (0, 1):
        for pair in ((0, 1), (2, 3), (4, 5), (6, 7)):
            wave = cache.core.acquire(layer, pair)
            for eid in wave:
                assert_weights(cache, eid, tensors)
                assert cache.core.ready(eid)
            cache.core.release(wave)
    assert (r.stats.hits, r.stats.misses) == (0, 16)
    wave = cache.core.acquire(1, [7, 6])
    assert (r.stats.hits, r.stats.misses) == (2, 16)
    for eid in wave:
        assert_weights(cache, eid, tensors)
    cache.core.release(wave)
    assert cache.loader.bytes_read == 16 * cache.core.expert_bytes[0]
    r.check()


def test_a_read_error_reaches_weights_and_frees_the_slot(rig, tensors):
    r = rig(2)
    r.gate.fail[(0, 3)] = ExpertLoadError("bad sector")
    r.gate.open()
    cache = r.cache
    wave = cache.core.acquire(0, [3, 4])
    with pytest.raises(ExpertLoadError, match="bad sector"):
        cache.weights((0, 3))
    assert_weights(cache, (0, 4), tensors)
    cache.core.release(wave)
    assert r.entries() == {(0, 4)}  # the failed expert holds no slot
    del r.gate.fail[(0, 3)]
    wave = cache.core.acquire(0, [3])  # and a later try reads it afresh
    assert_weights(cache, (0, 3), tensors)
    cache.core.release(wave)
    r.check()


# --------------------------------------------------------------------------------------------------
# occupancy with loads in flight
# --------------------------------------------------------------------------------------------------
def test_resident_plus_in_flight_never_exceeds_capacity(rig, tensors):
    r = rig(4, threads=2)
    cache = r.cache
    wave = cache.core.acquire(0, [0, 1])  # two demand loads, held in flight
    r.gate.wait_started(2)
    assert cache.core.prefetch([(1, e) for e in range(8)]) == 2  # only the two free slots
    assert len(r.entries()) == 4
    cache.core.release(wave)
    # every slot is taken by a load in flight: nothing can be evicted for another guess
    assert cache.core.prefetch([(0, e) for e in range(2, 8)]) == 0
    assert len(r.entries()) == 4
    r.check()
    # a demand load now takes a slot back from a queued (not started) guess
    queued = [e for e, n in cache.core.entries.items() if n.load.state == "queued"]
    assert queued, "expected prefetches still queued behind the held reads"
    wave = cache.core.acquire(0, [5])
    assert len(r.entries()) == 4
    assert r.stats.prefetch_cancelled == 1
    r.drain()
    for eid in wave:
        assert_weights(cache, eid, tensors)
    cache.core.release(wave)
    for eid in r.entries():
        assert_weights(cache, eid, tensors)
    r.check()


def test_a_demand_load_waits_for_a_running_guess_when_no_slot_is_free(rig, tensors):
    r = rig(2)
    cache = r.cache
    assert cache.core.prefetch([(1, 0), (1, 1)]) == 2
    r.gate.wait_started(1)  # (1, 0) is being read, (1, 1) queued
    timer = threading.Timer(0.2, r.gate.open)  # the running read finishes a little later
    timer.start()
    try:
        wave = cache.core.acquire(0, [0, 1])  # (0, 0) cancels (1, 1); (0, 1) must wait for (1, 0)
    finally:
        timer.join()
    assert r.entries() == {(0, 0), (0, 1)}
    assert r.stats.prefetch_cancelled == 1
    for eid in wave:
        assert_weights(cache, eid, tensors)
    cache.core.release(wave)
    r.check()


# --------------------------------------------------------------------------------------------------
# speculation
# --------------------------------------------------------------------------------------------------
def test_a_speculative_load_never_evicts_a_pinned_expert(rig):
    r = rig(4)
    r.gate.open()
    cache = r.cache
    wave = cache.core.acquire(0, [0, 1])  # the running layer's experts
    for eid in wave:
        cache.weights(eid)
    assert cache.core.prefetch([(1, 2), (1, 3), (1, 4)]) == 2  # two free slots, the pinned two stay
    assert {(0, 0), (0, 1)} <= r.entries()
    r.drain()
    assert cache.core.prefetch([(1, 5)]) == 0  # the guesses are unpinned but ready: still the pins hold
    assert {(0, 0), (0, 1)} <= r.entries()
    cache.core.release(wave)
    r.check()


def test_a_speculative_load_never_evicts_what_the_same_request_wants(rig):
    r = rig(4)
    r.gate.open()
    cache = r.cache
    assert cache.core.prefetch([(1, 0), (1, 1)]) == 2
    r.drain()
    use(cache, 0, [0, 1])  # (settles the arrived guesses;) layer 0 is now the most recent
    # (1, 0) and (1, 1) are the least recently used, but this request wants them too
    assert cache.core.prefetch([(1, 0), (1, 1), (1, 2), (1, 3)]) == 2
    assert r.entries() == {(1, 0), (1, 1), (1, 2), (1, 3)}
    r.drain()
    cache.core.preempt(0, [])  # the next layer call settles the arrived loads
    assert all(n.ready for n in cache.core.entries.values())
    # every entry is wanted: a fifth guess gets no slot, nothing is evicted
    assert cache.core.prefetch([(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]) == 0
    assert r.entries() == {(1, 0), (1, 1), (1, 2), (1, 3)}
    assert r.stats.prefetch_issued == 4
    r.check()


def test_a_speculative_load_never_evicts_an_expert_of_a_kept_layer(rig):
    r = rig(4)
    r.gate.open()
    cache = r.cache
    use(cache, 0, [0, 1])  # the running layer's experts, released but needed again soon
    assert cache.core.prefetch([(1, 2), (1, 3), (1, 4)], keep_layers=[0, 1]) == 2  # only the free slots
    assert {(0, 0), (0, 1)} <= r.entries()
    r.drain()
    cache.core.preempt(1, [2, 3])
    assert cache.core.prefetch([(1, 4)], keep_layers=[1]) == 1  # layer 0 not kept: its LRU entry goes
    assert r.entries() == {(0, 1), (1, 2), (1, 3), (1, 4)}
    r.check()


def test_wrong_guesses_are_evicted_first(rig):
    r = rig(4)
    r.gate.open()
    cache = r.cache
    use(cache, 0, [0, 1])  # the oldest entries: LRU's first victims
    cache.core.prefetch([(1, 2), (1, 3)])
    r.drain()
    cache.core.preempt(1, [2])  # layer 1's router wants 2: the guess 3 was wrong
    assert (r.stats.prefetch_wasted, r.stats.prefetch_cancelled) == (1, 0)
    use(cache, 1, [2])
    assert (r.stats.hits, r.stats.prefetch_used, r.stats.prefetch_late) == (1, 1, 0)
    use(cache, 0, [4])  # a miss with every slot taken
    assert r.entries() == {(0, 0), (0, 1), (1, 2), (0, 4)}, "the wrong guess (1, 3) should go first"
    r.check()


def test_a_wrong_guess_still_loading_at_preempt_is_evicted_first_once_loaded(rig):
    r = rig(4)
    cache = r.cache
    cache.core.prefetch([(1, 3)])
    r.gate.wait_started(1)  # running: preempt cannot cancel it
    cache.core.preempt(1, [2])
    assert cache.core.entries[(1, 3)].wasted
    assert (r.stats.prefetch_wasted, r.stats.prefetch_cancelled) == (1, 0)
    r.drain()  # the wrong guess arrives
    use(cache, 0, [0, 1])
    use(cache, 0, [2])  # fills the last slot
    use(cache, 0, [4])  # a miss with every slot taken
    assert (1, 3) not in r.entries(), "the loaded wrong guess should be the first victim"
    assert r.entries() == {(0, 0), (0, 1), (0, 2), (0, 4)}
    r.check()


def test_preempt_cancels_a_layers_queued_unneeded_guesses(rig, tensors):
    r = rig(8)
    cache = r.cache
    wave = cache.core.acquire(0, [0, 1])
    r.gate.wait_started(1)  # the only I/O thread is inside (0, 0): everything else queues
    assert cache.core.prefetch([(1, 2), (1, 3), (1, 4), (0, 5)]) == 4
    tasks = {eid: r.task(eid) for eid in [(1, 2), (1, 3), (1, 4), (0, 5)]}
    cache.core.preempt(1, [2, 6])  # layer 1 needs 2 (and 6, not guessed); 3 and 4 were wrong
    assert (r.stats.prefetch_wasted, r.stats.prefetch_cancelled) == (2, 2)
    assert tasks[(1, 3)].state == tasks[(1, 4)].state == CANCELLED
    assert r.entries() == {(0, 0), (0, 1), (1, 2), (0, 5)}  # cancelled guesses free their slots at once
    assert not cache.core.entries[(1, 2)].wasted and not cache.core.entries[(0, 5)].wasted  # other layer untouched
    cache.core.preempt(1, [2, 6])  # a second preempt counts nothing twice
    assert (r.stats.prefetch_wasted, r.stats.prefetch_cancelled) == (2, 2)
    r.drain()
    assert {eid for eid, _ in r.log} == {(0, 0), (0, 1), (1, 2), (0, 5)}, "a cancelled guess was read"
    for eid in wave:
        assert_weights(cache, eid, tensors)
    cache.core.release(wave)
    r.check()


def test_a_late_prefetch_is_promoted_to_demand_and_counted(rig, tensors, monkeypatch):
    import expertcache.store as store_mod

    monkeypatch.setattr(store_mod, "CHUNK_BYTES", store_mod.ALIGN)  # several chunks per expert (6 KiB each)
    r = rig(8)
    cache = r.cache
    n = {e: len(r.store.plan((1, e)).chunks) for e in range(3)}
    assert min(n.values()) >= 2
    assert cache.core.prefetch([(1, 0), (1, 1), (1, 2)]) == 3
    r.gate.wait_started(1)  # (1, 0) running, (1, 1) and (1, 2) queued
    late = r.task((1, 2))
    wave = cache.core.acquire(1, [2])  # the guess is needed while still queued
    assert (r.stats.hits, r.stats.misses) == (1, 0)
    assert (r.stats.prefetch_used, r.stats.prefetch_late) == (1, 1)
    assert late.priority == DEMAND
    r.gate.open()
    assert_weights(cache, (1, 2), tensors)
    cache.core.release(wave)
    r.drain()
    # (1, 0) yields after its running chunk, the promoted (1, 2) goes whole, then the rest
    order = [eid for eid, _ in r.log]
    assert order == [(1, 0)] + [(1, 2)] * n[2] + [(1, 0)] * (n[0] - 1) + [(1, 1)] * n[1]
    assert all(r.task(e).state == DONE for e in [(1, 0), (1, 1), (1, 2)])
    r.check()


def test_a_prefetch_that_arrived_in_time_is_not_late(rig):
    r = rig(4)
    cache = r.cache
    cache.core.prefetch([(1, 5)])
    r.drain()
    wave = cache.core.acquire(1, [5])
    assert (r.stats.hits, r.stats.prefetch_used, r.stats.prefetch_late) == (1, 1, 0)
    assert r.task((1, 5)).priority == PREFETCH
    cache.core.release(wave)


@pytest.mark.parametrize("each", [True, False])
def test_in_a_sweep_each_computed_expert_hands_its_slot_to_a_guess(rig, each):
    """A sweep whose caller computes each expert as it comes (`each`: a call of several tokens):
    every expert it has computed gives its slot at once to the call's next guess, so the guesses
    load while the layer still computes; the entries kept for the next forward stay. Without
    `each` (one token's experts, computed together at the end) no guess starts before the call's
    experts are done."""
    r = rig(10)
    cache = r.cache
    r.gate.open()
    use(cache, 0, range(8))
    use(cache, 1, range(8))  # a sweep: evicts in forward order, two of layer 0 kept
    kept = {e for e in r.entries() if e[0] == 0}
    assert len(kept) == 2
    wanted = [e for e in range(8) if (0, e) not in kept]  # the next forward's layer 0: the guesses
    issued = []
    stream = cache.stream(1, list(range(8)), lambda: [(0, wanted)], each=each)
    for _ in stream:
        issued.append(r.stats.prefetch_issued)
    r.drain()
    if each:  # one guess a computed expert (the ones yielded before this one), until the six are in
        assert issued == [min(i, 6) for i in range(8)]
    else:
        assert issued == [0] * 8
    assert r.stats.prefetch_issued == 6  # the rest after the call (end_call), either way
    assert kept <= r.entries() and {(0, e) for e in wanted} <= r.entries()
    r.check()


def test_in_a_sweep_a_guess_takes_only_the_running_layers_finished_experts(rig):
    """A call that needs most of its layer (a long prompt) is a sweep: the entries it keeps for the
    next prompt (Belady's choice) are off limits to guesses while the layer computes; once its
    experts are done (end_call) they, not the kept ones, make room for the guesses."""
    r = rig(10)
    cache = r.cache
    r.gate.open()
    use(cache, 0, range(8))
    cache.core.preempt(1, range(8))  # routes layer 1: a sweep
    assert cache.core.sweep == 1
    wave = cache.core.acquire(1, range(8))  # evicts in forward order: six of layer 0 go, two stay
    r.drain()
    for eid in wave:
        cache.weights(eid)
    kept = {e for e in r.entries() if e[0] == 0}
    assert len(kept) == 2
    guesses = [(0, e) for e in range(8) if (0, e) not in kept]
    assert cache.core.prefetch(guesses) == 0  # full: the kept ones and the pinned layer are off limits
    cache.core.release(wave)
    assert cache.core.prefetch(guesses) == 0  # layer 1's experts are released but still the call's own
    cache.core.end_call()
    assert cache.core.prefetch(guesses) == 6  # now they make room, the kept ones stay
    assert kept <= r.entries() and sum(1 for e in r.entries() if e[0] == 1) == 2
    r.drain()
    r.check()
