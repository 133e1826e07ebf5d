"""Continuous batching (serve/batcher.py) in process: a request's greedy tokens are the same alone
and in a batch, whoever joins or leaves around it; padding loads nothing; rows and their KV cache
go when requests end or are cancelled; the queue is bounded; expert-aware admission never starves."""

from __future__ import annotations

import time

import pytest
import torch

import expertcache
from expertcache.serve.batcher import Batcher, QueueFull, Request, batchable
from expertcache.serve.scheduler import ExpertAware, FCFS, make_scheduler
from helpers.checkpoints import FAMILY_CASES, prompt_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_LENGTHS = (5, 17, 9, 30, 3, 12)


def run_all(b: Batcher, limit: int = 10_000) -> None:
    for _ in range(limit):
        if b.idle():
            return
        b.turn()
    raise AssertionError("the batcher did not finish")


def request(prompt, max_tokens, **kw) -> Request:
    return Request(prompt=list(prompt), max_tokens=max_tokens, emit=lambda token, finish: None, **kw)


@pytest.mark.parametrize("family,budget", [("mixtral", "100%"), ("mixtral", "25%"), ("qwen3_moe", "50%")])
def test_batched_greedy_tokens_equal_each_request_alone(checkpoint, family, budget):
    """Six requests with prompts of different lengths, joining in three waves (so rows join a
    running batch, prefill in chunks beside decoding rows, and leave at different lengths):
    each one's tokens equal Engine.generate's for its prompt alone (float32: the batched
    kernels' rounding stays far below any greedy margin here)."""
    model_dir = checkpoint(family, num_experts=8 if family == "mixtral" else 16, top_k=2 if family == "mixtral" else 3)
    prompts = [prompt_ids(n, seed=n) for n in PROMPT_LENGTHS]
    max_tokens = [12, 6, 15, 9, 20, 4]
    with expertcache.load(model_dir, expert_budget=budget, io="buffered", dtype="float32") as eng:
        alone = [eng.generate(p, max_new_tokens=m, stop_at_eos=False).token_ids for p, m in zip(prompts, max_tokens)]
        b = Batcher(eng, max_batch=4, prefill_chunk=4)
        b.eos = set()
        reqs = [request(p, m) for p, m in zip(prompts, max_tokens)]
        for r in reqs[:2]:
            b.submit(r)
        b.turn()
        b.turn()
        for r in reqs[2:4]:
            b.submit(r)
        b.turn()
        for r in reqs[4:]:
            b.submit(r)
        steps = []
        b.on_step = steps.append
        run_all(b)
    assert [r.out for r in reqs] == alone
    assert all(r.finish_reason == "length" for r in reqs)
    assert max(s["batch"] for s in steps) == 4  # the batch did fill
    assert any(s["prefill_tokens"] and s["batch"] > 1 for s in steps)  # prompts went in beside decoding rows
    assert b.past is None and b.mask is None and not b.rows  # every row and its cache gone


def test_a_lone_request_is_fed_as_generate_feeds_it(checkpoint):
    """bfloat16, where batched kernels round differently: a request alone takes generate's own
    forwards (the prompt whole, then a token at a time), so its tokens match bit for bit."""
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2, dtype=torch.bfloat16)
    prompt = prompt_ids(23, seed=7)
    with expertcache.load(model_dir, expert_budget="50%", io="buffered") as eng:
        want = eng.generate(prompt, max_new_tokens=16, stop_at_eos=False).token_ids
        b = Batcher(eng, max_batch=4, prefill_chunk=4)
        b.eos = set()
        r = request(prompt, 16)
        b.submit(r)
        steps = []
        b.on_step = steps.append
        run_all(b)
    assert r.out == want
    assert steps[0]["prefill_tokens"] == 23  # whole, not in chunks of 4: nothing else was running


