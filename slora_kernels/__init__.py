"""slora_kernels: Sensitivity-LoRA (arXiv 2509.09119) with fused kernels.

Measure per-matrix sensitivity, allocate LoRA ranks under an exact budget, emit a stock PEFT
LoraConfig, and train with fused variable-rank LoRA layers.
"""
from slora_kernels.ops._extension import HAS_EXTENSION, WITH_CUDA
from slora_kernels._version import __version__

__all__ = ["HAS_EXTENSION", "WITH_CUDA", "__version__"]
from slora_kernels.allocation import allocate_ranks  # noqa: E402
from slora_kernels.sensitivity import (Metrics, SensitivityReport, combine, estimate_sensitivity,  # noqa: E402
                                      metrics)

__all__ += ["Metrics", "SensitivityReport", "allocate_ranks", "combine", "estimate_sensitivity", "metrics"]


def __getattr__(name: str):
    # fuse / unfuse / fusion_stats need peft (several seconds to import): load them on first use only.
    if name in ("fuse", "unfuse", "fusion_stats"):
        from slora_kernels.nn import fusion

        return getattr(fusion, name)
    if name == "export_adapter":  # needs peft as well
        from slora_kernels import export

        return export.export_adapter
    raise AttributeError(f"module 'slora_kernels' has no attribute {name!r}")


__all__ += ["export_adapter", "fuse", "fusion_stats", "unfuse"]
