"""From a rank choice to a PEFT model: uniform LoRA, Sensitivity-LoRA, or AdaLoRA for comparison.

Every method adapts the same target matrices with the same alpha/r (scaling), so runs differ only
in where the ranks go. Sensitivity-LoRA is compared with uniform LoRA at equal trainable LoRA
parameters (a rank on a 384x1536 matrix costs 2.5x one on 384x384), not at equal total rank.
"""
from __future__ import annotations

import math

from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

ALPHA_PER_RANK = 2  # lora_alpha = 2 r everywhere: PEFT's common choice, scaling 2
TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def uniform_config(targets: list[str], avg_rank: int, task: str) -> LoraConfig:
    return LoraConfig(r=avg_rank, lora_alpha=ALPHA_PER_RANK * avg_rank, target_modules=targets,
                      task_type=TASK_TYPES[task])


def sensitivity_config(report, avg_rank: int, task: str) -> LoraConfig:
    """The report's stock LoraConfig at the parameter budget of uniform LoRA at `avg_rank`."""
    return report.lora_config(avg_rank, budget="params", lora_alpha=ALPHA_PER_RANK * avg_rank,
                              task_type=TASK_TYPES[task])


def adalora_config(targets: list[str], avg_rank: int, task: str, total_steps: int) -> AdaLoraConfig:
    """PEFT's AdaLoRA starting 50% above the average rank and pruning down to it (6 -> 4)."""
    init_r = math.ceil(1.5 * avg_rank)
    return AdaLoraConfig(init_r=init_r, target_r=avg_rank, lora_alpha=ALPHA_PER_RANK * avg_rank,
                         target_modules=targets, total_step=total_steps, tinit=total_steps // 10,
                         tfinal=total_steps // 5, deltaT=max(1, total_steps // 50), task_type=TASK_TYPES[task])


def attach(model: nn.Module, config: LoraConfig, fused: bool) -> PeftModel:
    """get_peft_model, then (LoRA only) swap in the fused variable-rank layers."""
    peft_model = get_peft_model(model, config)
    if fused and not isinstance(config, AdaLoraConfig):
        from slora_kernels.nn.fusion import fuse

        fuse(peft_model)
    return peft_model


def lora_parameter_count(model: nn.Module) -> int:
    """Trainable adapter parameters (lora_A/B/E), not the task head that is trained alongside."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n)
