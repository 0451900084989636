"""The shapes of one GPU-suite run, shared by benchmarks/gpu_suite.py (which measures them) and
benchmarks/roofline.py (which predicts them), so neither imports the other's module for them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Config:
    """Shapes of one run: the issue's GPU shapes, or tiny ones for --dry-run on CPU."""

    device: str
    dtype_names: tuple[str, ...]
    linear_shapes: tuple[tuple[int, int], ...]
    token_counts: tuple[int, ...]
    uniform_ranks: tuple[int, ...]
    skewed_ranks: tuple[int, ...]
    group_d_in: int
    group_d_out: int
    stats_tokens: int
    stats_dim: int
    fisher_batch: int
    fisher_seq: int
    fisher_dims: tuple[int, int]
    pack_segments: int
    pack_n: int
    pack_mean_rank: int

    @staticmethod
    def for_run(dry_run: bool) -> Config:
        if dry_run:
            return Config("cpu", ("float32",), ((48, 40), (48, 72)), (37,), (3, 8), (2, 3, 9, 2),
                          40, 24, 53, 40, 3, 11, (24, 40), 12, 40, 6)
        # Skewed set: 12 modules sharing one input, ranks 4..128 with mean 16 (sum 192).
        skewed = (128, 14, 14) + (4,) * 9
        return Config("cuda", ("float32", "bfloat16", "float16"), ((4096, 4096), (4096, 14336)), (4096, 16384),
                      (8, 16, 64), skewed, 4096, 1024, 16384, 4096, 8, 512, (4096, 4096), 224, 4096, 16)
