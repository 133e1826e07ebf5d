"""Predictors and prefetch scheduling: every predictor keeps the engine exact, each one's guess on
a hand-made case, the no-harm rule for wrong guesses, prefill pipelining, training and evaluation.

The model is a tiny random Mixtral (4 layers, 8 experts, top-2) with a word-level tokenizer, and
predictor files trained on it in a few steps next to the checkpoint (where the engine looks by
default), so `prefetch=<name>` alone loads each predictor.
"""

from __future__ import annotations

import json
import types
from unittest import mock

import pytest
import torch
from torch import nn

import expertcache
from expertcache.checkpoint import Checkpoint
from expertcache.decoding import Decoding
from expertcache.errors import ExpertCacheError
from expertcache.cli import main
from expertcache.policies import POLICIES
from expertcache.predictors import (
    PREDICTORS,
    Artefact,
    CappedPredictor,
    DefaultVectorPredictor,
    EstimatorPredictor,
    ExpertMLP,
    HistoryPredictor,
    LearnedPredictor,
    NextGatePredictor,
    PregateNet,
    PregatePredictor,
    default_path,
    make_predictor,
    rank,
)
from expertcache.sim.recorder import Recorder
from expertcache.tools.predictor_training import TrainSettings, record_calibration, train_predictor

from helpers.invariants import LoadRecorder, check_engine_invariants
from helpers.checkpoints import make_checkpoint, prompt_ids
from helpers.reference import reference_outputs

PROMPT = prompt_ids(40)
NEW_TOKENS = 16
TRAINED = ("default-vector", "estimator", "learned", "pregate")
FROM_TRACE = ("default-vector", "estimator", "learned")  # pregate trains from text (a trace has no embeddings)
POLICY_NAMES = sorted(p for p in POLICIES if p != "belady")  # belady needs a recorded trace
WORDS = [f"w{i}" for i in range(125)]  # ids 3..127: the tiny vocabulary, special ids 0-2 left out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _add_tokenizer(model_dir) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny checkpoint with every trained predictor file beside it (depths 1 and 2)."""
    d = make_checkpoint(tmp_path_factory.mktemp("predictors") / "mixtral", "mixtral", num_experts=8, top_k=2, num_layers=4)
    _add_tokenizer(d)
    with expertcache.load(d, expert_budget="100%", prefetch="none", io="buffered") as eng:
        docs = [prompt_ids(64, seed=s) for s in range(4)]
        trace = record_calibration(eng, docs, max_tokens=256, window=64, progress=False)
        for kind in FROM_TRACE:
            art = train_predictor(eng, kind, trace=trace, depths=[1, 2], settings=TrainSettings(steps=10), progress=False)
            art.save(default_path(d, kind))
        text = _word_text(tmp_path_factory.mktemp("text") / "cal.txt", 256)
        train_predictor(eng, "pregate", text=text, settings=TrainSettings(steps=10), progress=False).save(default_path(d, "pregate"))
    return d


def _word_text(path, n: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist()))
    return path


@pytest.fixture(scope="module")
def ref(model_dir):
    return reference_outputs(model_dir, PROMPT, NEW_TOKENS)


def _budget(model_dir, extra_slots: int) -> int:
    ck = Checkpoint.open(model_dir)
    return (ck.top_k + extra_slots) * ck.expert_bytes


def _run_exact(model_dir, ref, *, prefetch, budget, cache_policy="lfu", depth=2, **options) -> dict:
    with expertcache.load(
        model_dir, expert_budget=budget, prefetch=prefetch, prefetch_depth=depth, io="direct", cache_policy=cache_policy, **options
    ) as eng:
        recorder = LoadRecorder(eng)
        with torch.no_grad():
            logits = eng.model(input_ids=torch.tensor([PROMPT])).logits[0]
        torch.testing.assert_close(logits, ref.logits)
        result = eng.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
        assert result.token_ids == ref.generated
        check_engine_invariants(eng, recorder)
        return eng.stats()


