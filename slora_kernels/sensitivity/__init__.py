"""Sensitivity of each adapted weight matrix, steps 1-3 of the method (README, "The method"):
collection of the Hessian diagonal, the three metrics, their combination into theta."""
from slora_kernels.sensitivity.combine import combine
from slora_kernels.sensitivity.estimate import estimate_sensitivity
from slora_kernels.sensitivity.metrics import Metrics, metrics
from slora_kernels.sensitivity.report import MatrixSensitivity, SensitivityReport, lora_config_for_ranks

__all__ = ["MatrixSensitivity", "Metrics", "SensitivityReport", "combine", "estimate_sensitivity",
           "lora_config_for_ranks", "metrics"]
