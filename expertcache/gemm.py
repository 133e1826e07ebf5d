"""Half-precision matmuls on CPUs without a native bf16/fp16 GEMM.

Where oneDNN has no bf16 (fp16) kernel for the CPU (no AVX512-BF16 or AMX: every AVX2 machine),
torch multiplies half matrices one float32 dot product per output, in a fixed order. expertcache's
kernel (kernels/qmm.cpp: emm) adds the same products in the same order, bit for bit, ~3x faster:
the default for expert and dense products (`exact_kernel` checks it on this machine first). Opt-in
(EngineConfig.half_matmul="float32"), products of more than KERNEL_ROWS rows are converted to
float32 for torch's float32 GEMM (a prefill: ~2x faster again, but another summation order, so not
equal to transformers' model). `linear(upcast=...)` picks the path; `install_dense` gives a
model's dense nn.Linear modules the same; with upcast, `install_attention` runs its sdpa
attention on float32 copies (bf16 flash attention is ~7x slower here). docs/ARCHITECTURE.md measures.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .config import KERNEL_ROWS, UPCAST_ROWS

log = logging.getLogger(__name__)


@functools.cache
def slow_half(dtype: torch.dtype) -> bool:
    """Whether `dtype` GEMMs on this CPU take torch's generic loop (no oneDNN kernel for it)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        check = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else torch.ops.mkldnn._is_mkldnn_fp16_supported
        return not bool(check())
    except (AttributeError, RuntimeError):
        return False


def _upcast(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.dtype == w.dtype and x.numel() >= UPCAST_ROWS * x.shape[-1] and slow_half(x.dtype)


@functools.cache
def exact_kernel(dtype: torch.dtype) -> bool:
    """Whether expertcache's emm gives torch's own bits for `dtype` products here: a slow half type,
    torch running its AVX2 code (the order emm mirrors), the kernel built, and random products
    (one and several rows, with and without bias, inputs not a multiple of 64) equal bit for bit."""
    if not slow_half(dtype) or torch.backends.cpu.get_cpu_capability() != "AVX2":
        return False
    from . import kernels

    if not kernels.available():
        return False
    g = torch.Generator().manual_seed(0)
    for rows, k, n in ((1, 256, 40), (3, 200, 33), (20, 1030, 17)):
        x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype)
        for bias in (None, b):
            if not torch.equal(torch.ops.expertcache.emm(x, [w], bias).view(torch.int16), F.linear(x, w, bias).view(torch.int16)):
                log.warning("expertcache's exact %s kernel differs from torch's on this machine; using torch's", dtype)
                return False
    return True


def kernel_name(dtype: torch.dtype) -> str:
    """Which code multiplies `dtype` matrices here (engine stats): "expertcache-exact" (emm),
    "torch-onednn" (a CPU with a native half GEMM), "torch" (torch's loop: no kernel built, or it
    failed its check), or "n/a" (not a half type)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return "n/a"
    if not slow_half(dtype):
        return "torch-onednn"
    return "expertcache-exact" if exact_kernel(dtype) else "torch"


def _emm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether emm takes this product (no autograd: it is for inference)."""
    return (x.dtype == w.dtype and w.dim() == 2 and w.stride(-1) == 1 and not (x.requires_grad or w.requires_grad)
            and exact_kernel(x.dtype))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, upcast: bool = False) -> torch.Tensor:
    """F.linear(x, w, bias), bit for bit, through expertcache's kernel where it is exact (a slow
    half type); with `upcast`, more than KERNEL_ROWS rows instead through float32 (converted, then
    the float32 GEMM, rounded once)."""
    if upcast and _upcast(x, w) and (x.numel() > KERNEL_ROWS * x.shape[-1] or not _emm(x, w)):
        return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    if _emm(x, w) and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())):
        if x.dim() == 2:  # an expert's rows: no reshapes (this is a decode step's hot path)
            return torch.ops.expertcache.emm(x, [w], bias)
        y = torch.ops.expertcache.emm(x.reshape(-1, x.shape[-1]), [w], bias)
        return y.reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)


def linear_pair(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(x, a), linear(x, b)), the same bits, in one kernel call where it takes both (an
    expert's gate and up: x is widened once)."""
    k = x.shape[-1]
    if (a.shape == b.shape and _emm(x, a) and _emm(x, b)
            and not (upcast and x.numel() > KERNEL_ROWS * k)):
        n = a.shape[0]
        if x.dim() == 2:
            y = torch.ops.expertcache.emm(x, [a, b])
            return y[:, :n], y[:, n:]
        y = torch.ops.expertcache.emm(x.reshape(-1, k), [a, b]).reshape(*x.shape[:-1], 2 * n)
        return y[..., :n], y[..., n:]
    return linear(x, a, upcast=upcast), linear(x, b, upcast=upcast)


def matmul(x: torch.Tensor, w: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """x @ w ([.., in] @ [in, out]), as `linear`."""
    if upcast and _upcast(x, w):
        return (x.float() @ w.float()).to(x.dtype)
    return x @ w


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def _forward_upcast(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias, upcast=True)


def install_dense(model: nn.Module, *, upcast: bool = False) -> int:
    """Give every plain nn.Linear of `model` whose weight is a slow half type `linear`'s paths (the
    exact kernel; with `upcast`, float32 for many rows); returns how many. Subclasses (quantized
    linears) keep their own forward. The kernel is built and checked here, at load, not in the
    middle of a first forward; nothing is installed where neither path applies."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight is not None and slow_half(m.weight.dtype)]
    exact = {dtype: exact_kernel(dtype) for dtype in {m.weight.dtype for m in linears}}
    n = 0
    for m in linears:
        if upcast or exact[m.weight.dtype]:
            m.forward = (_forward_upcast if upcast else _forward).__get__(m)
            n += 1
    return n


FLOAT32_ATTENTION = "expertcache_sdpa_float32"


def _sdpa_float32(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention on float32 copies of slow-half inputs; the output in their dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if slow_half(dtype):
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out.to(dtype), weights


def install_attention(model: nn.Module) -> bool:
    """Run a model's sdpa attention in float32 where its half dtype is slow on this CPU (upcast
    only: another rounding than transformers'); other attention implementations are kept.
    Returns whether it was installed."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    params = next(model.parameters(), None)
    if params is None or not slow_half(params.dtype) or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(FLOAT32_ATTENTION, _sdpa_float32)
    AttentionMaskInterface.register(FLOAT32_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation({"": FLOAT32_ATTENTION})  # the model's own config (DBRX's attn_config is no sub-model)
    return model.config._attn_implementation == FLOAT32_ATTENTION
