"""Half-precision products (gemm.py): expertcache's exact kernels and half_matmul="float32".

On a CPU with AMX whose bf16 GEMM is oneDNN's AMX kernel, products of up to AMX_ROWS rows go
through amm: the same tile instructions on the weight as stored, bit for bit F.linear.

By default a bf16/fp16 product on a CPU without a native half GEMM goes through emm, which adds
the same float32 products in torch's own order: bit for bit F.linear, on this machine checked at
first use. Opt-in half_matmul="float32" sends products of more than KERNEL_ROWS rows through the
float32 GEMM instead: rounded once, close to the reference within bf16 rounding, not equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expertcache
from expertcache import gemm, kernels
from expertcache.config import AMX_MAX_INPUTS, AMX_MIN_INPUTS, AMX_ROWS, KERNEL_ROWS
from expertcache.errors import ExpertCacheError

from helpers.compare import PROMPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")
slow = pytest.mark.skipif(not gemm.slow_half(torch.bfloat16), reason="this CPU has a native bf16 GEMM: nothing to upcast")


def test_float32_is_never_upcast():
    assert not gemm.slow_half(torch.float32)
    assert gemm.kernel_name(torch.float32) == "n/a"
    x, w = torch.randn(64, 32), torch.randn(16, 32)
    assert torch.equal(gemm.linear(x, w, upcast=True), F.linear(x, w))


exact = pytest.mark.skipif(not gemm.exact_kernel(torch.bfloat16), reason="expertcache's exact kernel does not run on this machine (no AVX2 build, or torch dispatches other code)")


@exact
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_kernel_is_torchs_product_bit_for_bit(dtype):
    """Rows 1 to 40, inputs a multiple of 64, with a 16-input remainder, with single ones; with and
    without bias; two weights side by side: every output's bits equal F.linear's."""
    g = torch.Generator().manual_seed(0)
    for rows, k, n in ((1, 1024, 300), (1, 1000, 130), (4, 1030, 70), (17, 512, 64), (40, 72, 9), (2, 8, 5)):
        x, w = torch.randn(rows, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) * 0.05).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        for bias in (None, b):
            got, want = gemm.linear(x, w, bias), F.linear(x, w, bias)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (rows, k, n, bias is None)
    x3 = torch.randn(2, 3, 256, generator=g).to(dtype)  # leading dims
    w1, w2 = torch.randn(50, 256, generator=g).to(dtype), torch.randn(30, 256, generator=g).to(dtype)
    assert torch.equal(gemm.linear(x3, w1), F.linear(x3, w1))
    side = torch.ops.expertcache.emm(x3.reshape(6, 256), [w1, w2])
    assert torch.equal(side, torch.cat([F.linear(x3, w1), F.linear(x3, w2)], -1).reshape(6, 80))


@exact
def test_a_naive_float32_order_is_not_torchs():
    """The check above can fail: a float32 sum in another order differs from torch's bits somewhere."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 2816, generator=g).bfloat16(), (torch.randn(4096, 2816, generator=g) * 0.02).bfloat16()
    assert not torch.equal(F.linear(x.float(), w.float()).bfloat16(), F.linear(x, w))
    assert torch.equal(gemm.linear(x, w), F.linear(x, w))


@exact
def test_autograd_takes_torchs_kernel():
    w = torch.randn(8, 64).bfloat16().requires_grad_()
    y = gemm.linear(torch.randn(2, 64).bfloat16(), w)
    assert y.grad_fn is not None


