"""Quantized experts: quantize a weight into the pack-quantized format (qformat.py), and compute
on the stored bytes without dequantizing a whole expert per call.

expertcache's own kernel (kernels/qmm.cpp: qmm) computes on an expert's (packed, scale) bytes as
they are. Without it, where one of torch's CPU weight-only kernels fits, the packed bytes are
changed in place once, when the load ends, into its layout (int8 per row -> signed int8 for
aten._weight_int8pack_mm; int4 groups of 32..256, out a multiple of 32 -> torch's int4 CPU tiles);
other schemes and shapes dequantize on use, as the reference does. qmm costs per row: a product of
DENSE_ROWS rows or more (float32: DENSE_ROWS_F32) where torch's GEMM is native has the kernel
dequantize the matrix (dq, compressed-tensors' dequantization bit for bit) and torch's GEMM
multiply it, except bf16 products of up to 32 rows where qmm takes AMX tiles (whose cost hardly
grows with the rows; docs/quantized.md has the figures).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import gemm, kernels
from .config import DENSE_ROWS, DENSE_ROWS_F32
from .qformat import Scheme

NATIVE, INT8_CHANNEL, INT4_TILES, DEQUANT = "expertcache", "int8-channel", "int4-tiles", "dequantize"
ROWS_AT_ONCE = 512  # rows quantize() works on at a time


# --- the format --------------------------------------------------------------------------------
def quantize(w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype,
             error: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed int32 [out, in*bits/32 rounded up], scale [out, groups] in
    `scale_dtype`). Symmetric; each group's scale is the one, among clipped fractions of its
    absolute maximum, whose rounded weights are nearest w in squared error (after rounding the
    scale to `scale_dtype`, which dequantization uses). `error`, if given, gets the squared error
    and the squared norm of w added to its two entries."""
    out, inner = w.shape
    if out > ROWS_AT_ONCE:  # rows are independent: a block at a time bounds the temporaries (~40 MB)
        blocks = [quantize(w[r : r + ROWS_AT_ONCE], scheme, scale_dtype, error) for r in range(0, out, ROWS_AT_ONCE)]
        return torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
    g = scheme.group_size or inner
    groups = -(-inner // g)
    wf = F.pad(w.float(), (0, groups * g - inner)).view(out, groups, g)
    qmax = (1 << (scheme.bits - 1)) - 1
    top = wf.abs().amax(dim=-1, keepdim=True)  # [out, groups, 1]
    best_q = best_s = best_err = None
    fractions = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7) if scheme.bits == 4 else (1.0, 0.97, 0.94, 0.9)
    for c in fractions:
        s = (top * c / qmax).to(scale_dtype).float()
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any scale
        q = torch.clamp(torch.round(wf / s), -qmax - 1, qmax)
        err = ((q * s - wf) ** 2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_q, best_s, best_err = q, s, err
        else:
            better = err < best_err
            best_q, best_s, best_err = torch.where(better, q, best_q), torch.where(better, s, best_s), torch.minimum(err, best_err)
    if error is not None:
        error[0] += float(best_err.sum())
        error[1] += float((wf * wf).sum())
    q = best_q.view(out, groups * g)[:, :inner].to(torch.int16)
    return pack(q, scheme.bits), best_s.view(out, groups).to(scale_dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values [out, in] -> int32 [out, ceil(in*bits/32)]: element i at bit i*bits of its row,
    stored as value + 2^(bits-1) (little-endian words)."""
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 4:
        u = F.pad(u, (0, u.shape[1] % 2))
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    elif bits != 8:
        raise ValueError(f"{bits}-bit packing is not supported")
    u = F.pad(u, (0, -u.shape[1] % 4))
    return u.contiguous().view(torch.int32)


def unpack(packed: torch.Tensor, bits: int, inner: int) -> torch.Tensor:
    """The inverse of `pack`: packed bytes [out, n] (any 1-byte or int32 view) -> int16 values [out, inner]."""
    b = packed.contiguous().view(torch.uint8).view(packed.shape[0], -1)
    if bits == 4:
        b = torch.stack((b & 15, b >> 4), dim=-1).view(b.shape[0], -1)
    return b[:, :inner].to(torch.int16) - (1 << (bits - 1))


def unpack_zero_points(zero: torch.Tensor, bits: int, out: int) -> torch.Tensor:
    """weight_zero_point's bytes (int32 [out*bits/32, groups], any view of them as [words, groups*4]
    bytes) -> int16 zero points [out, groups], packed along the output dimension."""
    words = zero.shape[0]
    b = zero.contiguous().view(torch.uint8).reshape(words, -1, 4).permute(1, 0, 2).reshape(-1, words * 4)  # [groups, bytes]
    return unpack(b, bits, out).t()


def dequantize(packed: torch.Tensor, scale: torch.Tensor, scheme: Scheme, shape: tuple[int, int],
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """The weight [out, in] in the scale's dtype: (value - zero point) * scale, as compressed-tensors
    dequantizes."""
    out, inner = shape
    q = unpack(packed, scheme.bits, inner).to(scale.dtype)
    g = scheme.group_size or inner
    if zero is not None:
        q = q - unpack_zero_points(zero, scheme.bits, out).to(scale.dtype).repeat_interleave(g, dim=1)[:, :inner]
    return q * scale.repeat_interleave(g, dim=1)[:, :inner]


# --- compute on the stored bytes -----------------------------------------------------------------
def kernel_for(scheme: Scheme, shape: tuple[int, int], *, native: bool | None = None) -> str:
    """Which kernel computes a [out, in] weight of `scheme` (`native`: whether expertcache's own
    kernel is there; None: build or find it)."""
    out, inner = shape
    g = scheme.group_size or inner
    if inner % g == 0 and g % (16 if scheme.bits == 4 else 8) == 0 and (native if native is not None else kernels.available()):
        return NATIVE
    if not scheme.symmetric:  # torch's CPU kernels take no zero points (int4's could, as an offset: not wired)
        return DEQUANT
    if scheme.bits == 8 and scheme.group_size is None and inner % 4 == 0:
        return INT8_CHANNEL
    if (scheme.bits == 4 and scheme.group_size in (32, 64, 128, 256) and inner % scheme.group_size == 0
            and out % 32 == 0):
        return INT4_TILES
    return DEQUANT


def _int4_tiles(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [out, in] (out a multiple of 32) -> torch's CPU int4 layout [out, in/2],
    packed by torch's own op: the layout follows the CPU torch runs on (AVX2 and AVX-512 builds of
    _weight_int4pack_mm_for_cpu read different tiles), so it is never written here by hand."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 2)


@dataclass(frozen=True)
class QuantExperts:
    """How a checkpoint's quantized experts are laid out and computed: the scheme and the
    [out, in] shapes of (gate, up, down), each with the kernel that computes it (`native`: whether
    expertcache's own kernel may; None: wherever it builds)."""

    scheme: Scheme
    shapes: tuple[tuple[int, int], ...]
    native: bool | None = None

    @functools.cached_property
    def kernels(self) -> tuple[str, ...]:
        return tuple(kernel_for(self.scheme, s, native=self.native) for s in self.shapes)

    @property
    def repacks(self) -> bool:
        """Whether a load must end with `prepare` (torch's kernels read a layout of their own)."""
        return any(k in (INT8_CHANNEL, INT4_TILES) for k in self.kernels)

    @property
    def per(self) -> int:
        """Tensors per matrix: packed, scale and, asymmetric, zero points."""
        return 2 if self.scheme.symmetric else 3

    def _matrix(self, parts: tuple[torch.Tensor, ...], i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        p = parts[self.per * i : self.per * (i + 1)]
        return p[0], p[1], (p[2] if len(p) > 2 else None)

    def prepare(self, parts: tuple[torch.Tensor, ...]) -> None:
        """Once, when an expert's load ends: change its packed bytes in place into the layout
        each matrix's kernel reads."""
        for i, (kernel, shape) in enumerate(zip(self.kernels, self.shapes)):
            packed = parts[self.per * i]
            if kernel == INT8_CHANNEL:
                packed.bitwise_xor_(0x80)  # value + 128 -> the value's two's complement byte
            elif kernel == INT4_TILES:
                packed.copy_(_int4_tiles(unpack(packed, 4, shape[1]).add_(8).to(torch.uint8)))

    @functools.cached_property
    def tile_rows(self) -> tuple[int, ...]:
        """Per matrix, the bf16 rows up to which qmm multiplies on AMX tiles (their cost hardly grows
        with the rows: faster than dq and torch's GEMM up to there); 0: no tiles for it."""
        if not kernels.available():
            return (0,) * len(self.shapes)
        return tuple(torch.ops.expertcache.qmm_tile_rows(self.scheme.bits, s[1], self.scheme.group_size or s[1]) if k == NATIVE else 0
                     for k, s in zip(self.kernels, self.shapes))

    def _dense(self, x: torch.Tensor, i: int) -> bool:
        """Whether matrix i's product with x goes through dq and torch's GEMM (see the module's doc)."""
        f32 = x.dtype == torch.float32
        if x.shape[0] < (DENSE_ROWS_F32 if f32 else DENSE_ROWS):  # a decode step's rows: answered first
            return False
        if x.dtype == torch.bfloat16 and x.shape[0] <= self.tile_rows[i]:
            return False
        return self.kernels[i] == NATIVE and (f32 or not gemm.slow_half(x.dtype))

    def glu_kernel(self, x: torch.Tensor) -> bool:
        """Whether an expert's three products with x all go to qmm (expertcache's kernel on the
        stored bytes; see _dense): then glu_expert computes the expert in one call."""
        return x.dim() == 2 and self.all_native and not (self._dense(x, 0) or self._dense(x, 1) or self._dense(x, 2))

    @functools.cached_property
    def all_native(self) -> bool:
        """Whether every matrix is multiplied by expertcache's kernel on its stored bytes."""
        return len(self.kernels) == 3 and all(k == NATIVE for k in self.kernels)

    def weight(self, parts: tuple[torch.Tensor, ...], i: int, *, workspace: bool = False) -> torch.Tensor:
        """Matrix i dequantized [out, in] in its scale's dtype, by expertcache's kernel (dq);
        `workspace`: into this thread's buffer for matrix i's shape and dtype, overwritten by its
        next such call (use the result before then)."""
        packed, scale, zero = self._matrix(parts, i)
        shape = self.shapes[i]
        out = _workspace(i, shape, scale.dtype) if workspace else None
        return torch.ops.expertcache.dq(packed, scale, [] if zero is None else [zero], self.scheme.bits,
                                        self.scheme.group_size or shape[1], shape[1], out)

    def gate_up(self, x: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x [n, in] -> [n, 2I]: the gate's and the up projection's outputs side by side (one
        kernel call where expertcache's kernel computes both)."""
        if self._dense(x, 0) and self._dense(x, 1):
            w0, w1 = self.weight(parts, 0, workspace=True), self.weight(parts, 1, workspace=True)
            a, b = gemm.linear_pair(x, w0.to(x.dtype), w1.to(x.dtype))
            return torch.cat([a, b], dim=-1)
        if self.kernels[0] == self.kernels[1] == NATIVE:
            (p0, s0, z0), (p1, s1, z1) = self._matrix(parts, 0), self._matrix(parts, 1)
            return torch.ops.expertcache.qmm(x, [p0, p1], [s0, s1], [z for z in (z0, z1) if z is not None],
                                             self.scheme.bits, self.scheme.group_size or self.shapes[0][1])
        return torch.cat([self.linear(x, parts, 0), self.linear(x, parts, 1)], dim=-1)

    def linear(self, x: torch.Tensor, parts: tuple[torch.Tensor, ...], i: int) -> torch.Tensor:
        """x [n, in] @ matrix i's weight.T -> [n, out], in x's dtype."""
        packed, scale, zero = self._matrix(parts, i)
        kernel, shape = self.kernels[i], self.shapes[i]
        if self._dense(x, i):
            return gemm.linear(x, self.weight(parts, i, workspace=True).to(x.dtype))
        if kernel == NATIVE:
            return torch.ops.expertcache.qmm(x, [packed], [scale], [] if zero is None else [zero], self.scheme.bits,
                                             self.scheme.group_size or shape[1])
        if kernel == INT8_CHANNEL:
            return torch.ops.aten._weight_int8pack_mm(x, packed.view(torch.int8), scale.reshape(-1).to(x.dtype))
        if kernel == INT4_TILES:
            s = scale.to(x.dtype).t()  # [groups, out]
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.scheme.group_size,
                                                              torch.stack((s, torch.zeros_like(s)), dim=-1))
        return F.linear(x, dequantize(packed, scale, self.scheme, shape, zero).to(x.dtype))


_WORKSPACES = threading.local()  # per thread: engines in several threads never share one


def _workspace(i: int, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A dequantized matrix's buffer, one per (matrix index, shape, dtype) and thread: made once,
    reused by every many-row product (an expert's three matrices: 17 MB in bf16 for the 1 GB
    checkpoint's, within the memory plan's workspace reserve)."""
    bufs = getattr(_WORKSPACES, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACES.bufs = {}
    key = (i, shape, dtype)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(shape, dtype=dtype)
    return buf


class QuantLinear(torch.nn.Module):
    """A dense Linear whose weight stays pack-quantized in memory (`quantize --dense int8`),
    computed by expertcache's kernel on the stored bytes."""

    def __init__(self, parts: tuple[torch.Tensor, ...], scheme: Scheme, shape: tuple[int, int],
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.scheme, self.out_features, self.in_features = scheme, *shape
        self.register_buffer("weight_packed", parts[0])
        self.register_buffer("weight_scale", parts[1])
        self.register_buffer("weight_zero_point", parts[2] if len(parts) > 2 else None)  # bytes, as stored
        self.bias = bias
        self.group = scheme.group_size or self.in_features
        self.products = QuantExperts(scheme, (shape,))  # which way a product goes: many rows dequantize for torch's GEMM

    def operands(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """qmm's packed, scale and zero-point lists for this weight (read from the module's buffers
        directly: a decode step calls this dozens of times)."""
        b = self._buffers
        z = b["weight_zero_point"]
        return [b["weight_packed"]], [b["weight_scale"]], [] if z is None else [z]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """qmm on the stored bytes for a few rows (a decode step's); from DENSE_ROWS rows (a prompt's),
        as for experts (QuantExperts._dense), the weight dequantized by dq for torch's GEMM."""
        packed, scale, zeros = self.operands()
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self.products.linear(rows, (*packed, *scale, *zeros), 0)
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
