"""Counter-based dropout in plain torch: the definition behind `torch.ops.slora.dropout`.

The keep bit of element i of a tensor (flat, row-major) is a pure function of (seed, i): the
SplitMix64 finaliser of seed + (i // 2 + 1) * golden gives 64 bits per element pair, each element
takes one 32-bit half (low half for even i) and is kept when its top 24 bits are below
floor((1 - p) * 2^24). Kept elements are scaled by 1 / (1 - p), as nn.Dropout does. The C++ kernel
(csrc/dropout.cpp) computes the same bits in parallel; this version is the fallback when the
extension is not built and the reference the tests compare the kernel with, bit for bit.
int64 tensors stand in for uint64: products wrap modulo 2^64 and right shifts are masked to be
logical.
"""
from __future__ import annotations

import math

import torch

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _as_int64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned `value`."""
    value %= 1 << 64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def keep_mask(numel: int, p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [numel]: which elements `dropout(x, p, seed)` keeps, for any x with `numel` elements."""
    pairs = torch.arange(1, (numel + 1) // 2 + 1, dtype=torch.int64, device=device)
    z = pairs * _as_int64(_GOLDEN) + _as_int64(seed)
    z = (z ^ _shift_right(z, 30)) * _as_int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _as_int64(_MIX2)
    z = z ^ _shift_right(z, 31)
    halves = torch.stack([z & 0xFFFFFFFF, _shift_right(z, 32)], dim=1).reshape(-1)[:numel]
    return (halves >> 8) < math.floor((1.0 - p) * 2**24)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * keep / (1 - p), contiguous, in x's dtype (half types scaled in float32, as the kernel does)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scaled = x.to(compute) * torch.tensor(1.0 / (1.0 - p), dtype=compute)
    keep = keep_mask(x.numel(), p, seed, x.device).view(x.shape)
    return torch.where(keep, scaled, torch.zeros((), dtype=compute, device=x.device)).to(x.dtype).contiguous()