# --- exactness -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_every_predictor_exact_at_minimum_budget(name, model_dir, ref):
    stats = _run_exact(model_dir, ref, prefetch=name, budget=_budget(model_dir, 0))
    assert stats["cache_slots"] == 2 and stats["prefetch"] == name


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_every_predictor_exact_with_every_policy_under_pressure(name, policy, model_dir, ref):
    """Three slots above the minimum: guesses get slots, are used, wasted, cancelled and evicted
    under every policy, and the outputs stay transformers' own."""
    stats = _run_exact(model_dir, ref, prefetch=name, budget=_budget(model_dir, 3), cache_policy=policy)
    assert (stats["prefetch_issued"] > 0) == (name != "none")


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("bf16") / "m", "mixtral", num_experts=8, top_k=2, num_layers=4, dtype=torch.bfloat16)
    return d, reference_outputs(d, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_every_predictor_exact_in_bf16(name, model_dir, bf16_model):
    """A bf16 checkpoint of the same shape, using the fp32 model's predictor files (--predictor)."""
    d, ref16 = bf16_model
    path = str(default_path(model_dir, name)) if name in TRAINED else None
    stats = _run_exact(d, ref16, prefetch=name, budget=_budget(d, 3), predictor=path)
    assert (stats["prefetch_issued"] > 0) == (name != "none")


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    """GLM4-MoE (sigmoid router, biased group-limited top-k, a shared expert, a dense first layer):
    a family new to the experts seam, with its own trained predictor files."""
    d = make_checkpoint(tmp_path_factory.mktemp("glm4") / "m", "glm4_moe", num_experts=8, top_k=2, num_layers=4,
                        n_group=2, topk_group=1)
    _add_tokenizer(d)
    with expertcache.load(d, expert_budget="100%", prefetch="none", io="buffered") as eng:
        trace = record_calibration(eng, [prompt_ids(64, seed=s) for s in range(4)], max_tokens=256, window=64, progress=False)
        for kind in FROM_TRACE:
            train_predictor(eng, kind, trace=trace, depths=[1, 2], settings=TrainSettings(steps=10), progress=False).save(default_path(d, kind))
        text = _word_text(tmp_path_factory.mktemp("text") / "cal.txt", 256)
        train_predictor(eng, "pregate", text=text, settings=TrainSettings(steps=10), progress=False).save(default_path(d, "pregate"))
    return d, reference_outputs(d, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("name", sorted(PREDICTORS))
def test_every_predictor_exact_on_glm4_moe(name, glm4):
    d, ref = glm4
    _run_exact(d, ref, prefetch=name, budget=_budget(d, 0))
    stats = _run_exact(d, ref, prefetch=name, budget=_budget(d, 3))
    assert (stats["prefetch_issued"] > 0) == (name != "none")


def test_prefetch_max_caps_decode_guesses_and_stays_exact(model_dir, ref):
    capped = _run_exact(model_dir, ref, prefetch="next-gate", budget="50%", depth=1, prefetch_max=1)
    full = _run_exact(model_dir, ref, prefetch="next-gate", budget="50%", depth=1)
    assert capped["prefetch_issued"] < full["prefetch_issued"]


def test_decode_guesses_stop_for_layers_whose_precision_is_low_but_for_probes(model_dir):
    """The precision gate: a decode call skips guessing when every layer it guesses for (the next
    prefetch_depth sparse layers) has issued PRECISION_WARMUP guesses at a precision below
    prefetch_min_precision; one gated call in PRECISION_PROBE guesses anyway. Prefill, a good
    layer, too few guesses or min_precision 0 never gate."""
    from expertcache.config import PRECISION_PROBE, PRECISION_WARMUP

    with expertcache.load(model_dir, expert_budget="50%", prefetch="next-gate", prefetch_depth=2, io="buffered",
                          prefetch_min_precision=0.5) as eng:
        rt, stats = eng.runtime, eng.cache.core.stats
        first, t1, t2 = eng.checkpoint.sparse_layers[:3]

        def precision(layer, issued, used):
            ls = stats.layer(layer)
            ls.prefetch_issued, ls.prefetch_used = issued, used

        rt.phase = "decode"
        precision(t1, 100, 10)
        precision(t2, 100, 49)
        gated = [rt._gated(first) for _ in range(2 * PRECISION_PROBE)]
        assert gated.count(False) == 2 and not gated[PRECISION_PROBE - 1], gated  # only the probes guess
        precision(t2, 100, 50)  # one target good enough: guess
        assert not rt._gated(first)
        precision(t2, PRECISION_WARMUP - 1, 0)  # too few to judge
        assert not rt._gated(first)
        precision(t2, 100, 0)
        rt.phase = "prefill"
        assert not rt._gated(first)
        rt.phase, rt.min_precision = "decode", 0.0
        assert not rt._gated(first)
        rt.min_precision = 0.5
        assert rt._gated(first) or rt._gated(first)


def test_idle_guesses_pause_but_for_probes_and_a_load_reopens_them(model_dir):
    """The idle gate: after IDLE_GUESSES decode calls in a row at a layer whose guesses started no
    load (every expert they named held a slot), that layer's decode calls skip guessing but one in
    PRECISION_PROBE; a probe that starts a load reopens it; prefill and non-exact routing never gate.
    End to end at a 100% budget where some expert never holds a slot (so _all_held never stops the
    guessing): fewer guesses, the same tokens."""
    from expertcache.config import IDLE_GUESSES, PRECISION_PROBE
    from expertcache.experts import ExpertsRuntime

    with expertcache.load(model_dir, expert_budget="100%", prefetch="next-gate", io="buffered") as eng:
        rt, stats = eng.runtime, eng.cache.core.stats
        layer = eng.checkpoint.sparse_layers[0]
        rt.phase = "decode"
        for _ in range(IDLE_GUESSES - 1):
            rt._note_idle(layer, stats.prefetch_issued)  # guessed, nothing started
        assert not rt._idle_gated(layer)
        rt._note_idle(layer, stats.prefetch_issued)
        gated = [rt._idle_gated(layer) for _ in range(2 * PRECISION_PROBE)]
        assert gated.count(False) == 2 and not gated[PRECISION_PROBE - 1], gated  # only the probes guess
        rt._note_idle(layer, stats.prefetch_issued - 1)  # a probe's guess started a load
        assert not rt._idle_gated(layer)
        rt._idle[layer] = IDLE_GUESSES
        rt.phase = "prefill"
        assert not rt._idle_gated(layer)

    guessed, tokens = {}, {}
    real = ExpertsRuntime._guess
    for gate in (True, False):
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ExpertsRuntime, "_all_held", lambda self: False)  # as if an expert were never routed
            mp.setattr(ExpertsRuntime, "_guess", lambda self, *a: calls.append(1) or real(self, *a))
            if not gate:
                mp.setattr(ExpertsRuntime, "_idle_gated", lambda self, layer: False)
            with expertcache.load(model_dir, expert_budget="100%", prefetch="next-gate", io="buffered") as eng:
                tokens[gate] = eng.generate(PROMPT, max_new_tokens=3 * IDLE_GUESSES, stop_at_eos=False).token_ids
        guessed[gate] = len(calls)
    assert tokens[True] == tokens[False]
    assert guessed[True] < 0.7 * guessed[False], guessed


def test_the_first_layers_lead_guesses_stop_when_its_precision_is_low(model_dir):
    """The lead guess for the first sparse layer (made from the token's embedding as the step
    starts) obeys the same gate, on that layer's own precision: blind leads stop but for probes."""
    from expertcache.config import PRECISION_PROBE

    with expertcache.load(model_dir, expert_budget="50%", prefetch="next-gate", io="buffered",
                          prefetch_min_precision=0.5) as eng:
        rt, stats = eng.runtime, eng.cache.core.stats
        first = eng.checkpoint.sparse_layers[0]
        leads = []
        rt.lead = lambda layer, experts: leads.append(layer)
        hidden = torch.randn(1, 1, eng.model.config.hidden_size, dtype=eng.model.dtype)
        rt.phase = "decode"
        rt._lead(hidden)
        assert leads == [first]  # no record yet: it guesses
        ls = stats.layer(first)
        ls.prefetch_issued, ls.prefetch_used = 100, 10
        leads.clear()
        for _ in range(2 * PRECISION_PROBE):
            rt._lead(hidden)
        assert len(leads) == 2  # the probes only
        ls.prefetch_used = 60
        leads.clear()
        rt._lead(hidden)
        assert leads == [first]


def test_prefetch_min_precision_is_a_fraction():
    with pytest.raises(ExpertCacheError, match="prefetch_min_precision must be within"):
        expertcache.EngineConfig(prefetch_min_precision=1.5)


# --- each predictor on a hand-made case ------------------------------------------------------------
E4 = torch.eye(4)  # a router that scores expert e by feature e


def test_rank_orders_by_votes_then_probability():
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 1.0, 3.0, 2.0], [5.0, 0.0, 0.0, 4.0]])  # top-2: {1,3} {2,3} {0,3}
    assert rank(scores, 2) == [3, 0, 1, 2]  # 3 thrice; 0, 1, 2 once each, by mean probability
    assert rank(scores[:1], 2) == [1, 3]  # one token: its own order


def test_next_gate_applies_the_next_routers_to_this_input():
    routers = {0: torch.zeros(4, 4), 1: E4, 2: E4.flip(0)}  # layer 2 scores expert e by feature 3-e
    p = NextGatePredictor(routers=routers, top_k=2, depth=2)
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert p.predict(0, x, torch.zeros(1, 4)) == [(1, [1, 3]), (2, [2, 0])]
    assert p.predict(2, x, torch.zeros(1, 4)) == []  # the last layer has nothing ahead


def test_estimator_routes_the_mapped_input():
    routers = {0: E4, 1: E4}
    swap = torch.eye(4)[[3, 2, 1, 0]]  # x A reverses the features
    p = EstimatorPredictor(routers=routers, maps={(1, 0): (swap, torch.zeros(4))}, top_k=2, depth=1)
    x = torch.tensor([[4.0, 3.0, 0.0, 0.0]])
    assert p.predict(0, x, torch.zeros(1, 4)) == [(1, [3, 2])]


