"""Sum the collectors' accumulators and counts across torch.distributed ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes ((0, 1) outside torch.distributed)."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """In place: every rank ends with the sum over ranks (no-op in a single process).

    Tensors are flattened into one buffer per dtype, so a model with hundreds of target matrices
    costs one collective per dtype, not one per matrix.
    """
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
