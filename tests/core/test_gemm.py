"""half_matmul="float32": half-precision products of several rows through float32 (gemm.py).

Off by default (exact: torch's own kernel, as transformers computes). On, a product is
float32-accumulated and rounded once, as torch's kernel does, in another summation order (few
rows: expertcache's kernel; many: the float32 GEMM): close to the reference within bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expertcache
from expertcache import gemm, kernels
from expertcache.config import KERNEL_ROWS
from expertcache.errors import ExpertCacheError

from helpers.compare import PROMPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")
slow = pytest.mark.skipif(not gemm.slow_half(torch.bfloat16), reason="this CPU has a native bf16 GEMM: nothing to upcast")


def test_float32_is_never_upcast():
    assert not gemm.slow_half(torch.float32)
    x, w = torch.randn(64, 32), torch.randn(16, 32)
    assert torch.equal(gemm.linear(x, w, upcast=True), F.linear(x, w))


@slow
def test_few_rows_take_the_kernel_many_rows_round_once_from_float32():
    """Up to KERNEL_ROWS rows: expertcache's kernel (float32 accumulation, one rounding: within a
    bf16 unit of the exact float32 product); more rows: the float32 GEMM on converted operands,
    bit for bit; upcast off: torch's own kernel."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 320, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    for rows in (1, 3, KERNEL_ROWS):
        x = torch.randn(rows, 320, generator=g).bfloat16()
        got = gemm.linear(x, w, b, upcast=True)
        exact = F.linear(x.float(), w.float(), b.float())
        ulp = exact.abs().clamp(min=2**-126).log2().floor().exp2() * 2**-7  # one bf16 unit at each value
        assert got.dtype == torch.bfloat16 and ((got.float() - exact).abs() <= ulp).all()
        if kernels.available():
            assert torch.equal(got, (torch.ops.expertcache.hmm(x.float(), [w]) + b.float()).bfloat16())
    many = torch.randn(3, KERNEL_ROWS, 320, generator=g).bfloat16()  # rows counted over leading dims
    got = gemm.linear(many, w, b, upcast=True)
    assert torch.equal(got, F.linear(many.float(), w.float(), b.float()).bfloat16())  # the float32 product, rounded once
    assert torch.equal(gemm.matmul(many, w.t().contiguous(), upcast=True), (many.float() @ w.float().t()).bfloat16())
    assert torch.equal(gemm.linear(many, w, b), F.linear(many, w, b))  # upcast off: torch's kernel
    assert torch.equal(gemm.linear(many[0, :1], w, b), F.linear(many[0, :1], w, b))


@slow
def test_upcast_dense_patches_plain_half_linears_only():
    m = nn.Sequential(nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8), nn.Linear(8, 8).bfloat16())
    assert gemm.upcast_dense(m) == 2
    assert "forward" in vars(m[0]) and "forward" not in vars(m[1])


def test_unknown_half_matmul_is_refused():
    with pytest.raises(ExpertCacheError, match="unknown half_matmul 'fp8'"):
        expertcache.EngineConfig(half_matmul="fp8")


@slow
def test_half_matmul_float32_stays_within_bf16_rounding_of_transformers(checkpoint):
    """A bf16 prompt through the engine with half_matmul="float32": every expert product and dense
    Linear of 8+ rows took the float32 path, and the logits stay within bf16 rounding of
    transformers' model (they are not equal to it: the default is)."""
    from transformers import AutoModelForCausalLM

    model_dir = checkpoint("mixtral", num_experts=8, top_k=2, dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    ids = torch.tensor([PROMPT * 2])  # enough rows per expert to take the float32 path
    calls = []
    real = F.linear

    def counting(x, w, b=None):
        calls.append(x.dtype)
        return real(x, w, b)

    with torch.no_grad():
        want = ref(ids).logits
    with expertcache.load(model_dir, expert_budget="100%", prefetch="none", io="buffered", half_matmul="float32") as eng:
        with torch.no_grad():
            torch.nn.functional.linear = counting
            try:
                got = eng.model(ids).logits
            finally:
                torch.nn.functional.linear = real
    assert got.dtype == torch.bfloat16
    assert calls.count(torch.float32) > 0, "no product went through float32"
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)
