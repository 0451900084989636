"""estimate_sensitivity: run calibration batches through a model and report per-matrix sensitivity."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Literal, get_args

import torch
from torch import nn
from tqdm.auto import tqdm

from slora_kernels.layers import features, is_conv1d
from slora_kernels.ops.utils import check_int
from slora_kernels.sensitivity.collect import (ActivationCollector, Collector, FisherCollector,
                                               HutchinsonCollector)
from slora_kernels.sensitivity.combine import Components, Weighting, combine
from slora_kernels.sensitivity.metrics import metrics
from slora_kernels.sensitivity.report import MatrixSensitivity, SensitivityReport
from slora_kernels.sensitivity.sequential import run_sequential
from slora_kernels.sensitivity.targets import find_targets

Estimator = Literal["activation", "fisher", "hutchinson"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
Layout = Literal["parameter", "feature"]
Offload = Literal[None, "sequential"]


def input_device(model: nn.Module) -> torch.device:
    """Where the model takes its inputs: the execution device of accelerate's hooks (on the model or its
    first hooked submodule), else that of its first parameter or buffer not on the meta device, else cpu."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", (hook,)):  # accelerate's SequentialHook chains several
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device)
    for tensor in chain(model.parameters(), model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def _collector(targets: dict[str, nn.Linear], estimator: str, per_sample: bool, probes: int, seed: int,
               device: torch.device | None = None) -> Collector:
    if estimator == "activation":
        return ActivationCollector(targets, device)
    if estimator == "fisher":
        return FisherCollector(targets, per_sample, device)
    if estimator == "hutchinson":
        offloaded = [n for n, m in targets.items() if m.weight.is_meta]
        if offloaded:  # its double backward differentiates w.r.t. the weight tensors themselves
            raise ValueError(f"estimator='hutchinson' needs the target weights in memory, but these are offloaded "
                             f"(on the meta device): {offloaded[:8]}; with offloaded weights use estimator="
                             f"'activation' or 'fisher'")
        return HutchinsonCollector(targets, check_int("probes", probes), seed, device)
    expected = ", ".join(map(repr, ESTIMATORS[:-1])) + f" or {ESTIMATORS[-1]!r}"
    raise ValueError(f"estimator must be {expected}, got {estimator!r}")


def _inputs(batches: Iterable[Mapping], device: torch.device, max_batches: int | None) -> Iterator[dict]:
    """The first max_batches batches as dicts with their tensors on `device`."""
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            return
        if not isinstance(batch, Mapping):  # dicts, and transformers' BatchEncoding from collators
            raise TypeError(f"batches must yield dicts of model inputs, got {type(batch).__name__} at batch {index}")
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextmanager
def _measuring(model: nn.Module, collector: Collector) -> Iterator[None]:
    """Hooks attached, parameters frozen, eval mode; all restored afterwards."""
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()  # no dropout while measuring
    for p, _ in frozen:
        p.requires_grad_(False)  # no weight gradients: only the hooks' accumulators are filled
    collector.attach()
    try:
        yield
    finally:
        collector.detach()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)


def _run(model: nn.Module, collector: Collector, batches: Iterable[Mapping], max_batches: int | None,
         progress: bool) -> None:
    """The whole model on each batch in turn."""
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    inputs = _inputs(batches, input_device(model), max_batches)
    with _measuring(model, collector):
        for batch in tqdm(inputs, total=total, disable=not progress, desc="sensitivity"):
            collector.run_batch(model, batch)


def _compute_device(offload: Offload, estimator: str, device: str | torch.device | None) -> torch.device | None:
    """The device of offload="sequential"'s blocks (None without it), after checking the combination."""
    if offload is None:
        if device is not None:
            raise ValueError(f"device is used only with offload='sequential' (the blocks' compute device), got "
                             f"device={device!r} with offload=None; the model's own placement decides otherwise")
        return None
    if offload != "sequential":
        raise ValueError(f"offload must be None or 'sequential', got {offload!r}")
    if estimator != "activation":
        raise ValueError(f"offload='sequential' supports only estimator='activation' (the other estimators need "
                         f"the backward pass through the whole model), got estimator={estimator!r}; for 'fisher' "
                         f"use offload=None on a model dispatched with accelerate's offload")
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