@slow
def test_upcast_sends_many_rows_through_float32():
    """half_matmul="float32": up to KERNEL_ROWS rows the exact kernel (where it runs), more rows the
    float32 GEMM on converted operands, rounded once, bit for bit that; upcast off: F.linear's bits."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 320, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    for rows in (1, 3, KERNEL_ROWS):
        x = torch.randn(rows, 320, generator=g).bfloat16()
        got = gemm.linear(x, w, b, upcast=True)
        if gemm.exact_kernel(torch.bfloat16):
            assert torch.equal(got, F.linear(x, w, b))
        else:
            assert torch.equal(got, F.linear(x.float(), w.float(), b.float()).bfloat16())
    many = torch.randn(3, KERNEL_ROWS, 320, generator=g).bfloat16()  # rows counted over leading dims
    got = gemm.linear(many, w, b, upcast=True)
    assert torch.equal(got, F.linear(many.float(), w.float(), b.float()).bfloat16())  # the float32 product, rounded once
    assert torch.equal(gemm.matmul(many, w.t().contiguous(), upcast=True), (many.float() @ w.float().t()).bfloat16())
    assert torch.equal(gemm.linear(many, w, b), F.linear(many, w, b))  # upcast off: torch's bits
    assert torch.equal(gemm.linear(many[0, :1], w, b), F.linear(many[0, :1], w, b))


@slow
def test_install_dense_patches_plain_half_linears_only():
    m = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8), nn.Linear(8, 8).bfloat16())
    assert gemm.install_dense(m, upcast=True) == 2
    assert "forward" in vars(m[0]) and "forward" not in vars(m[1])
    x = torch.randn(5, 8).bfloat16()
    m2 = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8).bfloat16())
    with torch.no_grad():
        want = m2(x)
        gemm.install_dense(m2)
        assert torch.equal(m2(x), want)


def test_unknown_half_matmul_is_refused():
    with pytest.raises(ExpertCacheError, match="unknown half_matmul 'fp8'"):
        expertcache.EngineConfig(half_matmul="fp8")


@slow
def test_half_matmul_float32_stays_within_bf16_rounding_of_transformers(checkpoint):
    """A bf16 prompt through the engine with half_matmul="float32": every expert product and dense
    Linear of more than KERNEL_ROWS rows took the float32 path, attention ran on float32 copies
    (prompt and decode step), and the logits stay within bf16 rounding of transformers' model (they
    are not equal to it: the default is), whose own attention is left as it was."""
    from transformers import AutoModelForCausalLM

    model_dir = checkpoint("mixtral", num_experts=8, top_k=2, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    ids = torch.tensor([PROMPT * 4])  # enough rows to take the float32 path
    calls, attention = [], []
    real, real_sdpa = F.linear, F.scaled_dot_product_attention

    def counting(x, w, b=None):
        calls.append(x.dtype)
        return real(x, w, b)

    def sdpa(q, *a, **k):
        attention.append(q.dtype)
        return real_sdpa(q, *a, **k)

    with torch.no_grad():
        want = ref(ids).logits
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered", half_matmul="float32") as eng:
        with torch.no_grad():
            torch.nn.functional.linear, torch.nn.functional.scaled_dot_product_attention = counting, sdpa
            try:
                out = eng.model(ids, use_cache=True)
                got = out.logits
                step = eng.model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True).logits
            finally:
                torch.nn.functional.linear, torch.nn.functional.scaled_dot_product_attention = real, real_sdpa
        assert eng.model.config._attn_implementation == "expertcache_sdpa_float32"
        with torch.no_grad():
            want_step = ref(torch.cat([ids, ids[:, :1]], dim=1)).logits[:, -1:]
    assert ref.config._attn_implementation == "sdpa"
    assert got.dtype == step.dtype == torch.bfloat16
    assert calls.count(torch.float32) > 0, "no product went through float32"
    assert attention and set(attention) == {torch.float32}, attention
    # a one-ulp change in a hidden state can flip a near-tie router of this random model: a few
    # positions may take other experts; the rest stay within bf16 rounding
    close = ((got.float() - want.float()).abs() <= 0.05 + 0.05 * want.float().abs()).all(-1)
    assert close.float().mean() >= 0.95, f"{int((~close).sum())} of {close.numel()} positions off"
    torch.testing.assert_close(step.float(), want_step.float(), atol=0.05, rtol=0.05)
    first = {}
    for name, model in (("engine", eng.model), ("transformers", ref)):
        handle = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o, name=name: first.update({name: o[0]}))
        with torch.no_grad():
            model(ids)
        handle.remove()
    # the first layer's attention, from the same inputs: one bf16 ulp apart at most
    torch.testing.assert_close(first["engine"].float(), first["transformers"].float(), atol=2**-7, rtol=2**-7)


@exact
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_engine_bf16_logits_equal_transformers_bit_for_bit(family, checkpoint, monkeypatch):
    """The default path on a bf16 checkpoint: every dense Linear and expert product through the
    exact kernel (qwen2_moe's attention has biases; the experts' SiLU as F.silu, without its
    module call), at a budget under pressure, and the prompt's logits are transformers' bits, not
    only close to them."""
    from transformers import AutoModelForCausalLM

    from expertcache import experts

    direct = []
    plain = experts._plain_act
    monkeypatch.setattr(experts, "_plain_act", lambda act: (r := plain(act), direct.append(r is not None))[0])

    model_dir = checkpoint(family, num_experts=8, top_k=2, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = ref(ids).logits
    with expertcache.load(model_dir, expert_budget="50%", prefetch="next-gate", io="buffered") as eng:
        patched = [m for m in eng.model.modules() if type(m) is nn.Linear and "forward" in vars(m)]
        assert patched, "no dense Linear took the kernel"
        assert eng.stats()["half_kernel"] == "expertcache-exact" and eng.stats()["half_matmul"] == "exact"
        with torch.no_grad():
            got = eng.model(ids).logits
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert direct and all(direct), "an expert's activation was not taken as F.silu"


@exact
def test_linear_pair_is_two_linears():
    g = torch.Generator().manual_seed(2)
    x, a, b = (torch.randn(*s, generator=g).bfloat16() for s in ((3, 128), (40, 128), (40, 128)))
    ya, yb = gemm.linear_pair(x, a, b)
    assert torch.equal(ya, F.linear(x, a)) and torch.equal(yb, F.linear(x, b))
    many = torch.randn(KERNEL_ROWS + 1, 128, generator=g).bfloat16()
    ya, yb = gemm.linear_pair(many, a, b, upcast=True)  # beyond KERNEL_ROWS: float32, each alone
    assert torch.equal(ya, F.linear(many.float(), a.float()).bfloat16())


def test_a_remembered_check_runs_once_per_build_and_machine(tmp_path, monkeypatch):
    """A kernel check's answer is kept beside the build: a new process reads it back instead of
    running the check again; another machine, or a file that cannot be read, runs it again."""
    if not kernels.available():
        pytest.skip("expertcache's kernels are not built here: checks run and say no, nothing is kept")
    monkeypatch.setattr(kernels, "build_dir", lambda name: tmp_path)
    calls = []

    def check(x):
        calls.append(x)
        return x > 0

    first = kernels.remembered(check)
    assert first(1) and not first(-1) and first(1)
    assert calls == [1, -1]  # once each in the process
    again = kernels.remembered(check)  # as a new process would
    assert again(1) and not again(-1)
    assert calls == [1, -1], "a kept answer was asked again"
    assert again.__wrapped__ is check
    monkeypatch.setattr(kernels, "_machine", lambda: "another machine")
    assert kernels.remembered(check)(1) and calls == [1, -1, 1]
    (tmp_path / kernels.VERDICTS).write_text("{half a file")
    assert kernels.remembered(check)(1) and calls == [1, -1, 1, 1]
    monkeypatch.setattr(kernels, "_build", lambda: False)  # no kernels: the check itself, every time
    assert kernels.remembered(check)(1) and calls == [1, -1, 1, 1, 1]


amx = pytest.mark.skipif(not gemm.amx_kernel(torch.bfloat16),
                         reason="no AMX-BF16 here, or torch's bf16 GEMM is not oneDNN's AMX kernel: amm is not used")


@amx
def test_amx_kernel_is_torchs_product_bit_for_bit():
    """Rows 1 to AMX_ROWS, inputs from AMX_MIN_INPUTS to AMX_MAX_INPUTS, outputs a multiple of 16
    and not, with and without bias, two weights side by side, leading dims; inputs built so another
    summation order shows in nearly every output: every output's bits equal F.linear's."""
    g = torch.Generator().manual_seed(0)
    for rows in range(1, AMX_ROWS + 1):
        for k, n in ((1024, 64), (AMX_MIN_INPUTS, 80), (2048, 5), (96, 130), (AMX_MAX_INPUTS, 16)):
            x, w = gemm._order_sensitive(rows, k, n, torch.bfloat16, g)
            b = (torch.randn(n, generator=g) * 2**-20).bfloat16()
            for bias in (None, b):
                got = torch.ops.expertcache.amm(x, [w], bias)
                assert torch.equal(got.view(torch.int16), F.linear(x, w, bias).view(torch.int16)), (rows, k, n, bias is None)
    x, w1, w2 = torch.randn(3, 256, generator=g).bfloat16(), torch.randn(50, 256, generator=g).bfloat16(), torch.randn(30, 256, generator=g).bfloat16()
    side = torch.ops.expertcache.amm(x, [w1, w2], None)
    assert torch.equal(side, torch.cat([F.linear(x, w1), F.linear(x, w2)], -1))
    x3 = torch.randn(2, 3, 256, generator=g).bfloat16()
    assert torch.equal(gemm.linear(x3, w1), F.linear(x3, w1))
    ya, yb = gemm.linear_pair(x3, w1[:30], w2)
    assert torch.equal(ya, F.linear(x3, w1[:30])) and torch.equal(yb, F.linear(x3, w2))


@amx
def test_another_order_fails_the_amx_check():
    """The check can fail: float32 sums in another order differ from torch's bits in most outputs
    of the order-sensitive inputs, which amm matches."""
    g = torch.Generator().manual_seed(1)
    x, w = gemm._order_sensitive(2, 1024, 256, torch.bfloat16, g)
    other = F.linear(x.float(), w.float()).bfloat16()
    assert (other.view(torch.int16) != F.linear(x, w).view(torch.int16)).float().mean() > 0.5
    assert torch.equal(torch.ops.expertcache.amm(x, [w], None), F.linear(x, w))


@amx
def test_amx_bad_shapes_are_left_to_torch():
    """amm takes 1 to AMX_ROWS rows, inputs a multiple of 32 from AMX_MIN_INPUTS to AMX_MAX_INPUTS,
    products torch gives oneDNN (more than 16^3 multiply-adds), one thread; anything else is
    F.linear's, and the kernel itself refuses what it cannot take rather than computing it wrongly."""
    w = torch.randn(48, 96).bfloat16()
    assert gemm._amm(torch.randn(AMX_ROWS, 96).bfloat16(), w)
    assert gemm._amm(torch.randn(1, 96).bfloat16(), w)
    assert not gemm._amm(torch.randn(1, 96).bfloat16(), w[:40])  # 3840 multiply-adds: torch's own loop
    assert not gemm._amm(torch.randn(1, 32).bfloat16(), torch.randn(256, 32).bfloat16())
    assert not gemm._amm(torch.randn(1, AMX_MAX_INPUTS + 32).bfloat16(), torch.randn(64, AMX_MAX_INPUTS + 32).bfloat16())
    assert not gemm._amm(torch.randn(AMX_ROWS + 1, 96).bfloat16(), w)
    assert not gemm._amm(torch.randn(0, 96).bfloat16(), w)
    assert not gemm._amm(torch.randn(2, 80).bfloat16(), torch.randn(40, 80).bfloat16())
    assert not gemm._amm(torch.randn(2, 96), w.float())
    assert not gemm._amm(torch.randn(2, 96).bfloat16(), w.t().contiguous().t())  # rows not contiguous
    assert not gemm._amm(torch.randn(2, 96).bfloat16(), w.clone().requires_grad_())
    many = torch.randn(AMX_ROWS + 3, 96).bfloat16()
    assert torch.equal(gemm.linear(many, w), F.linear(many, w))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # oneDNN may split the inputs over threads: another order
    try:
        assert not gemm._amm(torch.randn(2, 96).bfloat16(), w)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="1-16 rows"):
        torch.ops.expertcache.amm(torch.randn(2, 80).bfloat16(), [torch.randn(4, 80).bfloat16()], None)


