"""One fine-tuning run end to end: choose ranks (calibrating if needed), attach, train, evaluate.

The CLI's `train`, the demo and benchmarks/allocation_study.py all go through `run`, so the
comparison the demo prints and the study's numbers come from the same code path.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from slora_kernels.app import RANK_CHOICES
from slora_kernels.app.adapters import (adalora_config, adapted_ranks, attach, eva_config, lora_parameter_count,
                                        ranks_config, sensitivity_config, uniform_config)
from slora_kernels.app.data import Dataset, Examples
from slora_kernels.app.training import TrainConfig, batches, evaluate, train


@dataclass
class RunResult:
    method: str
    metrics: dict[str, float]
    lora_params: int
    calib_seconds: float
    train_seconds: float
    steps: int
    tokens: int
    fused: bool
    ranks: dict[str, int] = field(default_factory=dict)  # per target after training (0: no adapter)
    correct: list[bool] | None = field(default=None, repr=False)  # per held-out example (classification)

    def to_dict(self) -> dict:
        """Everything but the per-example results (JSON lines stay small)."""
        return {k: v for k, v in asdict(self).items() if k != "correct"}


def calibrate(model: nn.Module, tokenizer, examples: Examples, targets: list[str], estimator: str,
              batch_size: int, max_length: int, progress: bool = True):
    """The SensitivityReport of `targets` over `examples` (labels included: Fisher needs them)."""
    from slora_kernels.sensitivity import estimate_sensitivity

    return estimate_sensitivity(model, batches(tokenizer, examples, batch_size, max_length),
                                target_modules=targets, estimator=estimator, progress=progress)


def run(model: nn.Module, tokenizer, dataset: Dataset, *, method: str, avg_rank: int, targets: list[str],
        config: TrainConfig, task: str, estimator: str = "activation", calib_samples: int = 512,
        report=None, min_rank: int = 1, transform_ranks: Callable[[dict[str, int]], dict[str, int]] | None = None,
        fused: bool = True, out_dir: Path | None = None) -> tuple[nn.Module, RunResult]:
    """Train `method` (one of RANK_CHOICES) and evaluate it on the held-out split.

    Sensitivity-LoRA calibrates on the first `calib_samples` training texts unless a
    SensitivityReport is given (then calib_seconds counts the allocation only); min_rank=0 lets it
    leave matrices without an adapter, and `transform_ranks` edits its allocation before training
    (the allocation study's permutation control). EVA runs its SVD on the same texts
    (calib_seconds includes it).
    """
    calib_seconds, eva_batches = 0.0, None
    total_steps = config.steps(len(dataset.train))
    calib = dataset.train.head(calib_samples)
    start = time.perf_counter()
    if method == "uniform":
        peft_config = uniform_config(targets, avg_rank, task)
    elif method == "adalora":
        peft_config = adalora_config(targets, avg_rank, task, total_steps)
    elif method == "eva":
        peft_config = eva_config(targets, avg_rank, task)
        eva_batches = list(batches(tokenizer, calib, config.batch_size, config.max_length))
    elif method == "sensitivity":
        if report is None:
            report = calibrate(model, tokenizer, calib, targets, estimator, config.batch_size, config.max_length,
                               config.progress)
        if transform_ranks is None:
            peft_config = sensitivity_config(report, avg_rank, task, min_rank)
        else:
            peft_config = ranks_config(transform_ranks(report.ranks(avg_rank, budget="params", min_rank=min_rank)),
                                       avg_rank, task)
        calib_seconds = time.perf_counter() - start
    else:
        raise ValueError(f"method must be one of {', '.join(RANK_CHOICES)}, got {method!r}")
    peft_model = attach(model, peft_config, fused, eva_batches)
    if method == "eva":
        calib_seconds = time.perf_counter() - start
    after_step = peft_model.base_model.update_and_allocate if method == "adalora" else None
    lora_params = lora_parameter_count(peft_model)
    stats = train(peft_model, tokenizer, dataset.train, config, after_step=after_step)
    evaluation = evaluate(peft_model, tokenizer, dataset.eval, max_length=config.max_length,
                          progress=config.progress)
    if out_dir is not None:
        peft_model.save_pretrained(str(out_dir / "adapter"))
    result = RunResult(method, evaluation.scores, lora_params, calib_seconds, stats.seconds, stats.steps,
                       stats.tokens, fused and method != "adalora", adapted_ranks(peft_model, targets),
                       evaluation.correct)
    return peft_model, result