def test_a_decode_step_looks_each_expert_up_once_for_the_whole_batch(checkpoint):
    """Four rows decode in one [4, 1] forward: each layer looks up each distinct expert its rows
    chose once (the rows share its load), fewer lookups than four one-row steps make."""
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    with expertcache.load(model_dir, expert_budget="100%", io="buffered", prefetch="none") as eng:
        b = Batcher(eng, max_batch=4)
        b.eos = set()
        for i in range(4):
            b.submit(request(prompt_ids(5 + i, seed=i), 8))
        while len(b.rows) < 4:
            b.turn()
        seen = []
        eng.reset_stats()
        with eng.observe(on_route=lambda layer, x, logits, w, ids: seen.append(ids.clone())):
            b.turn()  # one decode step, nothing to prefill
    assert all(ids.shape == (4, 2) for ids in seen)
    distinct = sum(len(set(ids.flatten().tolist())) for ids in seen)
    assert eng.stats()["lookups"] == distinct < 4 * 2 * len(seen)


@pytest.mark.parametrize("family,chunk", [("mixtral", 128), ("mixtral", 4), ("qwen2_moe", 4), ("olmoe", 4), ("glm4_moe", 4)])
def test_a_prompt_goes_in_through_the_rows_decode_step(checkpoint, family, chunk):
    """Two rows decoding and a 9-token prompt admitted: each turn is ONE forward (every layer's
    experts called once, on the rows' tokens and the prompt's next `chunk` tokens together, each
    distinct expert looked up once: the step and the prompt share their loads); the prompt's row
    joins the batch once its last token is in, and every request's tokens are its own alone
    (families whose attention the chunk's own module runs: OLMoE's clip, GLM's partial rotary;
    Qwen2-MoE's block with its shared expert)."""
    case = FAMILY_CASES[family]
    model_dir = checkpoint(family, **case)
    k = case["top_k"]
    prompts = [prompt_ids(6, seed=1), prompt_ids(7, seed=2), prompt_ids(9, seed=3)]
    with expertcache.load(model_dir, expert_budget="50%", io="buffered", dtype="float32") as eng:
        alone = [eng.generate(p, max_new_tokens=8, stop_at_eos=False).token_ids for p in prompts]
        b = Batcher(eng, max_batch=4, prefill_chunk=chunk)
        b.eos = set()
        reqs = [request(p, 8) for p in prompts]
        for r in reqs[:2]:
            b.submit(r)
        b.turn()
        assert b.rows == reqs[:2]
        b.submit(reqs[2])
        layers = len(eng.checkpoint.sparse_layers)
        for fed in range(chunk, 9 + chunk, chunk):
            seen = []
            eng.reset_stats()
            with eng.observe(on_route=lambda layer, x, logits, w, ids: seen.append((layer, ids.clone()))):
                b.turn()
            n = min(fed, 9) - (fed - chunk)  # the prompt's tokens this turn
            assert [layer for layer, _ in seen] == eng.checkpoint.sparse_layers  # one call a layer: one forward
            assert all(ids.shape == (2 + n, k) for _, ids in seen)
            assert eng.stats()["lookups"] == sum(len(set(ids.flatten().tolist())) for _, ids in seen) < layers * (2 + n) * k
            assert reqs[2].fed == min(fed, 9)
            assert (reqs[2] in b.rows) == (fed >= 9) and len(reqs[2].out) == (fed >= 9)
        run_all(b)
    assert [r.out for r in reqs] == alone