def test_untrained_learned_net_is_next_gate_and_training_moves_it():
    router = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    net = ExpertMLP.from_router(router, width=4)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(net(x), x @ router.T)
    p = LearnedPredictor(nets={(1, 0): net}, layers=[0, 1], top_k=2, depth=1)
    gate = NextGatePredictor(routers={0: router, 1: router}, top_k=2)
    assert p.predict(0, x[:1], None) == gate.predict(0, x[:1], None)
    with torch.no_grad():
        net.fc2.weight.normal_()  # a trained net: the predictor's fused form computes the same scores
    torch.testing.assert_close(LearnedPredictor(nets={(1, 0): net}, layers=[0, 1], top_k=2).scores(1, 0, x), net(x))


@pytest.mark.parametrize("activation", ["relu", "gelu", None])  # None: a file from before activations were recorded (GELU)
def test_learned_file_round_trip_keeps_the_activation(activation, tmp_path):
    router = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    net = ExpertMLP.from_router(router, width=4, activation=activation or "gelu")
    with torch.no_grad():
        net.fc2.weight.normal_()
    meta = {} if activation is None else {"activation": activation}
    tensors = {f"d1.l0.{k}": v for k, v in net.state_dict().items()}
    path = Artefact(kind="learned", model="m", sparse_layers=[0, 1], num_experts=8, hidden_size=16, top_k=2, depths=[1],
                    tensors=tensors, meta=meta).save(tmp_path / "p.pt")  # fmt: skip
    p = make_predictor("learned", routers={0: router, 1: router}, top_k=2, depth=1, path=str(path))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p.scores(1, 0, x), net(x))


def test_history_votes_with_decay_at_the_target_layer():
    p = HistoryPredictor(layers=[0, 1], top_k=3, depth=1, window=3, decay=0.5)
    assert p.predict(0, torch.zeros(1, 4), None) == []  # nothing seen yet at layer 1
    for ids in ([0, 1], [0, 2], [2, 3], [5, 6]):  # the oldest falls out of the window
        p.observe(1, None, None, None, torch.tensor([ids]))
    # votes: [5,6] 1 each; [2,3] 0.5 each; [0,2] 0.25 each -> 2: 0.75, 0: 0.25
    assert p.predict(0, torch.zeros(1, 4), None) == [(1, [5, 6, 2])]  # the top 3 of 5, 6, 2, 3, 0
    p.observe(1, None, None, None, torch.tensor([[-1, 7]]))  # a dropped slot is no vote
    assert p.scores(1)[7] == 1.0 and -1 not in p.scores(1)


def test_default_vector_adds_expert_outputs_to_the_residual():
    norms = {0: nn.Identity(), 1: nn.Identity()}
    vectors = {0: torch.zeros(4, 4), 1: torch.zeros(4, 4)}
    vectors[0][1] = torch.tensor([0.0, 0.0, 0.0, 10.0])  # expert 1 of layer 0 writes feature 3
    shared = {0: torch.tensor([0.0, 0.0, 0.5, 0.0]), 1: torch.zeros(4)}
    p = DefaultVectorPredictor(norms=norms, routers={0: E4, 1: E4}, vectors=vectors, shared=shared, top_k=2, depth=1)
    residual = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])  # [B, S, H] as the decoder layer hands it over
    norms[0](residual)  # the decoder layer norms its residual: the pre-hook keeps it
    p.observe(0, None, None, torch.tensor([[0.8, 0.2]]), torch.tensor([[1, 0]]))
    # guess = [1, 0, 0.5, 8]: expert 3 (feature 3) first, then expert 0
    assert p.predict(0, torch.zeros(1, 4), None) == [(1, [3, 0])]
    p.close()
    norms[0](residual * 0)
    torch.testing.assert_close(p._residual[0], residual)  # no hook after close


def test_cap_limits_decode_guesses_only():
    routers = {0: E4, 1: E4}
    p = CappedPredictor(NextGatePredictor(routers=routers, top_k=2), 1)
    assert p.predict(0, torch.tensor([[0.0, 3.0, 1.0, 2.0]]), None) == [(1, [1])]
    prefill = torch.tensor([[0.0, 3.0, 1.0, 2.0], [3.0, 0.0, 2.0, 1.0]])
    assert p.predict(0, prefill, None) == [(1, [0, 1, 2, 3])]  # a prompt keeps every guess


def test_unknown_predictor_lists_every_name():
    with pytest.raises(ValueError) as e:
        make_predictor("bogus")
    assert all(n in str(e.value) for n in PREDICTORS)


def test_trained_predictor_without_its_file_says_how_to_make_one(tmp_path):
    d = make_checkpoint(tmp_path / "bare", "mixtral", num_experts=4, top_k=2, num_layers=2)
    with pytest.raises(expertcache.ExpertCacheError, match="train-predictor --kind learned"):
        expertcache.load(d, prefetch="learned")


def test_predictor_file_for_another_depth_is_refused(model_dir, tmp_path):
    art = Artefact.load(default_path(model_dir, "estimator"))
    art.depths = [1]
    path = art.save(tmp_path / "d1.pt")
    with pytest.raises(expertcache.ExpertCacheError, match="retrain with --depth 1,2"):
        expertcache.load(model_dir, prefetch="estimator", prefetch_depth=2, predictor=str(path))


def test_a_damaged_predictor_file_says_so_in_one_line(tmp_path):
    """A file that is no torch file, one cut short, and one holding code (never run): each a
    one-line error naming the file and what to do, without torch's advice to load it unsafely."""
    import os

    class Code:
        def __reduce__(self):
            return (os.system, ("echo ran > " + str(tmp_path / "ran"),))

    (tmp_path / "text.pt").write_text("not a predictor\n")
    torch.save({"format": "x", "t": torch.ones(3)}, tmp_path / "cut.pt")
    whole = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    torch.save({"format": Code()}, tmp_path / "code.pt")
    for name, words in (("text.pt", "not a torch file of tensors"), ("cut.pt", "truncated or damaged"),
                        ("code.pt", "loads no code")):  # fmt: skip
        with pytest.raises(expertcache.ExpertCacheError) as err:
            Artefact.load(tmp_path / name)
        msg = str(err.value)
        assert name in msg and words in msg and "train-predictor" in msg and "\n" not in msg and "weights_only" not in msg
    assert not (tmp_path / "ran").exists()


# --- scheduling ------------------------------------------------------------------------------------
def test_wrong_guess_never_evicts_an_expert_of_the_layers_it_looks_over(model_dir):
    """4 slots: (1,0) and (3,0) resident, layer 0 running with (0,0), (0,1) pinned. A guess for
    layer 1 may take (3,0), the policy's victim outside the window, but never (1,0): layer 1 runs
    before the guess could pay off, and (1,0) may be what it needs."""
    with expertcache.load(model_dir, expert_budget=_budget(model_dir, 2), prefetch="none", io="buffered", cache_policy="lru") as eng:
        core = eng.cache.core
        for eid in ((1, 0), (3, 0)):
            core.release(core.acquire(eid[0], [eid[1]]))
            core.wait(eid)
        running = core.acquire(0, [0, 1])
        assert core.prefetch([(1, 5)], keep_layers=range(0, 2)) == 1
        assert {(1, 0), (1, 5)} <= set(core.entries) and (3, 0) not in core.entries
        assert core.prefetch([(1, 6)], keep_layers=range(0, 2)) == 0  # only pinned and kept entries are left
        assert (1, 0) in core.entries
        core.release(running)
        assert eng.stats()["layers"]["1"]["prefetch_issued"] == 1


