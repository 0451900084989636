"""Step 3 of the method (README, "The method"): weight the metrics across matrices into one
sensitivity theta per matrix.

beta1 = sigma(S_topk)/mu(S_topk)^2, beta2 = sigma(S_eff)/mu(S_eff)^2, S_local = beta1 S_topk +
beta2 S_eff; gamma1, gamma2 likewise for S_global and S_local; theta = gamma1 S_global + gamma2
S_local. sigma is the POPULATION standard deviation (ddof=0), mu the mean, over all matrices.

Degenerate cases, by design never NaN:
- a metric equal on every matrix (this includes a single matrix) has sigma = 0: it cannot tell
  matrices apart and gets weight 0; a metric that is 0 everywhere (mu = 0) likewise gets weight 0;
- if every weight is 0 (nothing separates the matrices), theta is 1.0 for every matrix, so the
  allocation is uniform, which is what plain LoRA would do.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from slora_kernels.sensitivity.metrics import Metrics

Components = Literal["both", "global", "local"]
Weighting = Literal["paper", "equal"]
METRIC_FIELDS = ("trace", "topk", "eff_rank")


def _weight(values: Sequence[float], weighting: Weighting) -> float:
    """sigma/mu^2 ("paper") or 1/mu ("equal"); 0 when the metric cannot separate the matrices."""
    mu = math.fsum(values) / len(values)
    sigma = math.sqrt(math.fsum((v - mu) ** 2 for v in values) / len(values))
    if mu <= 0.0 or sigma <= 1e-12 * mu:
        return 0.0
    return sigma / mu**2 if weighting == "paper" else 1.0 / mu


def _check_metrics(metrics_by_name: Mapping[str, Metrics]) -> None:
    if not isinstance(metrics_by_name, Mapping):
        raise TypeError(f"metrics_by_name must be a mapping name -> Metrics, got {type(metrics_by_name).__name__}")
    if not metrics_by_name:
        raise ValueError("metrics_by_name must hold at least one matrix, got an empty mapping")
    for name, m in metrics_by_name.items():
        for field in METRIC_FIELDS:
            value = getattr(m, field, None)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metrics_by_name[{name!r}].{field} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"metrics_by_name[{name!r}].{field} must be finite and >= 0, got {value}")


def combine(metrics_by_name: Mapping[str, Metrics], *, components: Components = "both",
            weighting: Weighting = "paper") -> dict[str, float]:
    """theta per matrix name (see the module docstring for formulas and fallbacks).

    components: "both" (the paper), "global" (theta = gamma1 S_global) or "local" (theta =
    gamma2 S_local), the paper's ablations. weighting: "paper" (sigma/mu^2) or "equal" (each
    metric divided by its mean and weighted 1, the paper's equal-weights ablation made
    scale-free). Either way theta does not change when every diagonal is scaled by one factor.
    """
    _check_metrics(metrics_by_name)
    if components not in ("both", "global", "local"):
        raise ValueError(f"components must be 'both', 'global' or 'local', got {components!r}")
    if weighting not in ("paper", "equal"):
        raise ValueError(f"weighting must be 'paper' or 'equal', got {weighting!r}")
    names = list(metrics_by_name)
    column = {f: [float(getattr(metrics_by_name[n], f)) for n in names] for f in METRIC_FIELDS}
    beta1, beta2 = _weight(column["topk"], weighting), _weight(column["eff_rank"], weighting)
    local = [beta1 * t + beta2 * e for t, e in zip(column["topk"], column["eff_rank"])]
    gamma1 = _weight(column["trace"], weighting) if components != "local" else 0.0
    gamma2 = _weight(local, weighting) if components != "global" else 0.0
    theta = [gamma1 * g + gamma2 * s for g, s in zip(column["trace"], local)]
    if not any(t > 0 for t in theta):
        return dict.fromkeys(names, 1.0)
    return dict(zip(names, theta))
