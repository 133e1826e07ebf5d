"""half_matmul="float32": half-precision products of several rows through float32 (gemm.py).

Off by default (exact: torch's own kernel, as transformers computes). On, a product of UPCAST_ROWS
rows or more is float32-accumulated and rounded once, as torch's kernel does, in another summation
order: close to the reference within bf16 rounding, never used for a decode step's single row.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import expertcache
from expertcache import gemm
from expertcache.config import UPCAST_ROWS
from expertcache.errors import ExpertCacheError

from helpers.compare import PROMPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")
slow = pytest.mark.skipif(not gemm.slow_half(torch.bfloat16), reason="this CPU has a native bf16 GEMM: nothing to upcast")


def test_float32_is_never_upcast():
    assert not gemm.slow_half(torch.float32)
    x, w = torch.randn(64, 32), torch.randn(16, 32)
    assert torch.equal(gemm.linear(x, w, upcast=True), F.linear(x, w))


@slow
def test_one_row_keeps_torch_s_kernel_and_many_rows_round_once_from_float32():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    few = torch.randn(UPCAST_ROWS - 1, 64, generator=g).bfloat16()
    assert torch.equal(gemm.linear(few, w, b, upcast=True), F.linear(few, w, b))  # a decode step: untouched
    many = torch.randn(3, UPCAST_ROWS, 64, generator=g).bfloat16()  # rows counted over leading dims
    got = gemm.linear(many, w, b, upcast=True)
    want = F.linear(many.float(), w.float(), b.float()).bfloat16()  # the exact float32 product, rounded once
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(gemm.matmul(many, w.t().contiguous(), upcast=True), (many.float() @ w.float().t()).bfloat16())
    assert torch.equal(gemm.linear(many, w, b), F.linear(many, w, b))  # upcast off: torch's kernel


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