def test_a_guess_counts_in_the_policy_only_when_used(model_dir):
    """LFU keeps touch counts for the whole run: a wrong guess must add none, a used one one."""
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered", cache_policy="lfu") as eng:
        core, policy = eng.cache.core, eng.cache.core.policy
        core.prefetch([(1, 5), (1, 6)])
        for eid in ((1, 5), (1, 6)):
            core.reader.wait(core.entries[eid].load)  # both loads over
        assert (1, 5) not in policy._count and (1, 6) not in policy._count
        core.preempt(1, [6])  # layer 1 runs and needs 6: 5 was a wrong guess
        core.release(core.acquire(1, [6]))
        assert (1, 5) not in policy._count and policy._count[(1, 6)] == 1
        assert core.choose_victim() == (1, 5)  # the wrong guess goes first
        s = eng.stats()
        assert (s["prefetch_issued"], s["prefetch_used"], s["prefetch_wasted"]) == (2, 1, 1)


def test_arrival_key_orders_ready_then_running_then_queue_order(model_dir):
    from expertcache.cache import Entry
    from expertcache.ids import DEMAND, PREFETCH
    from expertcache.loader import RUNNING, LoadTask

    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        core = eng.cache.core
        tasks = {"late-demand": LoadTask((0, 1), 0, DEMAND, 9), "early-prefetch": LoadTask((0, 2), 1, PREFETCH, 3),
                 "running": LoadTask((0, 3), 2, PREFETCH, 7), "early-demand": LoadTask((0, 4), 3, DEMAND, 5)}  # fmt: skip
        tasks["running"].state = RUNNING
        for name, t in tasks.items():
            core.entries[t.eid] = Entry(slot=t.slot, load=t, ready=False)
        core.entries[(0, 0)] = Entry(slot=4)
        order = sorted([(0, 1), (0, 2), (0, 3), (0, 4), (0, 0)], key=core.arrival_key)
        assert order == [(0, 0), (0, 3), (0, 4), (0, 1), (0, 2)]
        core.entries.clear()


def test_prefill_loads_the_next_layers_experts_behind_this_layers_compute(model_dir):
    """A 40-token prompt uses almost every expert of every layer: with next-gate, each later
    layer's experts are requested (at low priority) while the layer before it computes, so most
    of its lookups find the expert already there or on its way."""
    with expertcache.load(model_dir, expert_budget="100%", prefetch="next-gate", io="direct") as eng:
        order: list[tuple[str, tuple[int, int]]] = []
        submit_many = eng.cache.loader.submit_many

        def recording_submit_many(loads, priority):
            order.extend(("prefetch" if priority else "demand", eid) for eid, _ in loads)
            return submit_many(loads, priority)

        eng.cache.loader.submit_many = recording_submit_many
        with torch.no_grad():
            eng.model(input_ids=torch.tensor([PROMPT]))
        layers = eng.checkpoint.sparse_layers
        s = eng.stats()["layers"]
        for prev, layer in zip(layers, layers[1:]):
            assert s[str(layer)]["prefetch_used"] >= s[str(layer)]["lookups"] // 2
            first_own = next(i for i, (_, e) in enumerate(order) if e[0] == layer)
            last_prev = max((i for i, (kind, e) in enumerate(order) if e[0] == prev and kind == "demand"), default=-1)
            assert order[first_own][0] == "prefetch" and first_own > last_prev  # behind the previous layer's demand reads
        # layer 0: no predictor sees it coming, but a 40-token prompt uses all of it, so its experts
        # are all requested when the first decoder layer starts, before any demand read
        first = layers[0]
        n = eng.checkpoint.num_experts
        assert order[:n] == [("prefetch", (first, e)) for e in range(n)]
        assert s[str(first)]["prefetch_issued"] == n and s[str(first)]["misses"] == 0


def test_first_layer_prefetch_all_for_long_prompts_and_the_routers_guess_otherwise(model_dir):
    """The first sparse layer: all its experts for a prompt that uses the whole layer (E (1 - k/E)^T
    < 1/2: at 8 experts top-2 from 10 tokens on); for a shorter call (a decode step) the top-k its
    own norm and router give the token's input to the first decoder layer (its embedding), before
    attention runs. Recorded as the call's guess for its own layer; nothing without prefetch."""
    from expertcache.experts import all_experts_likely

    assert not all_experts_likely(9, 8, 2) and all_experts_likely(10, 8, 2)
    assert not all_experts_likely(85, 128, 8) and all_experts_likely(86, 128, 8)
    with expertcache.load(model_dir, expert_budget="50%", prefetch="next-gate", io="buffered") as eng:
        first = eng.checkpoint.sparse_layers[0]
        with Recorder(eng) as rec:
            out = eng.generate(PROMPT[:6], max_new_tokens=8, stop_at_eos=False)  # short prompt, then decode steps
        calls = [r for r in rec.trace.routes if r.layer == first]
        router = getattr(eng.block(first), eng.checkpoint.family.router)
        norm = eng.norms()[first]
        inputs = [PROMPT[:6]] + [[t] for t in out.token_ids[:-1]]  # each forward's new tokens
        assert len(calls) == len(inputs) == 8  # the prompt, then 7 decode steps (the 8th token needs no forward)
        with torch.no_grad():
            for call, toks in zip(calls, inputs):
                emb = eng.model.get_input_embeddings()(torch.tensor([toks]))[0]  # [T, H]
                out = router(norm(emb))
                logits = out[0] if isinstance(out, tuple) else out  # [T, E]
                want = rank(logits, eng.checkpoint.top_k)
                assert call.guesses[0] == (first, want), (call.phase, call.guesses[0], want)
                assert len(toks) > 1 or len(want) == 2
    with expertcache.load(model_dir, expert_budget="100%", prefetch="next-gate", io="buffered") as eng:
        with Recorder(eng) as rec:
            eng.generate(PROMPT, max_new_tokens=1)  # a 40-token prompt: the whole first layer
        call = next(r for r in rec.trace.routes if r.layer == first)
        assert call.guesses[0] == (first, list(range(eng.checkpoint.num_experts)))
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        eng.generate(PROMPT, max_new_tokens=1)  # prefetch none: nothing speculative at all
        assert eng.stats()["prefetch_issued"] == 0