def test_prompts_that_arrive_together_go_in_one_forward_and_padding_routes_nowhere(checkpoint):
    """Three prompts of 4, 9 and 6 tokens admitted together with nothing decoding: one [3, 9]
    forward, whose padding positions are dropped slots (-1) for the experts."""
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    seen = []
    with expertcache.load(model_dir, expert_budget="100%", io="buffered", prefetch="none") as eng:
        b = Batcher(eng, max_batch=4)
        b.eos = set()
        for n in (4, 9, 6):
            b.submit(request(prompt_ids(n, seed=n), 8))
        with eng.observe(on_route=lambda layer, x, logits, w, ids: seen.append(ids.clone())):
            b.turn()
        assert len(b.rows) == 3 and b.mask.tolist() == [[0] * 5 + [1] * 4, [1] * 9, [0] * 3 + [1] * 6]
    ids = seen[0].reshape(3, 9, 2)
    assert (ids[0, :5] == -1).all() and (ids[2, :3] == -1).all()
    assert (ids[0, 5:] >= 0).all() and (ids[1] >= 0).all() and (ids[2, 3:] >= 0).all()


def test_cancel_frees_the_row_and_its_cache(checkpoint):
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    ended = {}
    with expertcache.load(model_dir, expert_budget="100%", io="buffered") as eng:
        b = Batcher(eng, max_batch=4)
        b.eos = set()
        reqs = [Request(prompt=prompt_ids(6 + i, seed=i), max_tokens=50, emit=lambda t, f, i=i: ended.__setitem__(i, f) if f else None)
                for i in range(3)]
        for r in reqs:
            b.submit(r)
        for _ in range(6):
            b.turn()
        assert len(b.rows) == 3
        kv_three = b.kv_bytes()
        b.cancel(reqs[1])
        b.turn()
        assert reqs[1] not in b.rows and ended[1] == "cancelled"
        assert b.mask.shape[0] == 2 and all(layer.keys.shape[0] == 2 for layer in b.past.layers)
        assert b.kv_bytes() < kv_three
        for r in (reqs[0], reqs[2]):
            b.cancel(r)
        b.turn()
    assert b.past is None and b.kv_bytes() == 0 and ended == {0: "cancelled", 1: "cancelled", 2: "cancelled"}


def test_queue_is_bounded_and_kv_budget_holds_back_admission(checkpoint):
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    with expertcache.load(model_dir, expert_budget="100%", io="buffered") as eng:
        b = Batcher(eng, max_batch=2, max_queue=2)
        for _ in range(4):  # two for the empty batch's rows, two to wait
            b.submit(request([1, 2, 3], 4))
        with pytest.raises(QueueFull):
            b.submit(request([1, 2, 3], 4))
        b.turn()  # two admitted: the two waiting fill the queue
        with pytest.raises(QueueFull):
            b.submit(request([1, 2, 3], 4))
        none_wait = Batcher(eng, max_batch=1, max_queue=0)  # --max-queue 0: a free row still takes one
        none_wait.submit(request([1, 2, 3], 4))
        with pytest.raises(QueueFull):
            none_wait.submit(request([1, 2, 3], 4))
        # room for one request of 3 + 60 tokens and not two: the second waits for the first to end
        b2 = Batcher(eng, max_batch=4, kv_budget_bytes=int(1.5 * 63 * b.kv_per_token))
        b2.eos = set()
        first, second = request([1, 2, 3], 60), request([4, 5, 6], 60)
        b2.submit(first)
        b2.submit(second)
        most = 0
        while not b2.idle():
            b2.turn()
            most = max(most, len(b2.rows))
            assert b2.kv_bytes() <= b2.kv_budget_bytes
    assert most == 1 and len(first.out) == len(second.out) == 60


