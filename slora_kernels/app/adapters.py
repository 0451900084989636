"""From a rank choice to a PEFT model: uniform LoRA, Sensitivity-LoRA, or AdaLoRA and EVA for comparison.

Every method adapts the same target matrices with the same alpha/r (scaling), so runs differ only
in where the ranks go. Sensitivity-LoRA is compared with uniform LoRA at equal trainable LoRA
parameters (a rank on a 384x1536 matrix costs 2.5x one on 384x384), not at equal total rank.
"""
from __future__ import annotations

import math

from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import EvaConfig, LoraLayer, initialize_lora_eva_weights
from torch import nn

from slora_kernels.sensitivity.report import lora_config_for_ranks

ALPHA_PER_RANK = 2  # lora_alpha = 2 r everywhere: PEFT's common choice, scaling 2
TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def uniform_config(targets: list[str], avg_rank: int, task: str) -> LoraConfig:
    return LoraConfig(r=avg_rank, lora_alpha=ALPHA_PER_RANK * avg_rank, target_modules=targets,
                      task_type=TASK_TYPES[task])


def sensitivity_config(report, avg_rank: int, task: str, min_rank: int = 1) -> LoraConfig:
    """The report's stock LoraConfig at the parameter budget of uniform LoRA at `avg_rank`."""
    return report.lora_config(avg_rank, budget="params", min_rank=min_rank, lora_alpha=ALPHA_PER_RANK * avg_rank,
                              task_type=TASK_TYPES[task])


def ranks_config(ranks: dict[str, int], avg_rank: int, task: str) -> LoraConfig:
    """LoRA with exactly these ranks (an edited allocation; rank 0: no adapter), alpha/r as everywhere else."""
    return lora_config_for_ranks(ranks, avg_rank, lora_alpha=ALPHA_PER_RANK * avg_rank, task_type=TASK_TYPES[task])


def eva_config(targets: list[str], avg_rank: int, task: str, rho: float = 2.0) -> LoraConfig:
    """PEFT's EVA: A from the SVD of each layer's inputs, rank units redistributed by explained variance
    (up to rho * avg_rank per layer, possibly 0); alpha scaled with the rank so alpha/r stays constant.

    The label mask is off: it expects token labels (causal LM), and classification labels are per text.
    """
    return LoraConfig(r=avg_rank, lora_alpha=ALPHA_PER_RANK * avg_rank, target_modules=targets,
                      task_type=TASK_TYPES[task], init_lora_weights="eva",
                      eva_config=EvaConfig(rho=rho, use_label_mask=False))


def adalora_config(targets: list[str], avg_rank: int, task: str, total_steps: int) -> AdaLoraConfig:
    """PEFT's AdaLoRA starting 50% above the average rank and pruning down to it (6 -> 4)."""
    init_r = math.ceil(1.5 * avg_rank)
    return AdaLoraConfig(init_r=init_r, target_r=avg_rank, lora_alpha=ALPHA_PER_RANK * avg_rank,
                         target_modules=targets, total_step=total_steps, tinit=total_steps // 10,
                         tfinal=total_steps // 5, deltaT=max(1, total_steps // 50), task_type=TASK_TYPES[task])


def attach(model: nn.Module, config: LoraConfig, fused: bool, eva_batches: list[dict] | None = None) -> PeftModel:
    """get_peft_model (EVA: then its SVD initialisation over `eva_batches`, which may change ranks),
    then (LoRA only) swap in the fused variable-rank layers."""
    peft_model = get_peft_model(model, config)
    if config.init_lora_weights == "eva":
        initialize_lora_eva_weights(peft_model, eva_batches, show_progress_bar=False)
    if fused and not isinstance(config, AdaLoraConfig):
        from slora_kernels.nn.fusion import fuse

        fuse(peft_model)
    return peft_model


def adapted_ranks(peft_model: PeftModel, targets: list[str]) -> dict[str, int]:
    """The rank each target ended with (0: no adapter). AdaLoRA: the non-zero entries of E, the rank
    its budget left after pruning."""
    layers = {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
              if isinstance(module, LoraLayer) and "default" in module.lora_A}
    if isinstance(peft_model.peft_config["default"], AdaLoraConfig):
        return {t: int((layers[t].lora_E["default"] != 0).sum()) if t in layers else 0 for t in targets}
    return {t: layers[t].r["default"] if t in layers else 0 for t in targets}


def lora_parameter_count(model: nn.Module) -> int:
    """Trainable adapter parameters (lora_A/B/E), not the task head that is trained alongside."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n)
