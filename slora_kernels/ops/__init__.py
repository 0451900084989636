"""Public ops: argument checks, device dispatch (CUDA -> Triton / CUDA extension, CPU -> torch / C++)."""
from slora_kernels.ops.grouped_lora import grouped_lora
from slora_kernels.ops.pack import pack, unpack

__all__ = ["grouped_lora", "pack", "unpack"]
from slora_kernels.ops.sensitivity import activation_sq_accumulate, fisher_diag_accumulate  # noqa: E402

__all__ += ["activation_sq_accumulate", "fisher_diag_accumulate"]
