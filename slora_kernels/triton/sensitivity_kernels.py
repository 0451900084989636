"""Triton kernels that fill the per-matrix sensitivity accumulators (fp32), and their launchers.

- activation_sq: acc[d] += sum over unmasked rows t of x[t, d]^2. Grid (column blocks, row
  splits); each program reads its rows once, squares in registers, and adds its partial column
  sums with one fp32 atomic per column, so no atomics ever touch bf16/fp16 data. Masked rows
  are not loaded.
- fisher_token: acc[o, i] += sum_t g[t, o]^2 x[t, i]^2, a GEMM over tokens with the squares
  taken on load (never stored). Each program owns one output tile: no atomics.
- fisher_sample: acc[o, i] += sum_b (sum_t g[b, t, o] x[b, t, i])^2. Each program owns one
  output tile, loops over b, builds that tile of g_b^T x_b in registers, squares and adds it:
  no per-sample gradient ever reaches memory.
tl.dot accumulates in fp32 (on GPUs, fp32 operands may use TF32: sensitivity statistics only
need ~1e-3 relative accuracy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _activation_sq_kernel(acc_ptr, x_ptr, mask_ptr, n_rows, n_cols, stride_row, rows_per_split,
                          HAS_MASK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    first = tl.program_id(1) * rows_per_split
    last = tl.minimum(first + rows_per_split, n_rows)
    total = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    for start in range(first, last, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < last
        if HAS_MASK:
            row_ok = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        x = tl.load(x_ptr + rows[:, None] * stride_row + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        total += tl.sum(x * x, axis=0)
    tl.atomic_add(acc_ptr + cols, total, mask=col_ok)


@triton.jit
def _fisher_token_kernel(acc_ptr, x_ptr, g_ptr, n_rows, d_in, d_out, stride_x, stride_g,
                         BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok, i_ok = offs_o < d_out, offs_i < d_in
    tile = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        r_ok = rows < n_rows
        g = tl.load(g_ptr + offs_o[:, None] + rows[None, :] * stride_g,
                    mask=o_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)   # [O, T] = g^T
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs_i[None, :],
                    mask=r_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)   # [T, I]
        tile = tl.dot(g * g, x * x, tile)
    ptrs = acc_ptr + offs_o[:, None] * d_in + offs_i[None, :]
    ok = o_ok[:, None] & i_ok[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + tile, mask=ok)


@triton.jit
def _fisher_sample_kernel(acc_ptr, x_ptr, g_ptr, n_batch, n_tokens, d_in, d_out,
                          sx_b, sx_t, sg_b, sg_t,
                          BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_ok, i_ok = offs_o < d_out, offs_i < d_in
    total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for b in range(0, n_batch):
        grad = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for start in range(0, n_tokens, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            r_ok = rows < n_tokens
            g = tl.load(g_ptr + b * sg_b + offs_o[:, None] + rows[None, :] * sg_t,
                        mask=o_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_t + offs_i[None, :],
                        mask=r_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
            grad = tl.dot(g, x, grad)
        total += grad * grad
    ptrs = acc_ptr + offs_o[:, None] * d_in + offs_i[None, :]
    ok = o_ok[:, None] & i_ok[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + total, mask=ok)


def activation_sq(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                  block_rows: int = 32, block_cols: int = 128, splits: int | None = None) -> None:
    """acc[d] += sum of x[t]^2 over rows t with mask[t] != 0; x is [N, d] with unit column stride."""
    n_rows, n_cols = x.shape
    if splits is None:  # enough programs to fill the device, each with a few row blocks
        splits = max(1, min(triton.cdiv(n_rows, 4 * block_rows), 256 // triton.cdiv(n_cols, block_cols)))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), block_rows) * block_rows
    grid = (triton.cdiv(n_cols, block_cols), triton.cdiv(n_rows, rows_per_split) if n_rows else 1)
    _activation_sq_kernel[grid](acc, x, mask if mask is not None else x, n_rows, n_cols, x.stride(0),
                                rows_per_split, HAS_MASK=mask is not None,
                                BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)


def fisher_token(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor, *,
                 block_o: int = 64, block_i: int = 64, block_t: int = 32) -> None:
    """acc[o, i] += sum_t g[t, o]^2 x[t, i]^2 for x [N, d_in], g [N, d_out], both unit column stride."""
    d_out, d_in = acc.shape
    grid = (triton.cdiv(d_out, block_o), triton.cdiv(d_in, block_i))
    _fisher_token_kernel[grid](acc, x, g, x.shape[0], d_in, d_out, x.stride(0), g.stride(0),
                               BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t)


def fisher_sample(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor, *,
                  block_o: int = 64, block_i: int = 64, block_t: int = 32) -> None:
    """acc[o, i] += sum_b (g_b^T x_b)[o, i]^2 for x [B, T, d_in], g [B, T, d_out], unit column stride."""
    d_out, d_in = acc.shape
    grid = (triton.cdiv(d_out, block_o), triton.cdiv(d_in, block_i))
    _fisher_sample_kernel[grid](acc, x, g, x.shape[0], x.shape[1], d_in, d_out,
                                x.stride(0), x.stride(1), g.stride(0), g.stride(1),
                                BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=block_t)