def test_expert_aware_admission_prefers_resident_experts_and_never_starves(checkpoint):
    """One request's tokens are known to the lookahead table and its experts resident; an older
    request's are unknown. Expert-aware admission takes the known ones first, until the old one
    has been passed over max_skips times; FCFS keeps arrival order."""
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    warm = prompt_ids(8, seed=3)
    cold = [t for t in prompt_ids(8, seed=100) if t not in warm]
    orders = {}
    for scheduler in (ExpertAware(max_skips=2, max_wait=1e9), FCFS()):
        with expertcache.load(model_dir, expert_budget="25%", io="buffered", prefetch="none") as eng:
            b = Batcher(eng, max_batch=1, scheduler=scheduler)
            b.submit(request(warm, 2))
            run_all(b)  # the table learns warm's tokens; its experts are resident
            if isinstance(scheduler, ExpertAware):
                assert scheduler.score(request(warm, 1), eng.cache.holding) > 0
                assert scheduler.score(request(cold, 1), eng.cache.holding) == 0
            reqs = {"old": request(cold, 1), "w1": request(warm, 1), "w2": request(warm, 1), "w3": request(warm, 1)}
            for r in reqs.values():
                b.submit(r)
            run_all(b)
            orders[scheduler.name] = sorted(reqs, key=lambda k: reqs[k].first_token)
    assert orders == {"expert-aware": ["w1", "w2", "old", "w3"], "fcfs": ["old", "w1", "w2", "w3"]}


def test_expert_aware_holds_free_rows_only_where_prompts_cannot_join_the_decode_step(checkpoint):
    """With rows decoding and free rows, expert-aware admission takes waiting requests at once
    when their prompts go in through the rows' step (they share that step's pass over the
    experts); where prompts get forwards of their own (a --miss-copy, a pre-gate bound to the rows:
    here _mixes is made to say so), it holds the rows until a group is free."""
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    held = {}
    for mixes in (True, False):
        with expertcache.load(model_dir, expert_budget="50%", io="buffered", prefetch="none") as eng:
            b = Batcher(eng, max_batch=8, scheduler=ExpertAware(max_hold=1e9))
            for i in range(7):
                b.submit(request(prompt_ids(6, seed=i), 40))
            b.turn()  # the seven go in together (nothing decodes yet)
            assert len(b.rows) == 7 and b._mixes()
            if not mixes:
                b._mixes = lambda: False
            for i in range(3):
                b.submit(request(prompt_ids(6, seed=10 + i), 4))
            b.turn()
            held[mixes] = len(b.waiting) == 3
    assert held == {True: False, False: True}


def test_schedulers_by_name():
    assert isinstance(make_scheduler("fcfs"), FCFS) and isinstance(make_scheduler("expert-aware"), ExpertAware)
    with pytest.raises(ValueError, match="fcfs or expert-aware"):
        make_scheduler("random")


