"""Fused variable-rank LoRA modules (PEFT's LoRA Linear, computed a shared-input group at a time)."""
from slora_kernels.nn.fused import FusedLoraLinear, LoraGroup
from slora_kernels.nn.stats import FusionStats

__all__ = ["FusedLoraLinear", "FusionStats", "LoraGroup"]
