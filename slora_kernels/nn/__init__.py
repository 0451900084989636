"""Fused variable-rank LoRA modules (PEFT's LoRA layers, computed a shared-input group at a time)."""
from slora_kernels.nn.fused import FusedLoraLayer, FusedLoraLinear, LoraGroup
from slora_kernels.nn.stats import FusionStats

__all__ = ["FusedLoraLayer", "FusedLoraLinear", "FusionStats", "LoraGroup"]