def test_first_layer_guess_is_remembered_per_token_input():
    """A decode step's first-layer guess is computed once per distinct input (a token id's
    embedding) and looked up afterwards; a different input, or a full memo, computes again."""
    from expertcache.experts import FirstLayerPrefetch

    calls = []
    requested = []

    class Router(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return (x[:, :4] * 10,)  # logits: expert e scores feature e

    runtime = types.SimpleNamespace(num_experts=4, top_k=2, lead=lambda layer, experts: requested.append([(layer, e) for e in experts]),
                                    low_precision=lambda targets: False)
    hook = FirstLayerPrefetch(runtime, 0, router=Router(), norm=torch.nn.Identity())
    a = torch.tensor([[[0.0, 3.0, 1.0, 2.0]]], dtype=torch.bfloat16)
    b = torch.tensor([[[5.0, 0.0, 1.0, 2.0]]], dtype=torch.bfloat16)
    for h in (a, a, b, a, b):
        hook(h)
    assert requested == [[(0, 1), (0, 3)]] * 2 + [[(0, 0), (0, 3)], [(0, 1), (0, 3)], [(0, 0), (0, 3)]]
    assert calls == [1, 1]  # a and b once each
    hook.MEMO_BYTES = 8  # room for one key of 8 bytes: a new input clears the memo
    hook(torch.tensor([[[1.0, 0.0, 0.0, 3.0]]], dtype=torch.bfloat16))
    hook(a)
    assert calls == [1, 1, 1, 1] and requested[-1] == [(0, 1), (0, 3)]


# --- training and evaluation ----------------------------------------------------------------------
def test_learned_training_runs_saves_and_loads_through_the_cli(model_dir, tmp_path, capsys):
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        with Recorder(eng, logits=True, hidden_states=True) as rec:
            eng.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)
        trace_path = rec.trace.save(tmp_path / "run.npz")
    out = tmp_path / "learned.pt"
    argv = ["train-predictor", "--model", str(model_dir), "--trace", str(trace_path), "--out", str(out),
            "--depth", "2", "--steps", "3", "--width", "8", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "learned predictor" in capsys.readouterr().out
    art = Artefact.load(out)
    assert art.kind == "learned" and art.depths == [1, 2] and art.top_k == 2
    assert art.tensors["d2.l0.fc1.weight"].shape == (8, 64)
    assert set(art.meta["validation"]) == {"d1.l0", "d1.l1", "d1.l2", "d2.l0", "d2.l1"}
    with expertcache.load(model_dir, expert_budget="50%", prefetch="learned", prefetch_depth=2, predictor=str(out)) as eng:
        eng.generate(PROMPT, max_new_tokens=4)
        assert eng.stats()["prefetch_issued"] > 0


def test_train_predictor_refuses_a_trace_without_hidden_states(model_dir, tmp_path, capsys):
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        with Recorder(eng) as rec:
            eng.generate(PROMPT, max_new_tokens=2, stop_at_eos=False)
        path = rec.trace.save(tmp_path / "plain.npz")
    rc = main(["train-predictor", "--model", str(model_dir), "--trace", str(path), "--out", str(tmp_path / "x.pt")])
    assert rc == 1
    assert "--hidden-states" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_recall_of_the_routing_by_the_pregate_is_the_pregates_own(model_dir, tmp_path, capsys):
    """--routed-by-pregate: eval-predictors scores against the routing the model runs with when
    the pre-gate routes it: the pre-gate's own guesses are all right (100 %), where against the
    routers they are not; train-predictor fits the same routing."""
    text = tmp_path / "heldout.txt"
    g = torch.Generator().manual_seed(7)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(len(WORDS), (60,), generator=g).tolist()))
    path = _strong_pregate(model_dir, tmp_path / "pg.pt")
    base = ["eval-predictors", "--model", str(model_dir), "--text", str(text), "--predictors", "next-gate,pregate",
            "--predictor-file", f"pregate={path}", "--max-tokens", "30", "--json", "--no-progress"]  # fmt: skip
    recall = {}
    for flag in ([], ["--routed-by-pregate"]):
        assert main([*base, *flag]) == 0
        rows = {(r["predictor"], r["depth"]): r["recall"] for r in json.loads(capsys.readouterr().out)["results"]}
        recall[bool(flag)] = rows[("pregate", 0)]
    assert recall[True] == 1.0 and recall[False] < 1.0
    rc = main(["train-predictor", "--kind", "learned", "--model", str(model_dir), "--text", str(text), "--max-tokens", "60",
               "--steps", "5", "--routed-by-pregate", "--out", str(tmp_path / "l.pt"), "--no-progress"])  # fmt: skip
    assert rc == 0 and (tmp_path / "l.pt").exists()


