"""Public ops: argument checks, device dispatch (CUDA -> Triton / CUDA extension, CPU -> torch / C++)."""
from slora_kernels.ops.pack import pack, unpack

__all__ = ["pack", "unpack"]
