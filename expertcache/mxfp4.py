"""MXFP4 expert weights as gpt-oss checkpoints ship them (OCP microscaling FP4): blocks of 32 E2M1
values, two to a byte with the even element in the low nibble, sharing one E8M0 scale 2^(s - 127).
An expert's slice of blocks and scales is read as saved and decoded on use into the compute dtype."""

from __future__ import annotations

import functools

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # by 4-bit code
BLOCK = 32  # values sharing one scale


@functools.cache
def _byte_words() -> torch.Tensor:
    """[256] int32: the two bf16 values a byte holds, packed so that viewed as bf16 the low
    nibble's value comes first (little-endian)."""
    bits = torch.tensor(E2M1, dtype=torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    b = torch.arange(256)
    return bits[b & 15] | (bits[b >> 4] << 16)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks u8 [out, in/32, 16], scales u8 [out, in/32] -> the weight [out, in] in `dtype`. Every
    value is a 2-bit mantissa times a power of two: exact in bf16, and so in float32 after it."""
    values = torch.take(_byte_words(), blocks.long()).view(torch.bfloat16).reshape(*scales.shape, BLOCK)
    values = values * torch.exp2(scales.float() - 127).to(torch.bfloat16)[..., None]  # [out, in/32, 32]
    return values.reshape(blocks.shape[0], -1).to(dtype)