def test_eval_predictors_segments_restart_the_cache(model_dir, tmp_path, capsys, monkeypatch):
    """--segment N: the text goes in pieces of at most N tokens, each from a fresh cache (a model
    trained on short windows is scored where it was trained); 0 is refused in one line."""
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(80)))
    fresh = []
    real = Decoding.__init__
    monkeypatch.setattr(Decoding, "__init__", lambda self, model: (fresh.append(1), real(self, model))[1])
    base = ["eval-predictors", "--model", str(model_dir), "--text", str(text), "--predictors", "next-gate", "--max-tokens", "40",
            "--json", "--no-progress"]  # fmt: skip
    assert main([*base, "--segment", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 40 and len(fresh) == 3  # 16 + 16 + 8
    assert main([*base, "--segment", "0"]) == 1
    err = capsys.readouterr().err
    assert "--segment" in err and err.count("\n") == 1


def test_eval_predictors_json(model_dir, tmp_path, capsys):
    text = tmp_path / "heldout.txt"
    g = torch.Generator().manual_seed(7)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(len(WORDS), (60,), generator=g).tolist()))
    rc = main(["eval-predictors", "--model", str(model_dir), "--text", str(text), "--depth", "1,2", "--max-tokens", "30", "--json", "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 30 and report["skipped"] == []
    rows = {(r["predictor"], r["depth"]): r for r in report["results"]}
    assert set(rows) == {(p, d) for p in ("next-gate", "default-vector", "estimator", "learned", "history", "pregate")
                         for d in (1, 2)} | {("pregate", 0)}  # fmt: skip
    every = rows.pop(("pregate", 0))  # the pre-gate's guesses of every layer, before the first one
    assert every["pairs"] == 30 * 4 and all(v is not None for v in every["per_layer_recall"])
    assert every["per_layer_recall"][2:] == rows[("pregate", 2)]["per_layer_recall"][2:]  # the same guesses
    for (name, d), r in rows.items():
        assert set(r) >= {"predictor", "depth", "precision", "recall", "per_layer_recall"}
        assert len(r["per_layer_recall"]) == 4
        assert r["per_layer_recall"][:d] == [None] * d  # nothing predicts the first d layers
        assert all(v is not None and 0 <= v <= 1 for v in r["per_layer_recall"][d:])
        assert r["pairs"] == 30 * (4 - d) or name == "history"  # history has no guess before it has seen a token
        assert 0 <= r["recall"] <= 1
    assert rows[("next-gate", 1)]["precision"] == rows[("next-gate", 1)]["recall"]  # k guesses for k routed


def test_prefetch_benchmark_report_structure():
    """benchmarks/prefetch.py: rows aggregate rounds by median, ratios per round, and the markdown
    table is a view of the JSON report (the benchmark itself is run by hand, not timed here)."""
    import importlib.util
    import sys
    from dataclasses import asdict
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_prefetch", Path(__file__).parents[2] / "benchmarks" / "prefetch.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while the file executes
    spec.loader.exec_module(bench)

    def run(seconds, issued, used):
        stats = {"hit_rate": 0.5, "bytes_read": 3 << 20, "stall_seconds": 0.1, "peak_rss_bytes": 100 << 20, "lookups": 10,
                 "prefetch_issued": issued, "prefetch_used": used, "prefetch_wasted": issued - used, "prefetch_cancelled": 0,
                 "expert_bytes": 1 << 20, "layers": {"1": {"lookups": 10, "prefetch_issued": issued, "prefetch_used": used}}}  # fmt: skip
        from expertcache.tools.predictor_eval import prefetch_metrics

        return {"seconds": seconds, "stats": stats, "metrics": prefetch_metrics(stats)}

    none = [run(0.010, 0, 0), run(0.012, 0, 0), run(0.011, 0, 0)]
    guess = [run(0.006, 4, 3), run(0.009, 4, 3), run(0.011, 4, 2)]
    ratios = [g["seconds"] / n["seconds"] for g, n in zip(guess, none)]
    row = bench._row("decode", "50%", "next-gate", 1, guess, ratios)
    assert row.seconds == 0.009 and row.ratio_vs_none == pytest.approx(0.75)
    assert row.precision == 0.75 and row.wasted_mib == 1.0 and row.useful_mib == 3.0
    assert row.layers["1"]["precision"] == 0.5  # the last round's per-layer figures
    base = bench._row("decode", "50%", "none", 1, none, [1.0, 1.0, 1.0])
    rep = bench.Report(model="m", tokens=8, prefill_tokens=16, rounds=3, depths=[1], io="direct", torch_threads=1,
                       decode=[base, row], prefill=[base, row], best_decode_50={"prefetch": "next-gate", "depth": 1, "ratio": 0.75},
                       decode_bound_50=0.7, decode_bound_50_rounds=[0.8, 0.7, 0.6], prefill_ratio={"50%": 0.75}, prefill_bound={"50%": 0.6},
                       targets={"decode_50_at_most_0.8": True, "prefill_at_most_0.8": {"50%": True}}, seconds=1.0)  # fmt: skip
    assert json.loads(json.dumps(asdict(rep)))["decode"][1]["prefetch"] == "next-gate"
    md = bench.markdown(rep)
    assert "| 50% | next-gate | 1 | 9.00 | 0.75 |" in md
    assert "at 0.75 x none (target <= 0.8: met); all experts resident: 0.70 x none" in md
    assert "Per round, best / none: 0.60, 0.75, 1.00; all resident / none: 0.80, 0.70, 0.60; none's stall per token (ms): 12.5, 12.5, 12.5." in md
    assert "Prefill at 50% with pipelining: 0.75 x none (target <= 0.8: met); all experts resident: 0.60 x none" in md


# --- pregate (Read-ME) -----------------------------------------------------------------------------
def test_pregate_window_continues_across_decode_steps():
    """A prompt's features in one call equal the same tokens fed one by one (each step continuing
    the window of the step before), and a new prompt starts a fresh window."""
    net = PregateNet(hidden=16, window=3, layers=4, experts=8, width=8, decays=(0.5, 0.9))
    emb = torch.randn(1, 7, 16)
    whole, _ = net.features(emb)
    assert whole.shape == (7, (3 + 2) * 16)
    state, rows = None, []
    for t in range(7):
        f, state = net.features(emb[:, t : t + 1], state)
        rows.append(f)
    torch.testing.assert_close(torch.cat(rows), whole)
    assert whole[0, 16:48].abs().sum() == 0  # the first token has nothing before it in the window
    x = emb[0] * torch.rsqrt(emb[0].pow(2).mean(-1, keepdim=True) + 1e-6)
    avg = sum(0.1 * 0.9 ** (6 - i) * x[i] for i in range(7))  # the slow moving average at the last token
    torch.testing.assert_close(whole[6, 64:], avg)
    pred = PregatePredictor(net, [0, 1, 2, 3], top_k=2, depth=2)
    pred.start(emb[:, :3])
    one = pred.start(emb[:, 3:4])  # a decode step continues that window
    torch.testing.assert_close(pred.scores(emb[:, 4:5]), net(whole[4:5]))
    assert [l for l, _ in one] == [0, 1, 2, 3] and all(len(g) == 2 for _, g in one)
    assert pred.predict(1, None, None) == [(2, pred.guesses[2]), (3, pred.guesses[3])]


def test_attention_pregate_decode_steps_score_as_the_whole_sequence():
    """With causal attention, scoring a prompt in one call equals feeding it in pieces (a prompt,
    then one-token decode steps) whose key/value cache carries on; attention sees no later token;
    a span-limited cache scores as the full sequence would; and the attention changes the scores."""
    torch.manual_seed(0)
    net = PregateNet(hidden=16, window=3, layers=4, experts=8, width=8, decays=(0.9,), attn=8, heads=2)
    torch.nn.init.normal_(net.fc2.weight)
    emb = torch.randn(1, 9, 16)
    whole, _ = net.score(emb)
    s, state = net.score(emb[:, :4])
    rows = [s]
    for t in range(4, 9):
        s, state = net.score(emb[:, t : t + 1], state)
        rows.append(s)
    torch.testing.assert_close(torch.cat(rows), whole)
    changed = emb.clone()
    changed[:, 6:] += 1.0
    torch.testing.assert_close(net.score(changed)[0][:6], whole[:6])  # causal
    assert not torch.allclose(net.score(changed)[0][6:], whole[6:])
    bare = PregateNet(hidden=16, window=3, layers=4, experts=8, width=8, decays=(0.9,))
    bare.load_state_dict({k: (v[:, : bare.fc1.in_features] if k == "fc1.weight" else v)
                          for k, v in net.state_dict().items() if not k.startswith("qkv")})
    assert not torch.allclose(bare.score(emb)[0], whole)
    short = PregateNet(hidden=16, window=3, layers=4, experts=8, width=8, decays=(0.9,), attn=8, heads=2, span=3)
    short.load_state_dict(net.state_dict())  # a cache that keeps 2 tokens: step by step equals the whole sequence's masked attention
    whole3, _ = short.score(emb)
    state, rows = None, []
    for t in range(9):
        s, state = short.score(emb[:, t : t + 1], state)
        rows.append(s)
        assert state[2][0].shape[2] <= 2
    torch.testing.assert_close(torch.cat(rows), whole3)
    assert not torch.allclose(whole3, whole)
    with pytest.raises(ValueError, match="multiple of 4 heads"):
        PregateNet(hidden=16, window=3, layers=4, experts=8, attn=6)


@pytest.mark.parametrize("attn, decays, window, rows", [(0, (0.5, 0.9), 3, 1), (0, (), 1, 3), (8, (0.9,), 2, 2)])
def test_fused_pregate_decode_step_scores_as_torch(attn, decays, window, rows):
    """A decode step runs as one native call (kernels.pregate_step) where the kernels are built, and
    scores (and leaves the window, averages and attention cache) as the network's torch ops do,
    within float32 rounding; several sequences at once as each alone; never where gradients flow."""
    from expertcache import kernels

    if not kernels.available():
        pytest.skip("expertcache's CPU kernels are not built here (no compiler, or EXPERTCACHE_KERNELS=torch)")
    torch.manual_seed(0)
    net = PregateNet(hidden=40, window=window, layers=3, experts=8, width=24, decays=decays, attn=attn, heads=2 if attn else 4)
    torch.nn.init.normal_(net.fc2.weight)
    emb = torch.randn(rows, 9, 40, dtype=torch.bfloat16)

    def run(x):  # the first 4 tokens as a prompt, then one decode step each
        s, state = net.score(x[:, :4])
        out = [s.view(x.shape[0], 4, 3, 8)]
        for t in range(4, 9):
            s, state = net.score(x[:, t : t + 1], state)
            out.append(s.view(x.shape[0], 1, 3, 8))
        return torch.cat(out, 1), state

    calls = []
    step = torch.ops.expertcache.pregate_step
    with mock.patch.object(torch.ops.expertcache, "pregate_step", lambda *a: calls.append(1) or step(*a)):
        with torch.no_grad():
            fused, state = run(emb)
            assert len(calls) == 5  # the prompt through torch, each decode step fused
            alone, _ = run(emb[-1:])
            net._native = False
            ref, ref_state = run(emb)
        assert len(calls) == 10
        torch.testing.assert_close(fused, ref)
        torch.testing.assert_close(alone, fused[-1:])
        for got, want in zip(state, ref_state):
            if got is not None:
                torch.testing.assert_close(got, want)
        net._native = None
        s, _ = net.score(emb[:, 4:5], state)  # gradients wanted (training): torch's ops
        assert s.requires_grad and len(calls) == 10


def test_pregate_guesses_every_layer_before_the_first_one_runs(model_dir):
    events = []
    with expertcache.load(model_dir, expert_budget="50%", prefetch="pregate", io="buffered") as eng:
        with eng.observe(on_route=lambda layer, *a: events.append(("route", layer)),
                         on_guess=lambda layer, g: events.append(("guess", layer))):  # fmt: skip
            eng.generate(PROMPT[:5], max_new_tokens=3, stop_at_eos=False)
        assert set(eng.runtime.predictions) == {0, 1, 2, 3}  # every layer's guess, from the embeddings
    starts = [i for i, e in enumerate(events) if e == ("route", 0)]
    ends = [i for i, e in enumerate(events) if e == ("route", 3)]
    assert len(starts) == len(ends) == 3
    for end, start in zip(ends, starts[1:]):  # each decode step: the first layer's guess between forwards
        assert ("guess", 0) in events[end + 1 : start]


def test_pregate_is_trained_from_text_not_from_a_trace(model_dir, tmp_path, capsys):
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        with Recorder(eng, logits=True, hidden_states=True) as rec:
            eng.generate(PROMPT, max_new_tokens=2, stop_at_eos=False)
        path = rec.trace.save(tmp_path / "t.npz")
    rc = main(["train-predictor", "--kind", "pregate", "--model", str(model_dir), "--trace", str(path), "--out", str(tmp_path / "p.pt")])
    assert rc == 1 and "--text" in capsys.readouterr().err
    text = _word_text(tmp_path / "cal.txt", 300, seed=3)
    rc = main(["train-predictor", "--kind", "pregate", "--model", str(model_dir), "--text", str(text), "--max-tokens", "300",
               "--steps", "30", "--out", str(tmp_path / "p.pt"), "--no-progress"])  # fmt: skip
    assert rc == 0 and "every layer at once" in capsys.readouterr().out
    art = Artefact.load(tmp_path / "p.pt")
    assert art.kind == "pregate" and art.meta["window"] == 4 and art.meta["decays"] == [0.8, 0.95] and set(art.meta["validation"]) == {"l0", "l1", "l2", "l3"}
    assert art.meta["attn"] == 0
    base = ["train-predictor", "--kind", "pregate", "--model", str(model_dir), "--text", str(text), "--max-tokens", "300",
            "--steps", "30", "--no-progress"]  # fmt: skip
    assert main([*base, "--attn", "8", "--out", str(tmp_path / "a.pt")]) == 0  # with causal attention: trained on whole forwards
    capsys.readouterr()
    art = Artefact.load(tmp_path / "a.pt")
    assert art.meta["attn"] == 8 and art.tensors["qkv.weight"].shape[0] == 3 * 8
    with expertcache.load(model_dir, expert_budget="50%", prefetch="pregate", io="buffered", predictor=str(tmp_path / "a.pt")) as eng:
        assert len(eng.generate(PROMPT[:6], max_new_tokens=3, stop_at_eos=False).token_ids) == 3
        assert eng.runtime.predictor.net.attn == 8
    assert main([*base, "--attn", "6", "--out", str(tmp_path / "b.pt")]) == 1
    err = capsys.readouterr().err
    assert "multiple of 4" in err and err.count("\n") == 1


def test_pregate_trains_on_from_a_given_file(model_dir, tmp_path, capsys):
    """--init: training starts from the file's network (its shape kept: no --attn needed), the file
    itself is left alone; refused for other kinds, missing files, a zero rate, another shape asked
    for and files for another model, each in one line, writing nothing."""
    text = _word_text(tmp_path / "cal.txt", 300, seed=3)
    base = ["train-predictor", "--kind", "pregate", "--model", str(model_dir), "--text", str(text), "--max-tokens", "300",
            "--no-progress"]  # fmt: skip
    assert main([*base, "--steps", "30", "--attn", "8", "--out", str(tmp_path / "a.pt")]) == 0
    first = Artefact.load(tmp_path / "a.pt")
    before = (tmp_path / "a.pt").read_bytes()
    assert main([*base, "--steps", "1", "--lr", "1e-9", "--init", str(tmp_path / "a.pt"), "--out", str(tmp_path / "b.pt")]) == 0
    capsys.readouterr()
    on = Artefact.load(tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == before
    assert on.meta["attn"] == 8 and on.meta["init"] == str(tmp_path / "a.pt") and set(on.tensors) == set(first.tensors)
    for k, v in first.tensors.items():  # a step at a negligible rate: the same network (not a fresh one)
        torch.testing.assert_close(on.tensors[k], v, atol=1e-6, rtol=0)
    for args, words in [(["--kind", "learned"], "--kind pregate"), (["--init", str(tmp_path / "none.pt")], "no such file"),
                        (["--lr", "0"], "positive learning rate"), (["--attn", "16"], "keeps its shape"),
                        (["--width", "64"], "keeps its shape")]:  # fmt: skip
        capsys.readouterr()
        rc = main([*base, "--init", str(tmp_path / "a.pt"), *args, "--out", str(tmp_path / "d.pt")])  # the last of a flag counts
        err = capsys.readouterr().err
        assert rc == 1 and words in err and err.count("\n") == 1, err
    other = first.tensors.copy()
    Artefact(kind="pregate", model="x", sparse_layers=[0, 1], num_experts=first.num_experts, hidden_size=first.hidden_size,
             top_k=first.top_k, depths=[], tensors=other, meta=dict(first.meta)).save(tmp_path / "other.pt")
    capsys.readouterr()
    assert main([*base, "--init", str(tmp_path / "other.pt"), "--out", str(tmp_path / "d.pt")]) == 1
    err = capsys.readouterr().err
    assert "another model" in err and err.count("\n") == 1
    assert not (tmp_path / "d.pt").exists()


def test_routing_by_the_pregate_uses_its_choices_and_requests_the_step_ahead(model_dir):
    """--routing pregate: each layer runs the experts the pre-gate chose per token before the first
    layer (weights: the router's softmax over them), and the whole step's experts were requested
    before its first layer; without --prefetch pregate it is refused."""
    routed, requested = [], []
    with expertcache.load(model_dir, expert_budget="100%", prefetch="pregate", routing="pregate", io="buffered") as eng:
        pred = eng.runtime.predictor

        def on_route(layer, x, logits, weights, ids):
            routed.append((layer, ids.clone(), pred.routes[layer].clone()))

        with eng.observe(on_route=on_route, on_guess=lambda layer, g: requested.append([t for t, _ in g])):
            eng.generate(PROMPT[:6], max_new_tokens=4, stop_at_eos=False)
    assert len(routed) == 4 * 4
    for layer, ids, pregated in routed:
        assert [set(r) for r in ids.tolist()] == [set(r) for r in pregated.tolist()]
    assert [0, 1, 2, 3] in requested  # a step's every layer, requested at once
    with pytest.raises(ExpertCacheError, match="--prefetch pregate"):
        expertcache.load(model_dir, expert_budget="100%", prefetch="next-gate", routing="pregate")


def _strong_pregate(model_dir, path, attn=0):
    """A random pre-gate whose context decides its routing (fc2 not near zero), saved at `path`."""
    from expertcache.checkpoint import Checkpoint

    ck = Checkpoint.open(model_dir)
    layers, hidden = list(ck.sparse_layers), ck.config.hidden_size
    torch.manual_seed(1)
    net = PregateNet(hidden, 4, len(layers), ck.num_experts, width=16, decays=(0.8, 0.95), attn=attn)
    torch.nn.init.normal_(net.fc2.weight, std=3.0)
    return Artefact(kind="pregate", model=str(model_dir), sparse_layers=layers, num_experts=ck.num_experts, hidden_size=hidden,
                    top_k=ck.top_k, depths=[], tensors=net.state_dict(),
                    meta={"window": 4, "decays": [0.8, 0.95], "attn": attn, "heads": 4}).save(path)  # fmt: skip


@pytest.mark.parametrize("attn", [0, 8])
def test_a_new_sequence_starts_the_pregate_afresh_even_from_one_token(model_dir, tmp_path, attn):
    """Routing by the pre-gate: a one-token prompt is a new sequence (position 0), not a decode
    step of the one before: its routing is the same after another generate as in a fresh engine;
    and a prompt fed in two chunks routes as fed in one (the second chunk continues, position 5)."""
    path = _strong_pregate(model_dir, tmp_path / "pg.pt", attn)
    kw = dict(expert_budget="100%", prefetch="pregate", routing="pregate", io="buffered", predictor=str(path))

    def first_routes(eng, prompt):
        seen = {}
        with eng.observe(on_route=lambda layer, x, lg, w, ids: seen.setdefault(layer, ids.tolist())):
            out = eng.generate(prompt, max_new_tokens=4, stop_at_eos=False).token_ids
        return seen, out

    with expertcache.load(model_dir, **kw) as eng:
        fresh = first_routes(eng, PROMPT[7:8])
    with expertcache.load(model_dir, **kw) as eng:
        eng.generate(PROMPT[:7], max_new_tokens=5, stop_at_eos=False)
        after = first_routes(eng, PROMPT[7:8])
        continued = eng.runtime.predictor.scores(eng.model.get_input_embeddings()(torch.tensor([PROMPT[8:9]])))
    assert after == fresh
    with expertcache.load(model_dir, **kw) as eng:  # the check can fail: a continued context scores differently
        alone = eng.runtime.predictor.scores(eng.model.get_input_embeddings()(torch.tensor([PROMPT[8:9]])))
    assert not torch.allclose(continued, alone)

    def routes(eng, *pieces):  # each layer's routing of every token, fed in these pieces of one sequence
        seen = {}
        with eng.observe(on_route=lambda layer, x, lg, w, ids: seen.setdefault(layer, []).extend(ids.tolist())):
            d = Decoding(eng.model)
            for piece in pieces:
                d.feed(piece)
        return seen

    with expertcache.load(model_dir, **kw) as eng:  # a prompt's next chunk continues its context, as one call would
        assert routes(eng, PROMPT[:5], PROMPT[5:12]) == routes(eng, PROMPT[:12])


def test_pregate_routing_orders_by_the_router_and_mixes_its_softmax():
    from expertcache.routing import PregateRouting, WeightRule

    rule = WeightRule(renormalize=True, in_logits_dtype=False)
    chosen = torch.tensor([[3, 1], [0, 2]])
    policy = PregateRouting(pregated=lambda layer: chosen, rule=rule)
    logits = torch.tensor([[0.0, 2.0, 0.5, 1.0], [3.0, 0.0, 1.0, 5.0]])
    ids0 = logits.topk(2).indices
    w, ids = policy.select(0, logits, rule.mix(logits, ids0), ids0)
    assert ids.tolist() == [[1, 3], [0, 2]]  # router order inside the pre-gate's set
    torch.testing.assert_close(w, rule.mix(logits, ids))
    same = PregateRouting(pregated=lambda layer: ids0, rule=rule)
    w0 = rule.mix(logits, ids0)
    assert same.select(0, logits, w0, ids0)[0] is w0  # agreeing with the router: the model's own weights
    assert PregateRouting(pregated=lambda layer: None, rule=rule).select(0, logits, w0, ids0)[1] is ids0


def test_expert_aware_scheduler_reads_a_waiting_prompts_routing_from_the_pregate(model_dir):
    """With a pre-gate, a queued request's footprint is the pre-gate's routing of its prompt tail,
    known before it runs (not a table of what its token ids routed to last time); also behind
    --prefetch-max (the capped predictor passes the pre-gate through)."""
    from expertcache.serve.scheduler import ExpertAware

    prompt = PROMPT[:20]
    with expertcache.load(model_dir, expert_budget="50%", prefetch="pregate", prefetch_max=1, io="buffered") as eng:
        sched = ExpertAware()
        sched.batcher = types.SimpleNamespace(engine=eng)
        got = sched.footprint(prompt)
        pred = eng.runtime.predictor
        pred.reset()
        with torch.no_grad():
            pred.start(eng.model.get_input_embeddings()(torch.tensor([prompt[-16:]])))
        assert got == {l: set(r.flatten().tolist()) for l, r in pred.routes.items()}
        assert sched.table == {}  # nothing learned from routing: the pre-gate knew