@amx
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_engine_on_amx_equals_transformers_bit_for_bit(family, checkpoint, monkeypatch):
    """A bf16 checkpoint under pressure: the prompt (dense products of its rows too) and a decode
    step over the KV cache (every dense Linear and expert product of one row through amm;
    qwen2_moe's attention has biases) give transformers' logits bit for bit."""
    from transformers import AutoModelForCausalLM

    calls = []
    real = gemm._amm_call
    monkeypatch.setattr(gemm, "_amm_call", lambda x, w, bias=None: (calls.append(x.shape[0] if x.dim() == 2 else x.shape[:-1].numel()), real(x, w, bias))[1])
    model_dir = checkpoint(family, num_experts=8, top_k=2, dtype=torch.bfloat16, expert_intermediate=64)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    ids = torch.tensor([PROMPT])
    nxt = ids[:, :1]
    with torch.no_grad():
        first = ref(ids, use_cache=True)
        want, want_step = first.logits, ref(nxt, past_key_values=first.past_key_values, use_cache=True).logits
    with expertcache.load(model_dir, expert_budget="50%", prefetch="next-gate", io="buffered") as eng:
        assert eng.stats()["half_kernel"] == "expertcache-amx"
        with torch.no_grad():
            out = eng.model(ids, use_cache=True)
            calls.clear()
            step = eng.model(nxt, past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.equal(out.logits, want)
    assert torch.equal(step, want_step)
    assert calls and set(calls) == {1}, calls  # the step's products all took amm, one row each


def test_kernel_builds_are_named_by_their_source_and_load_as_built(tmp_path, monkeypatch):
    """A build's name hashes the source, flags and versions (two checkouts never rebuild over each
    other); a stale lock left by a killed build is removed rather than waited on forever."""
    import os
    import time

    name = kernels._name()
    assert name.startswith("expertcache_qmm_") and name == kernels._name()
    monkeypatch.setenv("EXPERTCACHE_KERNEL_DIR", str(tmp_path))
    assert kernels.build_dir(name) == tmp_path / name
    lock = tmp_path / "lock"
    lock.write_text("")
    kernels._clear_stale_lock(lock)
    assert lock.exists()  # fresh: another build may hold it
    old = time.time() - kernels.STALE_LOCK_S - 10
    os.utime(lock, (old, old))
    kernels._clear_stale_lock(lock)
    assert not lock.exists()
    kernels._clear_stale_lock(lock)  # none: nothing to do


def test_float32_attention_of_the_engines_own_model_is_transformers_own(checkpoint, monkeypatch):
    """half_matmul="float32" on the engine's own model (native.py) computes what it computes on
    transformers' model, bit for bit: products through float32, attention on float32 copies. Run
    here as on a CPU whose bf16 GEMM is slow (slow_half said yes), whatever this one is."""
    model_dir = checkpoint("mixtral", num_experts=8, top_k=2, dtype=torch.bfloat16)
    monkeypatch.setattr(gemm, "slow_half", lambda dtype: dtype in (torch.bfloat16, torch.float16))
    ids = torch.tensor([PROMPT * 4])
    real_sdpa, outs = F.scaled_dot_product_attention, {}
    for build in ("native", "transformers"):
        seen = []
        with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered", half_matmul="float32",
                              model_build=build) as eng:
            assert eng.stats()["model_build"] == build
            assert eng.model.config._attn_implementation == "expertcache_sdpa_float32"
            torch.nn.functional.scaled_dot_product_attention = lambda q, *a, **k: (seen.append(q.dtype), real_sdpa(q, *a, **k))[1]
            try:
                with torch.no_grad():
                    out = eng.model(ids, use_cache=True)
                    step = eng.model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True).logits
            finally:
                torch.nn.functional.scaled_dot_product_attention = real_sdpa
        assert seen and set(seen) == {torch.float32}, (build, seen)
        outs[build] = (out.logits, step)
    for mine, theirs in zip(outs["native"], outs["transformers"]):
        assert torch.equal(mine, theirs)


@slow
def test_float32_attention_reaches_a_family_with_attention_sub_configs(checkpoint):
    """DBRX keeps its attention settings in a sub-config that is no sub-model: the float32
    attention is set on the model itself (not pushed into the sub-configs) and runs."""
    model_dir = checkpoint("dbrx", dtype=torch.bfloat16)
    seen = []
    real = F.scaled_dot_product_attention
    with expertcache.load(model_dir, expert_budget="50%", prefetch="none", io="buffered", half_matmul="float32") as eng:
        F.scaled_dot_product_attention = lambda q, *a, **k: (seen.append(q.dtype), real(q, *a, **k))[1]
        try:
            eng.generate(PROMPT[:8], max_new_tokens=2, stop_at_eos=False)
        finally:
            F.scaled_dot_product_attention = real
        assert eng.model.config._attn_implementation == "expertcache_sdpa_float32"
        assert getattr(eng.model.config.attn_config, "_attn_implementation", None) != "expertcache_sdpa_float32"
    assert seen and set(seen) == {torch.float32}
