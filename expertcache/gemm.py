"""Half-precision matmuls on CPUs without a native bf16/fp16 GEMM.

Where oneDNN has no bf16 (fp16) kernel for the CPU (no AVX512-BF16 or AMX: every AVX2 machine),
torch multiplies bf16 matrices with a generic loop at a few GFLOP/s; the same product converted to
float32, multiplied by the float32 GEMM and rounded back runs several times faster once a few
rows share the weight (a prefill), and slower for one or two rows (a decode step: converting the
weight costs more than the product). Both accumulate in float32 and round once to the half type,
so the result differs from the generic loop only in summation order, within the dtype's rounding,
but it does differ from transformers' own model: opt-in (EngineConfig.half_matmul="float32").
`linear(upcast=True)` picks the path by rows; `upcast_dense` installs it on a model's dense
nn.Linear modules. docs/ARCHITECTURE.md has the measurements.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .config import UPCAST_ROWS


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


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, upcast: bool = False) -> torch.Tensor:
    """F.linear(x, w, bias); with `upcast`, through float32 when x has UPCAST_ROWS rows or more of a
    slow half type."""
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
