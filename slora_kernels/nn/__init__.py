"""Fused variable-rank LoRA modules (PEFT's LoRA Linear, computed a shared-input group at a time)."""
from slora_kernels.nn.fused import FusedLoraLinear, LoraGroup

__all__ = ["FusedLoraLinear", "LoraGroup"]
