"""Half-precision matmuls on CPUs without a native bf16/fp16 GEMM.

Where oneDNN has no bf16 (fp16) kernel for the CPU (no AVX512-BF16 or AMX: every AVX2 machine),
torch multiplies bf16 matrices with a generic loop whose cost grows with the rows. Opt-in
(EngineConfig.half_matmul="float32"), products accumulate in float32 and round once: up to
KERNEL_ROWS rows in expertcache's kernel (kernels/qmm.cpp, the weight widened as it is read; a
decode step, a batch), more rows converted to float32 for torch's float32 GEMM (a prefill). The
results differ from torch's loop only in summation order, within the dtype's rounding, but they
differ from transformers' own model, hence opt-in. `linear(upcast=True)` picks the path by rows;
`upcast_dense` installs it on a model's dense nn.Linear modules. docs/ARCHITECTURE.md measures.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .config import KERNEL_ROWS, UPCAST_ROWS


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


def _kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether expertcache's own kernel takes this product: a slow half type, up to KERNEL_ROWS
    rows, the weight's rows contiguous, and the kernel built (kernels/qmm.cpp: hmm)."""
    if x.dtype != w.dtype or w.dim() != 2 or w.stride(-1) != 1 or x.numel() > KERNEL_ROWS * x.shape[-1] or not slow_half(x.dtype):
        return False
    return _kernel_built()


@functools.cache
def _kernel_built() -> bool:
    from . import kernels

    return kernels.available()


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, upcast: bool = False) -> torch.Tensor:
    """F.linear(x, w, bias); with `upcast`, a slow half type's product accumulated in float32 and
    rounded once: by expertcache's kernel up to KERNEL_ROWS rows (the weight widened as it is
    read), else through float32 from UPCAST_ROWS rows (converted, then the float32 GEMM)."""
    if upcast and _kernel(x, w):
        rows = x.reshape(-1, x.shape[-1])
        if bias is None:  # the kernel rounds its float32 sums once, to x's dtype
            return torch.ops.expertcache.hmm(rows, [w]).reshape(*x.shape[:-1], w.shape[0])
        y = torch.ops.expertcache.hmm(rows.float(), [w]).reshape(*x.shape[:-1], w.shape[0])
        return (y + bias.float()).to(x.dtype)
    if upcast and _upcast(x, w):
        return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, w, bias)


def matmul(x: torch.Tensor, w: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """x @ w ([.., in] @ [in, out]), as `linear`."""
    if upcast and _upcast(x, w):
        return (x.float() @ w.float()).to(x.dtype)
    return x @ w


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias, upcast=True)


def upcast_dense(model: nn.Module) -> int:
    """Give every plain nn.Linear of `model` whose weight is a slow half type the row-aware path;
    returns how many. Subclasses (quantized linears) keep their own forward."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight is not None and slow_half(m.weight.dtype):
            m.forward = _forward.__get__(m)
            n += 1
    return n