def estimate_sensitivity(model: nn.Module, batches: Iterable[Mapping], *, target_modules: str | Sequence[str],
                         estimator: Estimator = "activation", diag_layout: Layout = "parameter",
                         max_batches: int | None = None, progress: bool = True, per_sample: bool = False,
                         probes: int = 8, seed: int = 0, topk_fraction: float = 0.5, alpha: float = 0.85,
                         components: Components = "both", weighting: Weighting = "paper",
                         offload: Offload = None, device: str | torch.device | None = None) -> SensitivityReport:
    """Measure every target nn.Linear or transformers Conv1D (GPT-2) on calibration batches (dicts for
    model(**batch)). A Conv1D is reported as the equivalent nn.Linear ([d_out, d_in] shape and statistics),
    flagged `fan_in_fan_out` so that `lora_config` sets PEFT's option of that name.

    estimator: "activation" (the paper: forward only, H = 2/n X X^T), "fisher" (empirical Fisher
    from the task loss, per token or per_sample; needs labels) or "hutchinson" (`probes`
    Rademacher probes per batch, seeded; needs labels). diag_layout: "parameter" counts every
    weight's diagonal entry (the paper's N = d_out * d_in, exact without materialising), "feature"
    the d_in input features (the mean over rows). Under torch.distributed each rank passes its
    own batches and every rank gets the report of all of them; for hutchinson, the report of one
    process on the batches dealt round-robin to the ranks (rank r's k-th batch is batch k * world + r
    of that process's), probes included (`HutchinsonCollector`).

    Models larger than memory: a model dispatched by accelerate (`dispatch_model`, `cpu_offload`,
    `disk_offload`, `from_pretrained(device_map=..., offload_folder=...)`) works as it is for "activation"
    and "fisher" (inputs go to the hooks' execution device). offload="sequential" (activation only) runs
    one transformer block at a time on `device` (default cuda if available, else cpu) over cached block
    inputs for all batches, as GPTQ does: each block's weights move once for all batches
    (`slora_kernels.sensitivity.sequential`); every target must sit in the blocks. Same theta either way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if diag_layout not in ("parameter", "feature"):
        raise ValueError(f"diag_layout must be 'parameter' or 'feature', got {diag_layout!r}")
    if max_batches is not None:
        check_int("max_batches", max_batches)
    compute_device = _compute_device(offload, estimator, device)
    targets = find_targets(model, target_modules)
    collector = _collector(targets, estimator, per_sample, probes, seed, compute_device or input_device(model))
    if compute_device is None:
        _run(model, collector, batches, max_batches, progress)
    else:
        with _measuring(model, collector):
            run_sequential(model, collector, _inputs(batches, input_device(model), max_batches), compute_device,
                           progress)
    collector.reduce()
    if collector.batches == 0:
        raise ValueError("batches yielded no batch: the estimate needs at least one calibration batch")
    unseen = [n for n, t in collector.tokens.items() if t == 0]
    if unseen:
        raise ValueError(f"these target modules saw no unmasked token (not called in the forward pass, "
                         f"or every token masked): {unseen[:8]}")
    by_name = {}
    for name, module in targets.items():
        diag = collector.diagonal(name)
        if diag_layout == "feature" and diag.dim() == 2:
            diag = diag.mean(0)
        repeat = features(module)[0] if diag_layout == "parameter" and diag.dim() == 1 else 1
        by_name[name] = metrics(diag, repeat=repeat, topk_fraction=topk_fraction, alpha=alpha)
    theta = combine(by_name, components=components, weighting=weighting)
    settings = {"estimator": estimator, "diag_layout": diag_layout, "topk_fraction": topk_fraction, "alpha": alpha,
                "components": components, "weighting": weighting, "batches": collector.batches,
                "samples": collector.samples}
    if estimator == "fisher":
        settings["per_sample"] = per_sample
    if estimator == "hutchinson":
        settings.update(probes=probes, seed=seed)
    if offload is not None:
        settings["offload"] = offload
    return SensitivityReport([MatrixSensitivity(n, features(m), collector.tokens[n], by_name[n], theta[n], is_conv1d(m))
                              for n, m in targets.items()], settings)