def test_caches_that_cannot_be_padded_run_one_request_at_a_time(checkpoint):
    with expertcache.load(checkpoint("mixtral", num_experts=8, top_k=2), expert_budget="100%", io="buffered") as eng:
        assert batchable(eng)
    model_dir = checkpoint("minimax", num_experts=8, top_k=2, expert_intermediate=32, num_layers=4,
                           layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
    with expertcache.load(model_dir, expert_budget="100%", io="buffered") as eng:
        assert not batchable(eng)


def test_incremental_detokenizing_equals_decoding_the_whole():
    """The server's text of a stream, decoded a token at a time, is the tokenizer's decode of all
    its tokens at every step (up to a character still incomplete), on text with multi-byte
    characters and spaces."""
    from transformers import AutoTokenizer

    from expertcache.config import DEMO_DIR
    from expertcache.serve.bridge import Detokenizer

    tok = AutoTokenizer.from_pretrained(str(DEMO_DIR))
    ids = tok.encode("Once upon a time, Zoë saw a café — naïve, über-cool ☃ snowmen. «Bonjour!» 東京 and then  two  spaces.")
    ids += [ids[5], ids[9]] + tok.encode("ünïcödé ✓") * 3
    d = Detokenizer(tok)
    for n in range(1, len(ids) + 1):
        got, want = d.decode(ids[:n]), tok.decode(ids[:n])
        assert got.rstrip("\ufffd") == want.rstrip("\ufffd"), n
    assert d.decode(ids) == tok.decode(ids)
    assert Detokenizer(None).decode([3, 1, 4]) == "3 1 4"


def test_bfloat16_batched_logits_stay_within_the_dtypes_rounding_of_each_request_alone(checkpoint):
    """bfloat16 batches round differently from one row: every step's logits of each request in a
    batch of four (joining at different times, prompts of different lengths) are within a few
    bf16 units of the same request's logits alone (teacher-forced on the batch's own tokens)."""
    from expertcache.decoding import Decoding

    model_dir = checkpoint("mixtral", num_experts=8, top_k=2, dtype=torch.bfloat16)
    prompts = [prompt_ids(n, seed=n) for n in (5, 17, 9, 30)]
    seen: dict[int, list[torch.Tensor]] = {}
    with expertcache.load(model_dir, expert_budget="50%", io="buffered") as eng:
        b = Batcher(eng, max_batch=4, prefill_chunk=4)
        b.eos = set()
        pick = b._pick
        b._pick = lambda r, logits: seen.setdefault(id(r), []).append(logits.float().clone()) or pick(r, logits)
        reqs = [request(p, 10) for p in prompts]
        b.submit(reqs[0])
        b.turn()
        for r in reqs[1:]:
            b.submit(r)
        run_all(b)
        worst = 0.0
        with torch.inference_mode():
            for r in reqs:
                d = Decoding(eng.model)
                alone = [d.feed(r.prompt)[-1].float()] + [d.feed([t])[-1].float() for t in r.out[:-1]]
                for got, want in zip(seen[id(r)], alone, strict=True):
                    scale = want.abs().max()
                    worst = max(worst, float((got - want).abs().max() / scale))
    assert worst < 2**-5  # measured here: 0.0075 (two units of bf16's 2^-8 at the largest logit)


@pytest.mark.parametrize("attn", [0, 8])
def test_pregate_routing_in_a_batch_equals_each_request_alone(checkpoint, tmp_path, attn):
    """A model routed by its pre-gate (Read-ME): the pre-gate's context (its window, moving
    averages and attention cache) is each request's own, carried across prompt chunks and decode
    steps whoever joins or leaves the batch, and padding is no part of it: each request's tokens
    equal generate's alone."""
    from expertcache.checkpoint import Checkpoint
    from expertcache.predictors import Artefact
    from expertcache.predictors.pregate import DEFAULT_DECAYS, DEFAULT_WINDOW, PregateNet

    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    ck = Checkpoint.open(model_dir)
    layers = list(ck.sparse_layers)
    torch.manual_seed(attn)
    hidden = ck.config.hidden_size
    net = PregateNet(hidden, DEFAULT_WINDOW, len(layers), ck.num_experts, width=16, decays=DEFAULT_DECAYS, attn=attn)
    torch.nn.init.normal_(net.fc2.weight, std=3.0)  # the context decides the routing, not only the token
    path = Artefact(kind="pregate", model=str(model_dir), sparse_layers=layers, num_experts=ck.num_experts,
                    hidden_size=hidden, top_k=ck.top_k, depths=[], tensors=net.state_dict(),
                    meta={"window": DEFAULT_WINDOW, "decays": list(DEFAULT_DECAYS), "attn": attn, "heads": 4}).save(tmp_path / "pg.pt")
    prompts = [prompt_ids(n, seed=n) for n in PROMPT_LENGTHS]
    max_tokens = [12, 6, 15, 9, 20, 4]
    with expertcache.load(model_dir, expert_budget="50%", io="buffered", dtype="float32", prefetch="pregate",
                          routing="pregate", predictor=str(path)) as eng:
        alone = [eng.generate(p, max_new_tokens=m, stop_at_eos=False).token_ids for p, m in zip(prompts, max_tokens)]
        with expertcache.load(model_dir, expert_budget="50%", io="buffered", dtype="float32") as own:
            assert alone != [own.generate(p, max_new_tokens=m, stop_at_eos=False).token_ids for p, m in zip(prompts, max_tokens)]
        b = Batcher(eng, max_batch=4, prefill_chunk=4)
        b.eos = set()
        reqs = [request(p, m) for p, m in zip(prompts, max_tokens)]
        for r in reqs[:3]:  # three prompts together: one padded forward
            b.submit(r)
        b.turn()
        b.turn()
        for r in reqs[3:5]:
            b.submit(r)
        b.turn()
        b.submit(reqs[5])
        run_all(b)
        left = getattr(eng.runtime.predictor, "streams", None)
    assert [r.out for r in reqs] == alone
    assert left == {}  # every request's pre-gate context gone with it


def test_prefill_wait_holds_a_prompt_for_others_while_rows_decode(checkpoint):
    """--prefill-wait: while a row decodes, a fresh prompt waits (up to the wait) for others, and
    prompts that together fill a turn's prompt budget go in at once, in one forward; with nothing
    decoding a prompt goes in at once; the tokens are still each request's alone."""
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    prompts = [prompt_ids(n, seed=n) for n in (6, 5, 7, 4)]
    with expertcache.load(model_dir, expert_budget="50%", io="buffered", dtype="float32") as eng:
        alone = [eng.generate(p, max_new_tokens=8, stop_at_eos=False).token_ids for p in prompts]
        with pytest.raises(ValueError, match="prefill_wait"):
            Batcher(eng, prefill_wait=-1)
        b = Batcher(eng, max_batch=4, prefill_chunk=16, prefill_wait=60.0)
        b.eos = set()
        steps = []
        b.on_step = steps.append
        reqs = [request(p, 8) for p in prompts]
        b.submit(reqs[0])
        b.turn()  # nothing decoding: in at once
        assert steps[-1]["prefill_tokens"] == 6 and b.rows == [reqs[0]]
        b.submit(reqs[1])
        b.turn()
        b.turn()
        assert [s["prefill_tokens"] for s in steps[-2:]] == [0, 0] and reqs[1].fed == 0  # held while a row decodes
        b.submit(reqs[2])
        b.turn()
        assert steps[-1]["prefill_tokens"] == 0  # 12 prompt tokens: under the turn's 16
        b.submit(reqs[3])
        b.turn()
        assert steps[-1]["prefill_tokens"] == 5 + 7 + 4  # 16: the three in one forward
        run_all(b)
        b.prefill_wait = 0.2  # a lone prompt beside a decoding row goes in once its wait is over
        first, late = request(prompts[0], 8), request(prompts[1], 8)
        b.submit(first)
        b.turn()
        b.submit(late)
        b.turn()
        assert late.fed == 0
        time.sleep(0.25)
        b.turn()
        assert late.fed == len(prompts[1])
        run_all(b)
    assert [r.out for r in reqs] == alone
    assert first.out == alone[0] and late.out == alone[1]


def test_a_batch_reads_the_miss_copy_in_its_decode_steps(checkpoint, tmp_path):
    """--miss-copy under the server's batched decode: the rows' misses read the int4 copy, upgrades
    follow, every request ends at its length, and bytes read add up per copy."""
    from expertcache.tools.quantize import quantize_checkpoint
    from helpers.invariants import LoadRecorder, check_engine_invariants

    src = checkpoint("qwen3_moe", num_experts=16, top_k=3)
    q8, q4 = tmp_path / "int8", tmp_path / "int4"
    quantize_checkpoint(src, q8, bits=8, group_size=0, dense="keep", progress=False)
    quantize_checkpoint(src, q4, bits=4, group_size=0, dense="keep", progress=False)
    prompts = [prompt_ids(n, seed=n) for n in PROMPT_LENGTHS]
    with expertcache.load(q8, expert_budget="50%", io="buffered", miss_copy=str(q4), miss_copy_upgrade=1) as eng:
        recorder = LoadRecorder(eng)
        b = Batcher(eng, max_batch=4, prefill_chunk=8)
        b.eos = set()
        reqs = [request(p, 10) for p in prompts]
        for r in reqs:
            b.submit(r)
        run_all(b)
        s = eng.stats()
        assert s["low_loads"] > 0 and s["low_uses"] > 0 and s["upgrades"] > 0
        check_engine_invariants(eng, recorder)
    assert [len(r.out) for r in reqs] == [10] * len(reqs)


def test_a_lone_rows_room_stays_within_the_kv_budget(checkpoint):
    """A lone row's lean decode steps write into a KV buffer with room (lean._room): the batcher
    counts that room in its KV bytes and caps it at what the budget leaves (so the bytes held never
    pass --kv-budget), and without a budget it is lean.KV_ROOM positions; the tokens are the same."""
    from expertcache import gemm, lean

    if not (gemm.amx_kernel(torch.bfloat16) and gemm.tail_kernels()):
        pytest.skip("the fused layer (which keeps the room) takes bf16 projections through amm (AMX) here")
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2, dtype=torch.bfloat16, expert_intermediate=64, hidden_size=128)
    with expertcache.load(model_dir, expert_budget="100%", io="buffered") as eng:
        outs, rooms = [], []
        for budget in (None, 40):
            b = Batcher(eng, max_batch=2)
            if budget is not None:  # 40 positions: 8 of prompt and 20 out, 12 spare at least
                b.kv_budget_bytes = budget * b.kv_per_token
            b.eos = set()
            r = request(prompt_ids(8, seed=1), 20)
            b.submit(r)
            most = 0
            while not b.idle():
                b.turn()
                room = max((layer.__dict__[lean.ROOM_ATTR][0].shape[-2] - layer.keys.shape[-2]
                            for layer in (b.past.layers if b.past is not None else ()) if lean.ROOM_ATTR in layer.__dict__), default=0)
                most = max(most, room)
                if b.past is not None:
                    assert b.kv_bytes() == (b.mask.numel() + room) * b.kv_per_token
                if budget is not None:
                    assert b.kv_bytes() <= b.kv_budget_bytes
            outs.append(list(r.out))
            rooms.append(most)
    assert outs[0] == outs[1] and len(outs[0]) == 20
    assert rooms[0] >= lean.KV_ROOM - 20 and 0 < rooms[1] <= 40 - 9


