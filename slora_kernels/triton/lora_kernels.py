"""Segmented variable-rank LoRA kernels for a group of G layers that share one input.

Layout: S [N, R] holds the shrink of every layer side by side (layer i in columns
rank_offset_i .. + r_i, R = sum r_i, no padding), Y / C [N, D] the outputs side by side (layer i
in columns col_offset_i .. + d_out_i), and the B factors are flattened back to back into one 1-D
buffer (B_i row-major [d_out_i, r_i] from element b_offset_i). A tile table maps every program to
(layer, first output column, first rank); programs loop over the real r_i in chunks of BLOCK_R,
masked, so a layer pads to a multiple of BLOCK_R inside its tiles and never to the group's
largest rank.

Kernels (launch helpers below; the layout, scales included, is built once per group shape and
cached on the device, so a launch does no host-to-device copy and no sync):
- expand:  C[:, cols_i] = s_i * S_i B_i^T (+ b_i), written, never read: the caller hands C to
           cuBLAS as the addend of the base GEMM (`addmm(C, x, W^T)`), so Y is written once.
- grad_sb: dS_i = s_i * dY_i B_i and dB_i = s_i * dY_i^T S_i from ONE read of dY. A program owns
           (column tile, rank chunk, token split): it accumulates its dB tile in registers over its
           tokens and adds it once, and adds each token block's dS part as it goes, both with fp32
           (fp64 for fp64 operands) atomics into zeroed buffers. Token splits give enough programs
           to fill the GPU when d_out is small. Atomics make the last bits of dS/dB depend on the
           order programs finish (about 1e-7 relative in fp32); under
           torch.use_deterministic_algorithms the op takes a per-layer GEMM path instead.

Dtypes: S and B share the factors' dtype; Y / dY may be another (a bf16 base under float32
factors, PEFT's default). Products run in the factors' dtype (dY cast to it on load, as autograd
casts it for PEFT's mixed-dtype sum): float32 factors use IEEE float32 dots (what cuBLAS gives
PEFT), bf16/fp16 ones tensor cores; accumulation is float32 (float64 for float64 operands).

Tile sizes: BLOCK_N and BLOCK_R are fixed per layout (the tile table depends on them); BLOCK_M,
warps and stages are autotuned on the GPU over a short list, keyed by the group's shape and the
token count's power-of-two bucket (one tuning per bucket, not per sequence length). Under
TRITON_INTERPRET=1 only the first config runs. Addresses are computed in int64.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from slora_kernels.triton import INTERPRET

BLOCK_N = 128
PROGRAMS_PER_SM = 4
MIN_SPLIT_TOKENS = 128  # the backward splits tokens no finer than this (each split adds its dB tile once)


def _configs(*options: tuple[int, int, int]) -> list[triton.Config]:
    """(BLOCK_M, num_warps, num_stages) options; the interpreter runs the first alone."""
    chosen = options[:1] if INTERPRET else options
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in chosen]


def block_r_for(ranks: Sequence[int]) -> int:
    """Rank chunk: 16 while every rank fits one, else 32 (a rank-128 layer then re-reads its own dY
    columns 4 times in the backward; 64-wide chunks would waste most tensor-core work on small ranks)."""
    return 16 if max(ranks) <= 16 else 32


@dataclass(frozen=True)
class SegmentLayout:
    """Per-layer metadata of one group on the kernels' device (built once per shape and scales, cached)."""

    meta: torch.Tensor          # int64 [G, 5]: col_offset, d_out, rank_offset, rank, b_offset
    scales: torch.Tensor        # float32 [G]
    scales64: torch.Tensor      # float64 [G], for float64 operands
    column_tiles: torch.Tensor  # int32 [T, 3]: (layer, first output column, 0)
    grad_tiles: torch.Tensor    # int32 [T, 3]: (layer, first output column, first rank)
    total_rank: int
    total_out: int
    b_numel: int
    block_n: int
    block_r: int

    def scale_tensor(self, wide: bool) -> torch.Tensor:
        return self.scales64 if wide else self.scales


