"""The result of a sensitivity run: per-matrix metrics and theta, ranks, a PEFT config, JSON."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from slora_kernels.allocation import Strategy, allocate_ranks
from slora_kernels.ops.utils import check_int
from slora_kernels.sensitivity.metrics import Metrics

FORMAT = "slora_kernels.sensitivity/1"
Budget = Literal["rank", "params"]
AlphaScaling = Literal["constant", "rslora"]
SET_BY_REPORT = ("r", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")


@dataclass(frozen=True)
class MatrixSensitivity:
    name: str                  # full module name, as model.named_modules() gives it
    shape: tuple[int, int]     # (d_out, d_in) of the weight, as nn.Linear stores it
    tokens: int                # unmasked tokens the module saw
    metrics: Metrics
    theta: float
    fan_in_fan_out: bool = False  # a transformers Conv1D (GPT-2), weight stored [d_in, d_out]: PEFT's option


def rank_pattern_key(name: str) -> str:
    """A PEFT rank_pattern/alpha_pattern key that matches exactly this full module name.

    PEFT tests keys with re.match(r"(.*\\.)?(KEY)$", module_name): an anchored, escaped key only
    matches the whole name, never a module whose name merely ends like it.
    """
    return "^" + re.escape(name) + "$"


def lora_config_for_ranks(ranks: Mapping[str, int], avg_rank: int, *, alpha_scaling: AlphaScaling = "constant",
                          **lora_kwargs: Any):
    """A stock peft.LoraConfig giving each module (full name) its rank; rank 0 means no adapter.

    PEFT has no r=0, so rank-0 modules are left out of target_modules (and of the patterns).
    alpha_scaling="constant" keeps lora_alpha / r equal on every module (alpha_pattern), as
    lora_alpha / avg_rank; "rslora" sets use_rslora (scale lora_alpha / sqrt(r)) and one lora_alpha.
    Other keyword arguments (lora_alpha, lora_dropout, modules_to_save, ...) go to LoraConfig unchanged.
    Public so that edited allocations (a hand-tuned or a permuted one) build the same config.
    """
    from peft import LoraConfig

    taken = sorted(set(SET_BY_REPORT) & set(lora_kwargs))
    if taken:
        raise TypeError(f"lora_config sets {taken} itself; pass the other LoraConfig options only")
    if alpha_scaling not in ("constant", "rslora"):
        raise ValueError(f"alpha_scaling must be 'constant' or 'rslora', got {alpha_scaling!r}")
    check_int("avg_rank", avg_rank)
    for name, rank in ranks.items():
        check_int(f"ranks[{name!r}]", rank, 0)
    adapted = {n: r for n, r in ranks.items() if r > 0}
    if not adapted:
        raise ValueError(f"every one of the {len(ranks)} modules has rank 0: a LoRA config needs at least one adapter")
    lora_alpha = lora_kwargs.pop("lora_alpha", LoraConfig.__dataclass_fields__["lora_alpha"].default)
    alpha_pattern = {} if alpha_scaling == "rslora" else {
        rank_pattern_key(n): lora_alpha * r / avg_rank for n, r in adapted.items()}
    return LoraConfig(r=avg_rank, lora_alpha=lora_alpha, target_modules=list(adapted),
                      rank_pattern={rank_pattern_key(n): r for n, r in adapted.items()},
                      alpha_pattern=alpha_pattern, use_rslora=alpha_scaling == "rslora", **lora_kwargs)


@dataclass
class SensitivityReport:
    matrices: list[MatrixSensitivity]
    settings: dict[str, Any] = field(default_factory=dict)  # estimator, layout, options, batches seen

    @property
    def theta(self) -> dict[str, float]:
        return {m.name: m.theta for m in self.matrices}

    def ranks(self, avg_rank: int, *, strategy: Strategy = "sra", budget: Budget = "rank", min_rank: int = 1,
              max_rank: int | Mapping[str, int] | None = None, **allocation_kwargs: Any) -> dict[str, int]:
        """Integer rank per matrix for the budget of uniform LoRA at `avg_rank`.

        budget="rank": ranks sum to avg_rank * count (the paper). budget="params": trainable
        parameters (rank * (d_in + d_out)) at most those of uniform LoRA at avg_rank. max_rank
        defaults to min(d_in, d_out) per matrix; an int is also capped there. min_rank=0 lets
        low-theta matrices get rank 0 (no adapter), so the budget goes to the adapted ones.
        """
        if budget not in ("rank", "params"):
            raise ValueError(f"budget must be 'rank' or 'params', got {budget!r}")
        check_int("avg_rank", avg_rank)
        if max_rank is None or isinstance(max_rank, int):
            cap = {m.name: min(m.shape) if max_rank is None else min(max_rank, min(m.shape)) for m in self.matrices}
        else:
            cap = max_rank
        cost = {m.name: sum(m.shape) for m in self.matrices} if budget == "params" else None
        total = avg_rank * (sum(cost.values()) if cost else len(self.matrices))
        return allocate_ranks(self.theta, total, strategy=strategy, min_rank=min_rank, max_rank=cap, cost=cost,
                              **allocation_kwargs)

    def lora_config(self, avg_rank: int, *, alpha_scaling: AlphaScaling = "constant", strategy: Strategy = "sra",
                    budget: Budget = "rank", min_rank: int = 1, max_rank: int | Mapping[str, int] | None = None,
                    **lora_kwargs: Any):
        """A stock peft.LoraConfig for `ranks(...)` (see lora_config_for_ranks): r=avg_rank, one
        rank_pattern entry per adapted matrix (full names); with min_rank=0, rank-0 matrices get no adapter.

        fan_in_fan_out defaults to True when a target is a Conv1D (GPT-2), as PEFT requires there (where
        Linear and Conv1D targets mix, PEFT corrects it per module, with a warning).
        """
        lora_kwargs.setdefault("fan_in_fan_out", any(m.fan_in_fan_out for m in self.matrices))
        ranks = self.ranks(avg_rank, strategy=strategy, budget=budget, min_rank=min_rank, max_rank=max_rank)
        return lora_config_for_ranks(ranks, avg_rank, alpha_scaling=alpha_scaling, **lora_kwargs)

    def to_json(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the report; an existing file is kept unless overwrite=True."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        data = {"format": FORMAT, "settings": self.settings,
                "matrices": [{**asdict(m), "shape": list(m.shape)} for m in self.matrices]}
        path.write_text(json.dumps(data, indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> SensitivityReport:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sensitivity report (expected format {FORMAT!r})")
        return cls([MatrixSensitivity(m["name"], tuple(m["shape"]), m["tokens"], Metrics(**m["metrics"]), m["theta"],
                                      m.get("fan_in_fan_out", False)) for m in data["matrices"]], data["settings"])

    def __str__(self) -> str:
        width = max([len("matrix")] + [len(m.name) for m in self.matrices])
        head = f"{'matrix':<{width}}  {'shape':>11}  {'tokens':>8}  {'trace':>10}  {'top-k':>10}  {'eff.rank':>9}  {'theta':>9}"
        rows = [f"{m.name:<{width}}  {'x'.join(map(str, m.shape)):>11}  {m.tokens:>8}  {m.metrics.trace:>10.4g}  "
                f"{m.metrics.topk:>10.4g}  {m.metrics.eff_rank:>9.0f}  {m.theta:>9.4g}" for m in self.matrices]
        options = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return "\n".join([f"Sensitivity report ({options})", head, "-" * len(head), *rows])