def test_a_batchs_keys_grow_in_their_room_within_the_kv_budget(checkpoint):
    """A batch's decode steps write each row's key and value into the room after the cache (not a
    cat of the whole cache a step): after a step of several rows every layer's keys are views of
    its room; the batcher counts the room over all rows in its KV bytes and caps it at what the
    budget leaves, so the bytes held never pass it; the tokens do not depend on the room's size."""
    from expertcache import lean

    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    prompts = [prompt_ids(n, seed=n) for n in (8, 5, 11)]
    with expertcache.load(model_dir, expert_budget="100%", io="buffered") as eng:
        outs = []
        for budget in (None, 3 * (11 + 20) + 12):  # 12 positions spare at least, over three rows
            b = Batcher(eng, max_batch=3)
            if budget is not None:
                b.kv_budget_bytes = budget * b.kv_per_token
            b.eos = set()
            reqs = [request(p, 20) for p in prompts]
            for r in reqs:
                b.submit(r)
            roomy = 0
            while not b.idle():
                rows = len(b.rows)
                b.turn()
                if b.past is None:
                    continue
                layers = b.past.layers
                room = max((layer.__dict__[lean.ROOM_ATTR][0].shape[-2] - layer.keys.shape[-2]) * layer.keys.shape[0]
                           for layer in layers if lean.ROOM_ATTR in layer.__dict__) if any(lean.ROOM_ATTR in l.__dict__ for l in layers) else 0
                if rows > 1 and len(b.rows) == rows:  # a step of several rows, none gone: their keys are in the room
                    assert all(layer.keys.data_ptr() == layer.__dict__[lean.ROOM_ATTR][0].data_ptr() for layer in layers)
                    roomy += 1
                assert b.kv_bytes() == (b.mask.numel() + b._fed() + room) * b.kv_per_token
                if budget is not None:
                    assert b.kv_bytes() <= b.kv_budget_bytes
            assert roomy > 10
            outs.append([r.out for r in reqs])
    assert outs[0] == outs[1] and all(len(o) == 20 for o in outs[0])