@functools.lru_cache(maxsize=256)
def segment_layout(d_outs: tuple[int, ...], ranks: tuple[int, ...], scales: tuple[float, ...], device: torch.device,
                   block_n: int = BLOCK_N, block_r: int | None = None) -> SegmentLayout:
    """Offsets, scales and tile tables of a group with these output sizes, ranks and scales."""
    block_r = block_r or block_r_for(ranks)
    meta, columns, grads = [], [], []
    col = rank_off = b_off = 0
    for i, (d_out, r) in enumerate(zip(d_outs, ranks)):
        meta.append((col, d_out, rank_off, r, b_off))
        columns += [(i, n, 0) for n in range(0, d_out, block_n)]
        grads += [(i, n, k) for n in range(0, d_out, block_n) for k in range(0, r, block_r)]
        col, rank_off, b_off = col + d_out, rank_off + r, b_off + d_out * r

    def table(rows, dtype):
        return torch.tensor(rows, dtype=dtype, device=device)

    return SegmentLayout(table(meta, torch.int64), table(scales, torch.float32), table(scales, torch.float64),
                         table(columns, torch.int32), table(grads, torch.int32), rank_off, col, b_off, block_n, block_r)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@triton.jit
def _tile(tiles_ptr, tile, meta_ptr, scale_ptr):
    """This program's tile: (first column, first rank) and its layer's (col, d_out, rank_off, rank, b_off, scale)."""
    layer, n0, k0 = tl.load(tiles_ptr + 3 * tile), tl.load(tiles_ptr + 3 * tile + 1), tl.load(tiles_ptr + 3 * tile + 2)
    meta = meta_ptr + layer * 5
    return (n0, k0, tl.load(meta), tl.load(meta + 1), tl.load(meta + 2), tl.load(meta + 3), tl.load(meta + 4),
            tl.load(scale_ptr + layer))


@triton.jit
def _offsets_2d(rows, row_stride, cols, col_stride):
    """int64 element offsets of a [rows, cols] tile: row * stride overflows int32 past 2^31 elements."""
    return rows.to(tl.int64)[:, None] * row_stride + cols.to(tl.int64)[None, :] * col_stride


@triton.jit
def _dot(a, b, acc, ACC: tl.constexpr):
    """acc + a @ b: IEEE for float32/float64 operands (cuBLAS-like accuracy), tensor cores for bf16/fp16."""
    if a.dtype == tl.float32 or a.dtype == tl.float64:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    return tl.dot(a, b, acc, out_dtype=ACC)


@triton.autotune(configs=_configs((64, 4, 3), (128, 8, 3), (32, 4, 2)),
                 key=["token_bucket", "total_out", "total_rank", "BLOCK_N", "BLOCK_R"])
