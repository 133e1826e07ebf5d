"""Half-precision matmuls through exact kernels that beat torch's own where they give its bits.

AMX CPUs: torch's bf16 GEMM (oneDNN's AMX kernel) copies the whole weight into its layout every
call; amm (kernels/qmm.cpp) runs the same tile instructions on the weight as stored, the same
bits at the memory's rate, for up to AMX_ROWS rows (`amx_kernel` checks it here first).
CPUs without a native bf16/fp16 GEMM (every AVX2 machine): torch multiplies half matrices one
float32 dot product per output in a fixed order; emm adds the same products in the same order,
~3x faster (`exact_kernel` checks it). Opt-in there (half_matmul="float32"), products of more
than KERNEL_ROWS rows go through float32 (another order: not transformers' bits); with upcast,
`install_attention` runs sdpa attention on float32 copies. `linear` picks the path;
`install_dense` gives a model's nn.Linear modules the same. docs/ARCHITECTURE.md measures.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import AMX_MAX_INPUTS, AMX_MIN_INPUTS, AMX_ROWS, KERNEL_ROWS, UPCAST_ROWS

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


@kernels.remembered
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


def _order_sensitive(rows: int, k: int, n: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] and w [n, k] whose products cancel exactly in pairs (the second half of the
    inputs repeats the first in another order, the weight negated), over 2^-8..2^8: every output is
    the rounding error of its float32 sum, so another summation order changes nearly every output's
    bits (plain normal values change ~1 in 10^4)."""
    h = k // 2
    x = torch.randn(rows, h, generator=g) * torch.exp2(torch.randint(-8, 9, (rows, h), generator=g).float())
    w = torch.randn(n, h, generator=g) * torch.exp2(torch.randint(-8, 9, (n, h), generator=g).float())
    p = torch.randperm(h, generator=g)
    return torch.cat([x, x[:, p]], 1).to(dtype), torch.cat([w, -w[:, p]], 1).to(dtype)


@functools.cache
def _cpu_flag(name: str) -> bool:
    """Whether /proc/cpuinfo lists `name` (False where there is none): a CPU without AMX never
    builds the kernels for amm's sake."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and name in line.split() for line in f)
    except OSError:
        return False


@kernels.remembered
def amx_kernel(dtype: torch.dtype) -> bool:
    """Whether expertcache's amm gives torch's own bits for `dtype` products here: bf16 on a CPU
    whose bf16 GEMM is oneDNN's (a native one) and that has AMX, the kernel built, and random
    products built so another order shows (`_order_sensitive`; one, several and sixteen rows, with
    and without bias, outputs not a multiple of 16) equal bit for bit."""
    if dtype != torch.bfloat16 or slow_half(dtype) or not _cpu_flag("amx_bf16"):
        return False
    from . import kernels

    if not kernels.available() or not torch.ops.expertcache.amx():
        return False
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # amm runs on one thread only (see _amm)
    try:
        for rows, k, n in ((1, 1024, 256), (1, AMX_MIN_INPUTS, 80), (1, AMX_MAX_INPUTS, 64), (3, 2048, 67), (16, 64, 37)):
            x, w = _order_sensitive(rows, k, n, dtype, g)
            b = torch.randn(n, generator=g).to(dtype) * 2**-20  # a bias on the scale of the sums' errors
            for bias in (None, b):
                if not torch.equal(torch.ops.expertcache.amm(x, [w], bias).view(torch.int16), F.linear(x, w, bias).view(torch.int16)):
                    log.warning("expertcache's AMX %s kernel differs from torch's on this machine; using torch's", dtype)
                    return False
    finally:
        torch.set_num_threads(threads)
    return True


# --- a decode step's elementwise tails: one kernel call each where it gives torch's bits -------------
def rms_chain(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (Llama's, Mixtral's, Qwen's), written out."""
    hs = h.to(torch.float32)
    hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hs.to(h.dtype)