def test_the_rows_room_gives_way_to_an_admitted_request(checkpoint):
    """The room beyond the rows' cache takes what the KV budget leaves, and gives it back when a
    request is admitted (the rows' keys copied out of it): a request that fits the budget at its
    worst joins at once, not once the running one has ended, and the bytes held never pass it."""
    from expertcache import lean

    model_dir = checkpoint("mixtral", num_experts=8, top_k=2)
    with expertcache.load(model_dir, expert_budget="100%", io="buffered") as eng:
        b = Batcher(eng, max_batch=2)
        b.kv_budget_bytes = (2 * (8 + 20) + 30) * b.kv_per_token  # two requests at their worst, 30 spare
        b.eos = set()
        first, second = request(prompt_ids(8, seed=1), 20), request(prompt_ids(8, seed=2), 20)
        b.submit(first)
        for _ in range(4):
            b.turn()
            assert b.kv_bytes() <= b.kv_budget_bytes
        assert lean.room_positions(b.past) > 2 * (8 + 20) + 30 - b.mask.numel() - 28  # the room took the spare
        b.submit(second)
        b.turn()
        assert second in b.rows or second in b.admitting  # admitted beside the room's rows
        assert b.kv_bytes() <= b.kv_budget_bytes
        while not b.idle():
            b.turn()
            assert b.kv_bytes() <= b.kv_budget_bytes
    assert len(first.out) == len(second.out) == 20


