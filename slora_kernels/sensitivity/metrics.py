"""Step 2 of the method (README, "The method"): trace, top-k mean and effective rank of one matrix's Hessian diagonal.

The per-parameter layout counts each input-feature entry d_out times. `repeat` handles that
exactly: the sorted repeated sequence is the sorted unique sequence with every entry counted
`repeat` times, so prefix sums of the repeated sequence follow from the unrepeated ones and no
d_out * d_in tensor is ever built.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from slora_kernels.ops.utils import check_int, check_tensor


@dataclass(frozen=True)
class Metrics:
    """S_global (trace), S_topk (mean of the k largest entries), S_eff (effective rank)."""

    trace: float
    topk: float
    eff_rank: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def metrics(diag: torch.Tensor, *, repeat: int = 1, topk_fraction: float = 0.5, alpha: float = 0.85) -> Metrics:
    """Metrics of a non-negative diagonal whose every entry counts `repeat` times.

    m = numel(diag) * repeat entries, k = max(1, floor(topk_fraction * m)); the effective rank is
    the smallest k whose top-k sum reaches alpha * trace. An all-zero diagonal has no direction
    that carries mass: its effective rank is 0 (the formula's ratio would be 0/0).
    """
    check_tensor("diag", diag, ndim=(1, 2))
    check_int("repeat", repeat)
    topk_fraction = _check_fraction("topk_fraction", topk_fraction)
    alpha = _check_fraction("alpha", alpha)
    if diag.numel() == 0:
        raise ValueError("diag must have at least one entry, got an empty tensor")
    if diag.is_complex() or not (diag.is_floating_point() or diag.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"diag must be a real floating or integer tensor, got {diag.dtype}")
    values = diag.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("diag must contain only finite values, got NaN or inf")
    if bool((values < 0).any()):
        raise ValueError(f"diag must be non-negative, got a minimum of {values.min().item():.6g}")

    lam = torch.sort(values, descending=True).values
    prefix = torch.cumsum(lam, 0)  # prefix[i]: sum of the i+1 largest unique-position entries
    total = prefix[-1].item()
    m = lam.numel() * repeat
    k = max(1, math.floor(topk_fraction * m))
    full, part = divmod(k, repeat)  # the first k repeated entries: `full` whole groups + `part` copies
    topk_sum = (repeat * prefix[full - 1].item() if full else 0.0) + (part * lam[full].item() if part else 0.0)
    return Metrics(trace=repeat * total, topk=topk_sum / k, eff_rank=float(_effective_rank(lam, prefix, repeat, alpha)))


def _effective_rank(lam: torch.Tensor, prefix: torch.Tensor, repeat: int, alpha: float) -> int:
    total = prefix[-1].item()
    if total == 0.0:
        return 0
    target = alpha * total  # compare unrepeated prefixes against alpha * (unrepeated total)
    # first group whose whole-group prefix reaches the target, then the copies needed within it
    i = int(torch.searchsorted(prefix, prefix.new_tensor([target]), side="left").item())
    i = min(i, lam.numel() - 1)
    before = prefix[i - 1].item() if i else 0.0
    copies = math.ceil(repeat * (target - before) / lam[i].item())
    return i * repeat + min(max(copies, 1), repeat)
