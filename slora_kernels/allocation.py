"""Step 4 of the method (README, "The method"): integer LoRA ranks from sensitivities under an exact budget.

SRA (the paper): rank proportional to theta. The paper does not say how to round; here the
continuous ranks are clamped to [min_rank, max_rank] by water-filling (what clamping frees or
takes is spread over the unclamped matrices in proportion to theta), then rounded by largest
remainder, ties broken by name, so the integers sum exactly to the budget.
PRA (the paper's rejected tiered rule): sort by theta, split into tiers, give the tiers ranks
stepping down around the average, e.g. 6 matrices, average 5, 3 tiers -> 6, 6, 5, 5, 4, 4.

Budgets count rank units by default. With `cost` (per name, the trainable parameters one rank
costs, d_in + d_out for LoRA) the budget counts parameters instead: ranks stay proportional to
theta, the parameters spent are at most the budget, and no matrix rounded down could take one
more rank within what is left. Compare against uniform LoRA at equal parameters this way.

min_rank=0 lets a matrix get no adapter at all: at tight budgets the choice that matters is which
matrices get any rank (a rank-0 matrix costs nothing, so the budget is spent on adapted ones only).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

from slora_kernels.ops.utils import check_int

Strategy = Literal["sra", "pra"]


def _per_name(name: str, value: object, names: list[str], default: float, minimum: int) -> dict[str, float]:
    """An int for every name, or a dict that must cover every name."""
    if value is None:
        return dict.fromkeys(names, default)
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise ValueError(f"{name} has no entry for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return {n: check_int(f"{name}[{n!r}]", value[n], minimum) for n in names}
    v = check_int(name, value, minimum)
    return dict.fromkeys(names, v)


def _water_fill(weight: np.ndarray, cost: np.ndarray, budget: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Continuous r = clip(c * weight, lo, hi) with sum(cost * r) = budget (feasibility checked by the caller).

    sum(cost * r) is nondecreasing in c: bisect for the set of unclamped matrices, then solve
    for c exactly on it. Matrices without weight stay at lo unless the weighted ones all reach
    hi; then they share what is left equally.
    """
    pos = weight > 0
    if math.fsum(cost[pos] * hi[pos]) + math.fsum(cost[~pos] * lo[~pos]) < budget:
        r = np.where(pos, hi, lo)
        rest = ~pos
        r[rest] = _water_fill(np.ones(int(rest.sum())), cost[rest], budget - math.fsum(cost[pos] * hi[pos]),
                              lo[rest], hi[rest])
        return r

    def spent(c: float) -> float:
        return math.fsum(cost * np.clip(c * weight, lo, hi))

    c_lo, c_hi = 0.0, 1.0
    while spent(c_hi) < budget:
        c_lo, c_hi = c_hi, 2.0 * c_hi
    for _ in range(200):
        mid = 0.5 * (c_lo + c_hi)
        if mid in (c_lo, c_hi):
            break
        c_lo, c_hi = (mid, c_hi) if spent(mid) < budget else (c_lo, mid)
    r = np.clip(c_hi * weight, lo, hi)
    free = (c_lo * weight < hi) & (c_hi * weight > lo)
    if free.any():
        c = (budget - math.fsum(cost[~free] * r[~free])) / math.fsum(cost[free] * weight[free])
        r[free] = np.clip(c * weight[free], lo[free], hi[free])
    return r


def _round(cont: dict[str, float], cost: dict[str, float], budget: int, hi: dict[str, float]) -> dict[str, int]:
    """Floor, then +1 by largest remainder (ties by name) while the budget allows."""
    ranks = {n: math.floor(v + 1e-9) for n, v in cont.items()}
    left = budget - sum(cost[n] * r for n, r in ranks.items())
    order = sorted((n for n in ranks if ranks[n] < hi[n]), key=lambda n: (-(cont[n] - ranks[n]), n))
    for n in order:
        if left <= 0:
            break
        if cost[n] <= left:
            ranks[n] += 1
            left -= cost[n]
    return ranks