def test_a_batchs_experts_past_16_rows_go_in_blocks_within_the_rounding(checkpoint, monkeypatch):
    """Several requests' forward (a batch's): an expert with more than AMX_ROWS rows goes through
    glu_expert in blocks of AMX_ROWS (no oneDNN primitive compiled for each new row count), its
    rows' logits within the batched kernels' rounding of each request alone; a lone request's
    prompt keeps generate's own products (rows past AMX_ROWS through torch's, bit for bit)."""
    from expertcache import experts, gemm
    from expertcache.config import AMX_ROWS
    from expertcache.decoding import Decoding

    if not gemm.amx_kernel(torch.bfloat16):
        pytest.skip("the blocks take bf16 products through amm (AMX) here")
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2, dtype=torch.bfloat16, expert_intermediate=64, hidden_size=128)
    prompts = [prompt_ids(40, seed=n) for n in (1, 2, 3)]
    seen: list[int] = []
    real = experts.expert_output
    monkeypatch.setattr(experts, "expert_output", lambda module, x, *a, **k: seen.append(x.shape[0]) or real(module, x, *a, **k))
    with expertcache.load(model_dir, expert_budget="100%", io="buffered") as eng:
        with torch.inference_mode():
            alone = [Decoding(eng.model).feed(p)[-1].float() for p in prompts]
        assert max(seen) > AMX_ROWS  # alone: torch's products for an expert's 40-odd rows
        seen.clear()
        got = {}
        b = Batcher(eng, max_batch=4)
        b._pick = lambda r, logits: got.setdefault(id(r), logits.float().clone()) is None or 0
        reqs = [request(p, 2) for p in prompts]
        for r in reqs:
            b.submit(r)
        b.turn()  # the three prompts in one forward
        assert not b.admitting and max(seen) <= AMX_ROWS  # the experts past AMX_ROWS rows (every one alone had) in blocks
        for r, want in zip(reqs, alone):
            assert float((got[id(r)] - want).abs().max() / want.abs().max()) < 2**-5
