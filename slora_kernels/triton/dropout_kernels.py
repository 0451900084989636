"""Counter-based dropout on the GPU: the same keep bits as the CPU op `slora::dropout`.

Element i of x (flat, row-major) is kept when the top 24 bits of its 32-bit half of
SplitMix64(seed + (i // 2 + 1) * golden) are below floor((1 - p) * 2^24) (the low half for even i);
kept elements are scaled by 1 / (1 - p). The mask is a pure function of (seed, i): the backward
draws it again instead of reading a stored one, no mask tensor is ever written, and a run on CPU
and on GPU drops the same elements. One read of x, one write of the result.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

BLOCK_PAIRS = 1024


@triton.jit
def _splitmix64(z):
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _hash_dropout_kernel(x_ptr, out_ptr, scale_ptr, n, seed, threshold, BLOCK_PAIRS: tl.constexpr):
    scale = tl.load(scale_ptr)
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    bits = _splitmix64(seed.to(tl.uint64) + (pairs + 1).to(tl.uint64) * 0x9E3779B97F4A7C15)
    for half in tl.static_range(2):
        index = 2 * pairs + half
        ok = index < n
        word = ((bits >> (32 * half)) & 0xFFFFFFFF).to(tl.uint32)
        x = tl.load(x_ptr + index, mask=ok, other=0.0)
        kept = tl.where((word >> 8) < threshold, x.to(scale.dtype) * scale, 0.0)
        tl.store(out_ptr + index, kept.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=64)
def _scale(p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 / (1 - p) on the device, float64 for float64 x and float32 otherwise (as the CPU kernel
    rounds it); cached, so a call copies nothing to the device."""
    return torch.tensor(1.0 / (1.0 - p), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                        device=device)


def hash_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * keep / (1 - p) in x's dtype (half types scaled in float32), contiguous."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(triton.cdiv(n, 2), BLOCK_PAIRS),)
    _hash_dropout_kernel[grid](x, out, _scale(p, x.dtype, x.device), n, seed, math.floor((1.0 - p) * 2**24),
                               BLOCK_PAIRS=BLOCK_PAIRS)
    return out
