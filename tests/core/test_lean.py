"""The lean decode step (lean.py): transformers' operations on the model's weights without its
module calls, for Mixtral and Qwen3-MoE. Each step's logits equal the engine's own forward of
the same step bit for bit (the same operations), and transformers' own model's (bit for bit where
the engine is: bf16 on an AMX CPU; within the float tolerance elsewhere), at every budget; the
lean step really ran; anything it cannot see (a foreign hook, another cache, another family)
falls back to the model's forward.
"""

from __future__ import annotations

import pytest
import torch

import expertcache
from expertcache import gemm, kernels, lean
from expertcache.decoding import LEAN_ATTR, Decoding
from expertcache.errors import ExpertCacheError

from helpers.checkpoints import FAMILY_CASES, prompt_ids
from helpers.invariants import min_budget

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = {
    # bf16 at hidden 128: every projection of a row takes amm on an AMX CPU (query, key, value in one call)
    "mixtral-bf16": ("mixtral", dict(num_experts=8, top_k=2, dtype=torch.bfloat16, expert_intermediate=64, hidden_size=128)),
    "mixtral-f32": ("mixtral", dict(num_experts=8, top_k=2)),
    # routers of 40 experts: their logits take amm, so the fused layer call routes too (Mixtral's softmax and Qwen's)
    "mixtral-bf16-router": ("mixtral", dict(num_experts=40, top_k=2, dtype=torch.bfloat16, expert_intermediate=32, hidden_size=128)),
    "qwen3-bf16-router": ("qwen3_moe", dict(num_experts=40, top_k=4, norm_topk_prob=True, dtype=torch.bfloat16, expert_intermediate=32,
                                            hidden_size=128)),
    # q/k norms, a dense MLP layer, tied embeddings, three of twelve experts
    "qwen3-bf16-dense-tied": ("qwen3_moe", dict(num_experts=12, top_k=3, norm_topk_prob=True, dtype=torch.bfloat16, num_layers=3,
                                                 mlp_only_layers=[1], tie_word_embeddings=True, expert_intermediate=64,
                                                 hidden_size=128)),
    "qwen3-f32-nonorm": ("qwen3_moe", dict(num_experts=8, top_k=2, norm_topk_prob=False)),
    # attention biases (one amm call with the three biases), shared experts through the block's own forward
    "qwen2-bf16": ("qwen2_moe", dict(num_experts=8, top_k=2, dtype=torch.bfloat16, expert_intermediate=64, hidden_size=128)),
    "qwen2-f32-dense": ("qwen2_moe", dict(num_experts=12, top_k=4, norm_topk_prob=False, num_layers=3, mlp_only_layers=[1])),
    # query and key norms over the whole projections, then clip_qkv (0.5 bites: the normed projections are of unit scale)
    "olmoe-bf16-clip": ("olmoe", dict(num_experts=10, top_k=2, norm_topk_prob=True, dtype=torch.bfloat16, expert_intermediate=64,
                                      hidden_size=128, clip_qkv=0.5)),
    "olmoe-f32": ("olmoe", dict(num_experts=8, top_k=3, norm_topk_prob=False)),
    # a partial rotary embedding (half of each head), per-head norms, attention biases, shared experts and group-limited
    # routing through the block's own forward, a dense first layer
    "glm4-bf16-qknorm": ("glm4_moe", dict(FAMILY_CASES["glm4_moe"], dtype=torch.bfloat16, hidden_size=128, expert_intermediate=64,
                                          use_qk_norm=True, attention_bias=True, first_k_dense_replace=1)),
    "glm4-f32": ("glm4_moe", dict(FAMILY_CASES["glm4_moe"])),
}
PROMPT = prompt_ids(12)
STEPS = 10


