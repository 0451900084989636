"""What the ops share: argument checks (each error names the argument and what was expected), the
floating dtypes they accept, and the choice of the Triton path."""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
SEED_BOUND = 2**62


def check_tensor(name: str, value: object, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    allowed_ndim = (ndim,) if isinstance(ndim, int) else ndim
    if allowed_ndim is not None and value.dim() not in allowed_ndim:
        expected = " or ".join(f"{d}-D" for d in allowed_ndim)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).removeprefix('torch.')}")
    return value


def check_same(name: str, index: int, value: torch.Tensor, reference: torch.Tensor, attr: str,
               reference_name: str | None = None) -> None:
    """Raise if value.attr (dtype or device) differs from reference.attr; reference_name defaults to name[0]."""
    got, want = getattr(value, attr), getattr(reference, attr)
    if got != want:
        error = TypeError if attr == "dtype" else ValueError
        raise error(f"{name}[{index}] has {attr} {got}, expected {want} like {reference_name or f'{name}[0]'}")


def check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def triton_path(t: torch.Tensor) -> bool:
    """CUDA tensors take the Triton kernels. The ops look this up on the module at each call, so
    tests and the GPU suite's dry run can route CPU tensors there (run by Triton's interpreter)."""
    return t.is_cuda


def draw_seed() -> int:
    """A dropout seed from torch's global RNG (torch.manual_seed makes runs repeat)."""
    return int(torch.randint(SEED_BOUND, (1,)).item())