@triton.jit
def _expand_kernel(s_ptr, b_ptr, bias_ptr, c_ptr, meta_ptr, scale_ptr, tiles_ptr, n_tokens, stride_s, stride_c,
                   token_bucket, total_out, total_rank, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    n0, _, col, d_out, rank_off, rank, b_off, scale = _tile(tiles_ptr, tl.program_id(1), meta_ptr, scale_ptr)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < n_tokens, offs_n < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, rank, BLOCK_R):
        kk = k + tl.arange(0, BLOCK_R)
        k_ok = kk < rank
        s = tl.load(s_ptr + rank_off + _offsets_2d(offs_m, stride_s, kk, 1), mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b_t = tl.load(b_ptr + b_off + _offsets_2d(kk, 1, offs_n, rank), mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(s, b_t, acc, ACC)
    acc = scale * acc
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col + offs_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    tl.store(c_ptr + col + _offsets_2d(offs_m, stride_c, offs_n, 1), acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_configs((64, 4, 3), (32, 4, 3), (128, 8, 2)),
                 key=["token_bucket", "total_out", "total_rank", "BLOCK_N", "BLOCK_R"],
                 reset_to_zero=["ds_ptr", "db_ptr"])
@triton.jit
def _grad_sb_kernel(dy_ptr, s_ptr, b_ptr, ds_ptr, db_ptr, meta_ptr, scale_ptr, tiles_ptr, n_tokens, stride_dy,
                    stride_s, stride_ds, token_bucket, total_out, total_rank, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    n0, k0, col, d_out, rank_off, rank, b_off, scale = _tile(tiles_ptr, tl.program_id(0), meta_ptr, scale_ptr)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kk = k0 + tl.arange(0, BLOCK_R)
    n_ok, k_ok = offs_n < d_out, kk < rank
    b_tile = tl.load(b_ptr + b_off + _offsets_2d(offs_n, rank, kk, 1), mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    rows_per_split = tl.cdiv(tl.cdiv(n_tokens, tl.num_programs(1)), BLOCK_M) * BLOCK_M
    first = tl.program_id(1) * rows_per_split
    last = tl.minimum(first + rows_per_split, n_tokens)
    grad_b = tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC)
    for m in range(first, last, BLOCK_M):
        mm = m + tl.arange(0, BLOCK_M)
        m_ok = mm < last
        dy = tl.load(dy_ptr + col + _offsets_2d(mm, stride_dy, offs_n, 1), mask=m_ok[:, None] & n_ok[None, :],
                     other=0.0).to(b_ptr.dtype.element_ty)
        s = tl.load(s_ptr + rank_off + _offsets_2d(mm, stride_s, kk, 1), mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        grad_b = _dot(tl.trans(dy), s, grad_b, ACC)
        grad_s = _dot(dy, b_tile, tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC), ACC)
        tl.atomic_add(ds_ptr + rank_off + _offsets_2d(mm, stride_ds, kk, 1), scale * grad_s,
                      mask=m_ok[:, None] & k_ok[None, :])
    tl.atomic_add(db_ptr + b_off + _offsets_2d(offs_n, rank, kk, 1), scale * grad_b, mask=n_ok[:, None] & k_ok[None, :])


def _accumulator(*tensors: torch.Tensor):
    """(accumulator dtype for the kernels, its torch dtype): float64 if any operand is float64."""
    wide = any(t.dtype == torch.float64 for t in tensors)
    return (tl.float64, torch.float64) if wide else (tl.float32, torch.float32)


def lora_expand(s: torch.Tensor, b_flat: torch.Tensor, bias: torch.Tensor | None, layout: SegmentLayout,
                out_dtype: torch.dtype) -> torch.Tensor:
    """C [N, D] in out_dtype with C[:, cols_i] = scales[i] * S_i B_i^T (+ bias); s [N, R] row-major."""
    n_tokens = s.shape[0]
    c = torch.empty((n_tokens, layout.total_out), dtype=out_dtype, device=s.device)
    acc, _ = _accumulator(s, b_flat, c)
    wide = acc == tl.float64
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_M"]), layout.column_tiles.shape[0])  # noqa: E731
    _expand_kernel[grid](s, b_flat, bias if bias is not None else c, c, layout.meta, layout.scale_tensor(wide),
                         layout.column_tiles, n_tokens, s.stride(0), c.stride(0), triton.next_power_of_2(n_tokens),
                         layout.total_out, layout.total_rank, HAS_BIAS=bias is not None, BLOCK_N=layout.block_n,
                         BLOCK_R=layout.block_r, ACC=acc)
    return c


def token_splits(n_tokens: int, layout: SegmentLayout, device: torch.device) -> int:
    """Token splits of the backward: enough programs for PROGRAMS_PER_SM per SM, none under MIN_SPLIT_TOKENS."""
    tiles = layout.grad_tiles.shape[0]
    wanted = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), tiles)
    return max(1, min(wanted, triton.cdiv(n_tokens, MIN_SPLIT_TOKENS)))


def lora_grad_sb(dy: torch.Tensor, s: torch.Tensor, b_flat: torch.Tensor,
                 layout: SegmentLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(dS [N, R], dB flat like the packed B), both in the accumulator dtype (float32, or float64 for
    float64 operands): dS_i = scales[i] * dY_i B_i, dB_i = scales[i] * dY_i^T S_i, one read of dY."""
    n_tokens = dy.shape[0]
    acc, acc_dtype = _accumulator(dy, s, b_flat)
    ds = torch.zeros((n_tokens, layout.total_rank), dtype=acc_dtype, device=dy.device)
    db = torch.zeros((layout.b_numel,), dtype=acc_dtype, device=dy.device)
    grid = (layout.grad_tiles.shape[0], token_splits(n_tokens, layout, dy.device))
    _grad_sb_kernel[grid](dy, s, b_flat, ds, db, layout.meta, layout.scale_tensor(acc == tl.float64),
                          layout.grad_tiles, n_tokens, dy.stride(0), s.stride(0), ds.stride(0), triton.next_power_of_2(n_tokens),
                          layout.total_out, layout.total_rank, BLOCK_N=layout.block_n, BLOCK_R=layout.block_r, ACC=acc)
    return ds, db