def _steps(eng, tokens: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """The prompt, then STEPS one-token forwards through Decoding (greedy, or `tokens` fed):
    (the tokens fed after the prompt, the steps' logits [STEPS, V])."""
    d = Decoding(eng.model)
    with torch.inference_mode():
        last = d.feed(PROMPT)[-1]
        fed, out = [], []
        for i in range(STEPS):
            t = int(last.argmax()) if tokens is None else tokens[i]
            fed.append(t)
            last = d.feed([t])[-1]
            out.append(last.clone())
    return fed, torch.stack(out)


def _reference(model_dir, tokens: list[int]) -> torch.Tensor:
    """transformers' own model, step by step over its DynamicCache, on the same tokens."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    out = []
    with torch.no_grad():
        step = ref(torch.tensor([PROMPT]), use_cache=True)
        past = step.past_key_values
        for i, t in enumerate(tokens):
            step = ref(torch.tensor([[t]]), past_key_values=past, position_ids=torch.tensor([[len(PROMPT) + i]]), use_cache=True)
            past = step.past_key_values
            out.append(step.logits[0, -1])
    return torch.stack(out)


def _count_layer_calls(monkeypatch) -> list:
    """A list that grows by one at each lean_layer call (the attention half of a layer in one kernel call)."""
    calls = []
    if kernels.available():
        real = torch.ops.expertcache.lean_layer
        monkeypatch.setattr(torch.ops.expertcache, "lean_layer", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.view(torch.int32)


@pytest.mark.parametrize("budget", ["min", "50%", "100%"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lean_steps_are_the_models_own(case, budget, checkpoint, monkeypatch):
    family, kw = CASES[case]
    model_dir = checkpoint(family, **kw)
    expert_budget = min_budget(model_dir) if budget == "min" else budget
    with expertcache.load(model_dir, expert_budget=expert_budget, prefetch="next-gate", io="buffered") as eng:
        assert eng.stats()["decode_step"] == "lean"
        ran, fused = [], _count_layer_calls(monkeypatch)
        step = eng.model.__dict__[LEAN_ATTR].step
        monkeypatch.setattr(eng.model.__dict__[LEAN_ATTR], "step", lambda *a: (ran.append(1), step(*a))[1])
        tokens, fast = _steps(eng)
        assert len(ran) == STEPS, "the decode steps did not take the lean path"
        amx = kw.get("dtype") == torch.bfloat16 and gemm.amx_kernel(torch.bfloat16)
        if amx:  # the fused projections really ran
            assert all(L.qkv.weights is not None for L in eng.model.__dict__[LEAN_ATTR].layers)
        # the attention half and router in one kernel call a layer: bf16 on AMX, whole rotary embeddings, per-head norms
        # or none (OLMoE's whole-projection norms and clip, GLM-4.5's partial rotary embedding: the Python)
        layers = len(eng.model.model.layers)
        assert len(fused) == (STEPS * layers if amx and family in ("mixtral", "qwen3_moe", "qwen2_moe") else 0)
        routed = [L.fused[1][-3] for L in eng.model.__dict__[LEAN_ATTR].layers if L.fused is not None and L.sparse is not None]
        assert all(routed) if case.endswith("-router") and amx else not any(routed)
        if family in ("mixtral", "qwen3_moe", "olmoe"):  # their routers' math written out (the others' blocks run their own)
            assert all(L.route is not None for L in eng.model.__dict__[LEAN_ATTR].layers if L.sparse is not None)
        monkeypatch.setattr(lean.LeanDecoder, "usable", lambda self, past: False)
        _, slow = _steps(eng, tokens)
        assert len(ran) == STEPS
    assert torch.equal(_bits(fast), _bits(slow)), "the lean step's logits differ from the model's forward"
    want = _reference(model_dir, tokens)
    if kw.get("dtype") == torch.bfloat16 and gemm.amx_kernel(torch.bfloat16):
        assert torch.equal(_bits(fast), _bits(want))  # the engine is transformers' bits here (test_gemm)
    else:
        torch.testing.assert_close(fast, want)


@pytest.mark.parametrize("case", ["mixtral-bf16", "qwen3-f32-nonorm", "olmoe-bf16-clip"])
def test_a_router_is_written_out_only_where_it_gives_its_own_forwards_bits(case, checkpoint):
    """The lean step's router (its logits through gemm.linear, its softmax and top-k written out)
    is taken where it equals the router's own forward on random rows; a router whose forward
    differs (here: scores scaled by 1 + 2^-7) keeps its own forward."""
    family, kw = CASES[case]
    model_dir = checkpoint(family, **kw)
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        router = next(L.router for L in eng.model.__dict__[LEAN_ATTR].layers if L.sparse is not None)
        route = lean._lean_route(router)
        assert route is not None
        x = torch.randn(2, router.weight.shape[1]).to(router.weight.dtype)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(route(x), router.forward(x)))
        own = router.forward

        def scaled(h):
            logits, scores, ids = own(h)
            return logits, scores * (1 + 2**-7), ids

        router.forward = scaled
        try:
            assert lean._lean_route(router) is None
        finally:
            del router.forward


def test_a_foreign_hook_or_another_cache_takes_the_models_forward(checkpoint):
    """A hook the engine did not install on a module the lean step bypasses (a tool watching a
    norm's input, say) must fire: the step is the model's forward then; and so with a cache
    that is not transformers' DynamicCache of full-attention layers."""
    model_dir = checkpoint("mixtral", **CASES["mixtral-f32"][1])
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        ld = eng.model.__dict__[LEAN_ATTR]
        seen = []
        norm = eng.model.model.layers[1].post_attention_layernorm
        handle = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
        d = Decoding(eng.model)
        with torch.inference_mode():
            d.feed(PROMPT)
            assert not ld.usable(d.past)
            d.feed([3])
        assert len(seen) == 2, "the hook did not see the decode step"
        handle.remove()
        assert ld.usable(d.past)
        d.past.layers.append(type(d.past.layers[0])())  # a cache of another shape
        assert not ld.usable(d.past)


@pytest.mark.parametrize("family", ["granitemoe", "deepseek_v3"])
def test_other_families_say_why_they_take_the_models_forward(family, checkpoint):
    model_dir = checkpoint(family, **FAMILY_CASES[family])
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        step = eng.stats()["decode_step"]
        assert step.startswith("transformers (") and family in step, step
        assert LEAN_ATTR not in eng.model.__dict__


def test_decode_step_transformers_is_asked_for_and_checked(checkpoint):
    model_dir = checkpoint("mixtral", **CASES["mixtral-f32"][1])
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered", decode_step="transformers") as eng:
        assert eng.stats()["decode_step"] == "transformers (asked for)"
        assert LEAN_ATTR not in eng.model.__dict__
    with pytest.raises(ExpertCacheError, match="unknown decode_step 'fast'"):
        expertcache.load(model_dir, decode_step="fast")


@pytest.mark.parametrize("room", [3, 64])
def test_a_layers_keys_grow_in_place_in_their_room(room, checkpoint, monkeypatch):
    """The fused layer writes a step's key and value into a buffer with room (the DynamicLayer's
    keys and values are views of its first positions), made again when full or when another forward
    replaced them; the logits equal the model's forward's, bit for bit, across refills and a crop.
    A lean step the fused layer does not take (a batch's, more threads) writes into the room too."""
    if not (gemm.amx_kernel(torch.bfloat16) and gemm.tail_kernels()):
        pytest.skip("the fused layer takes bf16 projections through amm (AMX) here")
    family, kw = CASES["mixtral-bf16"]
    monkeypatch.setattr(lean, "KV_ROOM", room)  # 3: made again every third step; 64: room left when the forward replaces the keys

    def run(eng) -> tuple[torch.Tensor, list]:
        d = Decoding(eng.model)
        out, rooms = [], []
        with torch.inference_mode():
            last = d.feed(PROMPT)[-1]
            for i in range(12):
                if i == 7:
                    d.crop(len(d) - 2)  # the keys stay views of the room, shorter
                # step 4 feeds two tokens: the model's forward, whose cat replaces the keys (the room is made again after)
                last = d.feed([int(last.argmax())] if i not in (4, 7) else [5] if i == 7 else [5, 6])[-1]
                out.append(last.clone())
                layer = d.past.layers[0]
                room = layer.__dict__.get(lean.ROOM_ATTR)
                rooms.append(i == 4 or (room is not None and layer.keys.data_ptr() == room[0].data_ptr()))
        return torch.stack(out), rooms

    with expertcache.load(checkpoint(family, **kw), expert_budget="100%", prefetch="none", io="buffered") as eng:
        fast, rooms = run(eng)
        assert all(rooms)
        d = Decoding(eng.model)
        with torch.inference_mode():
            d.feed(PROMPT)
            d.feed([5])
            assert all(lean.ROOM_ATTR in layer.__dict__ for layer in d.past.layers)
            torch.set_num_threads(2)  # a step the fused layer does not take (as a batch's): its keys go in the room too
            try:
                d.feed([6])
            finally:
                torch.set_num_threads(1)
            assert all(layer.keys.data_ptr() == layer.__dict__[lean.ROOM_ATTR][0].data_ptr() for layer in d.past.layers)
            assert all(layer.keys.shape[-2] == len(PROMPT) + 2 for layer in d.past.layers)
        with monkeypatch.context() as m:
            m.setattr(lean.LeanDecoder, "usable", lambda self, past: False)
            slow, rooms = run(eng)
            assert not any(rooms[:4] + rooms[5:])
    assert torch.equal(_bits(fast), _bits(slow))


def test_the_elementwise_tails_are_torchs_chains_bit_for_bit(monkeypatch):
    """rms_norm, rotary and combine (one kernel call each) against the torch chains they replace,
    on shapes with tails, values across the exponent range, and the check refusing a wrong chain."""
    if not gemm.tail_kernels():
        pytest.skip("expertcache's kernels are not built here: the chains run as they are")
    g = torch.Generator().manual_seed(7)
    for n in (32, 96, 256, 1000):
        scale = torch.exp2(torch.randint(-20, 20, (4, n), generator=g).float())
        h = (torch.randn(4, n, generator=g) * scale).to(torch.bfloat16)
        w = torch.randn(n, generator=g).to(torch.bfloat16)
        for eps in (1e-5, 1e-6):
            assert torch.equal(_bits(gemm.rms_norm(h, w, eps)), _bits(gemm.rms_chain(h, w, eps)))
        x = (torch.randn(1, 7, n, generator=g) * scale[0]).to(torch.bfloat16)
        cos, sin = (torch.randn(1, 1, n, generator=g).to(torch.bfloat16) for _ in range(2))
        assert torch.equal(_bits(gemm.rotary(x, cos, sin)), _bits(gemm.rotary_chain(x, cos, sin)))
        for k in (1, 2, 8):
            ys = [(torch.randn(1, n, generator=g) * scale[0]).to(torch.bfloat16) for _ in range(k)]
            wk = torch.rand(1, k, generator=g) * torch.exp2(torch.randint(-6, 7, (1, k), generator=g).float())
            assert torch.equal(_bits(gemm.combine(ys, wk)), _bits(gemm.combine_chain(ys, wk)))
            wh = torch.rand(1, k, generator=g).to(torch.bfloat16)  # Qwen's routers: bf16 weights
            assert torch.equal(_bits(torch.ops.expertcache.combine(ys, wh)), _bits(gemm.combine_half_chain(ys, wh)))
            assert torch.equal(_bits(gemm.combine(ys, wh)), _bits(gemm.combine_half_chain(ys, wh)))
    assert gemm.half_combine()
    half = gemm.combine_half_chain
    # the products not rounded to bf16 before the sum (a buffer of float32 weighted outputs): refused
    monkeypatch.setattr(gemm, "combine_half_chain", lambda ys, w: gemm.combine_chain(ys, w.float()))
    assert not gemm.half_combine.__wrapped__(), "the check passed a combine that differs from the runtime's buffer sum"
    monkeypatch.setattr(gemm, "combine_half_chain", half)
    chain = gemm.rms_chain
    # one rounding fewer: the weight multiplied in float32, rounded once (a fused kernel's mistake)
    monkeypatch.setattr(gemm, "rms_chain", lambda h, w, eps: chain(h.float(), w.float(), eps).to(h.dtype))
    assert not gemm.tail_kernels.__wrapped__(), "the check passed a kernel that differs from its chain"


def test_two_threads_take_the_modules_own_products(checkpoint, monkeypatch):
    """With two threads amm is not torch's order (oneDNN may split the inputs), so the lean step
    leaves the projections to the modules' own forwards; its logits stay the model forward's."""
    model_dir = checkpoint("mixtral", **CASES["mixtral-bf16"][1])
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        torch.set_num_threads(2)
        try:
            tokens, fast = _steps(eng)
            monkeypatch.setattr(lean.LeanDecoder, "usable", lambda self, past: False)
            _, slow = _steps(eng, tokens)
        finally:
            torch.set_num_threads(1)
    assert torch.equal(_bits(fast), _bits(slow))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_padded_batch_step_is_the_models_own(case, checkpoint):
    """The server's decode step: rows of different lengths, left-padded, one token each at its own
    position with the batch's attention mask; the lean rows' logits equal the model's forward on
    the same cache, bit for bit, three steps in turn."""
    family, kw = CASES[case]
    _batch_steps_are_the_models_own(checkpoint(family, **kw))


def _batch_steps_are_the_models_own(model_dir) -> None:
    import copy

    prompts = [PROMPT, PROMPT[:5], PROMPT[3:10]]
    width = max(len(p) for p in prompts)
    ids, pos, mask = (torch.zeros((len(prompts), width), dtype=torch.long) for _ in range(3))
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], pos[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), torch.arange(len(p)), 1
    with expertcache.load(model_dir, expert_budget="50%", prefetch="next-gate", io="buffered") as eng:
        ld = eng.model.__dict__[LEAN_ATTR]
        with torch.inference_mode():
            eng.runtime.token_mask = mask.flatten().bool()
            out = eng.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            eng.runtime.token_mask = None
            mine, theirs = out.past_key_values, copy.deepcopy(out.past_key_values)
            tokens = out.logits[:, -1].argmax(-1).tolist()
            lengths = [len(p) for p in prompts]
            for _ in range(3):
                mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
                assert ld.usable(mine)
                fast = ld.rows(tokens, lengths, mine, mask)
                slow = eng.model(input_ids=torch.tensor(tokens)[:, None], attention_mask=mask, position_ids=torch.tensor(lengths)[:, None],
                                 past_key_values=theirs, use_cache=True, logits_to_keep=1).logits[:, -1]
                assert torch.equal(_bits(fast), _bits(slow))
                tokens, lengths = fast.argmax(-1).tolist(), [n + 1 for n in lengths]


@pytest.mark.parametrize("case", ["mixtral-bf16", "qwen2-bf16"])
def test_quantized_dense_projections_keep_the_models_bits(case, checkpoint, tmp_path, monkeypatch):
    """A checkpoint with int8 dense weights (`quantize --dense int8`: each projection a QuantLinear,
    Qwen2-MoE's with biases): the lean step's logits equal the model's forward, bit for bit, one row
    at a time and for a padded batch of three rows (where qmm takes the AMX tiles, if any)."""
    from expertcache.tools.quantize import quantize_checkpoint

    if not kernels.available():
        pytest.skip("expertcache's kernels did not build here: dense int8 weights are dequantized on use")
    family, kw = CASES[case]
    model_dir = tmp_path / "int8-dense"
    quantize_checkpoint(checkpoint(family, **kw), model_dir, bits=8, group_size=0, dense="int8", progress=False)
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered") as eng:
        assert eng.stats()["decode_step"] == "lean"
        assert type(eng.model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
        with monkeypatch.context() as m:
            fused = _count_layer_calls(m)
            tokens, fast = _steps(eng)
        # QuantLinears without biases side by side in one qmm call, in the fused layer on any CPU the kernels build on
        # (Qwen2-MoE's biases: the Python)
        assert len(fused) == (STEPS * len(eng.model.model.layers) if case == "mixtral-bf16" and gemm.tail_kernels() else 0)
        with monkeypatch.context() as m:
            m.setattr(lean.LeanDecoder, "usable", lambda self, past: False)
            _, slow = _steps(eng, tokens)
    assert torch.equal(_bits(fast), _bits(slow))
    _batch_steps_are_the_models_own(model_dir)


QWEN3_BF16 = ("qwen3_moe", dict(num_experts=12, top_k=4, norm_topk_prob=True, dtype=torch.bfloat16, expert_intermediate=64, hidden_size=128))


@pytest.mark.parametrize("case,quantize", [("mixtral-bf16", None), ("qwen3-bf16", None), ("mixtral-bf16", 4)])
def test_a_tokens_experts_and_their_combine_are_one_call(case, quantize, checkpoint, tmp_path):
    """A decode step's experts, each a glu_expert call of the same kind (bf16 on amm, or quantized
    on qmm), and their combine with the router's weights (float32: Mixtral's; bf16: Qwen's) run as
    one glu_experts call per layer, with the logits the calls one by one give, bit for bit; a low
    budget (misses and loads between the experts) changes nothing."""
    if not (gemm.amx_kernel(torch.bfloat16) and gemm.tail_kernels()):
        pytest.skip("experts take glu_expert where their products run on amm (AMX) here")
    from expertcache import experts
    from expertcache.tools.quantize import quantize_checkpoint

    family, kw = QWEN3_BF16 if case == "qwen3-bf16" else CASES[case]
    model_dir = checkpoint(family, **kw)
    if quantize:
        quantize_checkpoint(model_dir, tmp_path / "q", bits=quantize, group_size=32, progress=False)
        model_dir = tmp_path / "q"
    calls = []
    real = torch.ops.expertcache.glu_experts

    def counted(*a):
        calls.append(1)
        return real(*a)

    def run(budget) -> torch.Tensor:
        with expertcache.load(model_dir, expert_budget=budget, prefetch="none", io="buffered") as eng:
            d = Decoding(eng.model)
            out = []
            with torch.inference_mode():
                last = d.feed(PROMPT)[-1]
                for _ in range(6):
                    last = d.feed([int(last.argmax())])[-1]
                    out.append(last.clone())
            return torch.stack(out)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.expertcache, "glu_experts", counted)
        fused = {b: run(b) for b in ("100%", min_budget(model_dir))}
        assert len(calls) >= 6
        mp.setattr(experts, "TOKEN_EXPERTS_CALL", False)
        calls.clear()
        each = {b: run(b) for b in fused}
        assert not calls
    for b in fused:
        assert torch.equal(fused[b].view(torch.int16), each[b].view(torch.int16)), b