def _pra_weights(theta: dict[str, float], tiers: int, average: float, step: float) -> dict[str, float]:
    """Tier targets: sorted by theta (ties by name), tiers as equal as possible, ranks stepping down by
    `step` around `average`; scaled to the exact budget afterwards like SRA's weights."""
    order = sorted(theta, key=lambda n: (-theta[n], n))
    size, extra = divmod(len(order), tiers)
    weights, start = {}, 0
    for t in range(tiers):
        end = start + size + (1 if t < extra else 0)
        for n in order[start:end]:
            weights[n] = max(average + step * ((tiers - 1) / 2 - t), 0.0)
        start = end
    return weights


def allocate_ranks(theta_by_name: Mapping[str, float], total_rank: int, *, strategy: Strategy = "sra",
                   min_rank: int = 1, max_rank: int | Mapping[str, int] | None = None,
                   cost: Mapping[str, int] | None = None, tiers: int = 3, tier_step: float = 1.0) -> dict[str, int]:
    """Integer rank per name, within [min_rank, max_rank], summing exactly to `total_rank`.

    With `cost`, `total_rank` is a parameter budget: sum(cost[n] * rank[n]) <= total_rank.
    min_rank=0 allows rank 0 (the matrix gets no adapter); at least one matrix always gets a rank.
    `tiers` and `tier_step` (rank difference between neighbouring tiers) only apply to "pra".
    Raises ValueError with the feasible range when the budget cannot be met.
    """
    if not isinstance(theta_by_name, Mapping):
        raise TypeError(f"theta_by_name must be a mapping name -> theta, got {type(theta_by_name).__name__}")
    if not theta_by_name:
        raise ValueError("theta_by_name must hold at least one matrix, got an empty mapping")
    names = list(theta_by_name)
    theta: dict[str, float] = {}
    for n in names:
        v = theta_by_name[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"theta_by_name[{n!r}] must be a finite number >= 0, got {v!r}")
        theta[n] = float(v)
    if strategy not in ("sra", "pra"):
        raise ValueError(f"strategy must be 'sra' or 'pra', got {strategy!r}")
    check_int("total_rank", total_rank, 1)
    check_int("min_rank", min_rank, 0)
    check_int("tiers", tiers, 1)
    lo = dict.fromkeys(names, float(min_rank))
    hi = _per_name("max_rank", max_rank, names, math.inf, 1)
    bad = [n for n in names if hi[n] < min_rank]
    if bad:
        raise ValueError(f"max_rank is below min_rank={min_rank} for {bad[:5]}")
    unit = _per_name("cost", cost, names, 1, 1)
    low_budget = sum(unit[n] * lo[n] for n in names)
    high_budget = math.fsum(unit[n] * hi[n] for n in names)
    what = "parameter budget" if cost is not None else "total_rank"
    if not low_budget <= total_rank <= high_budget:
        raise ValueError(f"{what}={total_rank} is infeasible for {len(names)} matrices: it must lie in "
                         f"[{int(low_budget)}, {high_budget if math.isinf(high_budget) else int(high_budget)}] "
                         f"(min_rank and max_rank{' times cost' if cost is not None else ''})")
    if total_rank < min(unit.values()):  # only reachable with min_rank=0 and a parameter budget
        raise ValueError(f"{what}={total_rank} leaves every matrix at rank 0: one rank of the cheapest matrix "
                         f"costs {int(min(unit.values()))}")
    weight = theta
    if strategy == "pra":
        weight = _pra_weights(theta, tiers, total_rank / math.fsum(unit.values()), tier_step)
    if not any(w > 0 for w in weight.values()):
        weight = dict.fromkeys(names, 1.0)
    arrays = [np.array([d[n] for n in names], dtype=np.float64) for d in (weight, unit, lo, hi)]
    cont = dict(zip(names, _water_fill(arrays[0], arrays[1], float(total_rank), arrays[2], arrays[3]).tolist()))
    return _round(cont, unit, total_rank, hi)
