"""Sensitivity of each adapted weight matrix (METHOD.md Steps 1-3): collection, metrics, combination."""
from slora_kernels.sensitivity.combine import combine
from slora_kernels.sensitivity.metrics import Metrics, metrics

__all__ = ["Metrics", "combine", "metrics"]