def rotary_chain(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb's (x * cos) + (rotate_half(x) * sin), written out."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def combine_chain(ys: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """A token's expert outputs [1, H] weighted by weights [1, k] and added in slot order, rounded
    to the outputs' dtype (the runtime's one-token combine)."""
    total = ys[0] * weights[:, 0:1]
    for s in range(1, len(ys)):
        total = total + ys[s] * weights[:, s : s + 1]
    return total.to(ys[0].dtype)


def combine_half_chain(ys: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """The runtime's general path for one token with bf16 weights [1, k]: a [1, k, H] buffer of
    each output times its weight (rounded to bf16), summed over k."""
    contrib = torch.zeros((1, len(ys), ys[0].shape[-1]), dtype=torch.promote_types(ys[0].dtype, weights.dtype))
    for s, y in enumerate(ys):
        contrib[0, s] = y[0] * weights[0, s : s + 1]
    return contrib.sum(dim=1)


@kernels.remembered
def half_combine() -> bool:
    """Whether expertcache's combine gives combine_half_chain's bits for bf16 outputs and weights,
    1 to 8 of them (torch's sum over k in float32, in slot order, rounded once): checked at first
    use on random inputs, since another summation order would show."""
    if not tail_kernels():
        return False
    g = torch.Generator().manual_seed(1)
    for k in (1, 2, 3, 8):
        for n in (64, 200, 1024):
            ys = [(torch.randn(1, n, generator=g) * torch.exp2(torch.randint(-4, 5, (1, n), generator=g).float())).to(torch.bfloat16)
                  for _ in range(k)]
            w = torch.rand(1, k, generator=g).to(torch.bfloat16)
            if not torch.equal(torch.ops.expertcache.combine(ys, w).view(torch.int16), combine_half_chain(ys, w).view(torch.int16)):
                log.warning("expertcache's combine differs from torch's sum of bf16 weighted outputs here; using torch's")
                return False
    return True


@kernels.remembered
def tail_kernels() -> bool:
    """Whether expertcache's rms_tail, rotary and combine give the bits of the chains above here
    (bf16): built, and checked at first use on random inputs with lengths that leave tails (so a
    fused multiply-add or another rounding would show)."""
    from . import kernels

    if not kernels.available():
        return False
    ops = torch.ops.expertcache
    g = torch.Generator().manual_seed(0)
    for n in (64, 200, 1024):
        h = (torch.randn(3, n, generator=g) * 4).to(torch.bfloat16)
        w = (1 + 0.3 * torch.randn(n, generator=g)).to(torch.bfloat16)
        hs = h.to(torch.float32)
        got = ops.rms_tail(hs, hs.pow(2).mean(-1, keepdim=True), w, 1e-6)
        x = torch.randn(1, 5, n, generator=g).to(torch.bfloat16)
        cs = [torch.randn(1, 1, n, generator=g).to(torch.bfloat16) for _ in range(2)]
        ys = [torch.randn(1, n, generator=g).to(torch.bfloat16) for _ in range(3)]
        wk = torch.rand(1, 3, generator=g) * torch.exp2(torch.randint(-6, 7, (1, 3), generator=g).float())
        for mine, theirs in ((got, rms_chain(h, w, 1e-6)), (ops.rotary(x, cs[0], cs[1]), rotary_chain(x, cs[0], cs[1])),
                             (ops.combine(ys, wk), combine_chain(ys, wk))):
            if not torch.equal(mine.view(torch.int16), theirs.view(torch.int16)):
                log.warning("expertcache's elementwise kernels differ from torch's chains here; using torch's")
                return False
    return True


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_chain(h, weight, eps), the same bits, its elementwise tail in one call where it can."""
    if h.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and h.is_contiguous() and tail_kernels():
        hs = h.to(torch.float32)
        var = hs.pow(2).mean(-1, keepdim=True)
        return torch.ops.expertcache.rms_tail(hs.view(-1, hs.shape[-1]), var, weight, eps).view(h.shape)
    return rms_chain(h, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotary_chain(x, cos, sin) for one position (cos, sin [.., d]), the same bits, in one call where it can."""
    if (x.dtype is torch.bfloat16 and cos.dtype is torch.bfloat16 and sin.dtype is torch.bfloat16 and x.is_contiguous()
            and cos.numel() == x.shape[-1] and cos.is_contiguous() and sin.is_contiguous() and tail_kernels()):
        return torch.ops.expertcache.rotary(x, cos, sin)
    return rotary_chain(x, cos, sin)


def combine_kernel(weights: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the combine kernel adds expert outputs of `dtype` (contiguous) with these router weights."""
    half = weights.dtype is torch.bfloat16
    return (dtype is torch.bfloat16 and (weights.dtype is torch.float32 or half) and weights.is_contiguous()
            and (half_combine() if half else tail_kernels()))


def combine(ys: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """A token's expert outputs [1, H] weighted and added as the runtime does: combine_chain for
    float32 weights, combine_half_chain for bf16 ones (Qwen's routers), the same bits, in one call
    where it can (bf16 outputs)."""
    half = weights.dtype is torch.bfloat16
    if combine_kernel(weights, ys[0].dtype) and all(y.dtype is torch.bfloat16 and y.is_contiguous() for y in ys):
        return torch.ops.expertcache.combine(ys, weights)
    return combine_half_chain(ys, weights) if half else combine_chain(ys, weights)


def kernel_name(dtype: torch.dtype) -> str:
    """Which code multiplies `dtype` matrices here (engine stats): "expertcache-exact" (emm),
    "expertcache-amx" (amm, a few rows; torch's oneDNN GEMM the rest), "torch-onednn" (a CPU with
    a native half GEMM), "torch" (torch's loop: no kernel built, or it
    failed its check), or "n/a" (not a half type)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return "n/a"
    if not slow_half(dtype):
        return "expertcache-amx" if amx_kernel(dtype) else "torch-onednn"
    return "expertcache-exact" if exact_kernel(dtype) else "torch"


def _emm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether emm takes this product (no autograd: it is for inference)."""
    return (x.dtype == w.dtype and w.dim() == 2 and w.stride(-1) == 1 and not (x.requires_grad or w.requires_grad)
            and exact_kernel(x.dtype))


def _amm(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether amm takes this product: 1 to AMX_ROWS bf16 rows on one thread, inputs a multiple of
    32, where torch's own product is oneDNN's AMX kernel summing k in one pass (AMX_MIN_INPUTS to
    AMX_MAX_INPUTS inputs, more than 16^3 multiply-adds; with more threads oneDNN may split k), no
    autograd. (A decode step asks this of every product: the cheap tests first.)"""
    if x.dtype is not torch.bfloat16 or x.requires_grad:
        return False
    k = x.shape[-1]
    return _amm_rows(x.numel() // k if k else 0, k, w)


def _amm_rows(rows: int, k: int, w: torch.Tensor) -> bool:
    """_amm for `rows` bf16 rows of k inputs without autograd (the rest of its tests, on w)."""
    return (w.dtype is torch.bfloat16 and 0 < rows <= AMX_ROWS and AMX_MIN_INPUTS <= k <= AMX_MAX_INPUTS and not k % 32
            and w.dim() == 2 and rows * k * w.shape[0] > 4096 and w.stride(1) == 1 and not w.requires_grad
            and torch.get_num_threads() == 1 and amx_kernel(torch.bfloat16))


def amm_expert(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether linear_pair(x, gate, up) and linear(h, down) (h: silu(gate) * up, x's rows) all take amm."""
    return (gate.shape == up.shape and _amm(x, gate) and _amm(x, up)
            and _amm_rows(x.numel() // x.shape[-1], down.shape[-1], down))


def _amm_call(x: torch.Tensor, w: list[torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.dim() == 2:  # an expert's rows: no reshapes (this is a decode step's hot path)
        return torch.ops.expertcache.amm(x, w, bias)
    return torch.ops.expertcache.amm(x.reshape(-1, x.shape[-1]), w, bias).reshape(*x.shape[:-1], -1)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, upcast: bool = False) -> torch.Tensor:
    """F.linear(x, w, bias), bit for bit, through expertcache's kernels where they are exact (amm:
    a few bf16 rows on an AMX CPU; emm: a slow half type); with `upcast`, more than KERNEL_ROWS rows
    of a slow half type instead through float32 (converted, then the float32 GEMM, rounded once)."""
    if _amm(x, w) and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())):
        return _amm_call(x, [w], bias)
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
    if a.shape == b.shape and _amm(x, a) and _amm(x, b):
        n = a.shape[0]
        y = _amm_call(x, [a, b])
        return y[..., :n], y[..., n:]
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


def dense_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """install_dense's forward of a Linear."""
    return linear(x, self.weight, self.bias)


def _forward_upcast(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias, upcast=True)


def install_dense(model: nn.Module, *, upcast: bool = False) -> int:
    """Give every plain nn.Linear of `model` whose weight is a half type `linear`'s paths where one
    applies (a slow half type: the exact kernel, or with `upcast` float32 for many rows; bf16 on an
    AMX CPU: amm for a few rows); returns how many. Subclasses (quantized linears) keep their own
    forward. The kernels are built and checked here, at load, not in the middle of a first forward."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight is not None
               and m.weight.dtype in (torch.bfloat16, torch.float16)]
    takes = {dtype: (upcast and slow_half(dtype)) or exact_kernel(dtype) or amx_kernel(dtype) for dtype in {m.weight.dtype for m in linears}}
    n = 0
    for m in linears:
        if takes[m.weight.dtype]:
            m.forward = (_forward_upcast if upcast else dense_forward).__get__(m)
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
    Returns whether it was installed. The engine's own models (native.py) take it on each attention
    module, with the same operations."""
    params = next(model.parameters(), None)
    if params is None or not slow_half(params.dtype) or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    attentions = [m for m in model.modules() if hasattr(m, "float32_attention")]
    if attentions:
        for m in attentions:
            m.float32_attention = True
        model.config._attn_implementation = FLOAT32_ATTENTION
        return True
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(FLOAT32_ATTENTION, _sdpa_float32)
    AttentionMaskInterface.register(FLOAT32_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation({"": FLOAT32_ATTENTION})  # the model's own config (DBRX's attn_config is no sub-model)
    return model.config._attn_implementation == FLOAT32_ATTENTION
