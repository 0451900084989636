"""Public accumulation ops for the sensitivity estimators: the squares and products behind step 1.

CUDA tensors go to the fused Triton kernels (slora_kernels.triton.sensitivity_kernels); CPU
tensors take a plain PyTorch path in fp32 (squares materialised, per-sample gradients built in
bounded chunks), which is exact and fast there. Accumulators are fp32; inputs fp32/bf16/fp16.
On CUDA, fp32 inputs use tf32x3 tensor-core products (about fp32 accuracy) and 16-bit inputs exact
products, all summed in fp32, except the per-token Fisher on 16-bit inputs: its squares are rounded
once to bf16 for the tensor cores, so each entry is within 2^-7 + 2^-16 (relative) of the exact sum.
"""
from __future__ import annotations

import torch

from slora_kernels.ops import utils
from slora_kernels.ops.utils import check_tensor

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64, torch.float32)
SAMPLE_CHUNK_ELEMENTS = 1 << 24  # CPU per-sample path: at most this many per-sample gradient entries at once


def _check_acc(acc: object, ndim: int) -> torch.Tensor:
    check_tensor("acc", acc, ndim=ndim, dtypes=(torch.float32,))
    if not acc.is_contiguous():
        raise ValueError("acc must be contiguous (it is updated in place)")
    return acc


def _check_device(name: str, value: torch.Tensor, acc: torch.Tensor) -> None:
    if value.device != acc.device:
        raise ValueError(f"{name} is on {value.device}, expected the device of acc ({acc.device})")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with unit column stride (a view when the layout allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def activation_sq_accumulate(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """acc += sum over the unmasked tokens of x^2 (the diagonal of X X^T); returns acc.

    acc: fp32 [d_in]; x: [..., d_in] fp32/bf16/fp16; mask: None or the shape of x[..., 0],
    nonzero = count the token (an attention mask).
    """
    _check_acc(acc, 1)
    check_tensor("x", x, dtypes=INPUT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != acc.shape[0]:
        raise ValueError(f"x must have last dimension d_in={acc.shape[0]} like acc, got shape {tuple(x.shape)}")
    _check_device("x", x, acc)
    rows = _rows(x)
    flat_mask = None
    if mask is not None:
        check_tensor("mask", mask, dtypes=MASK_DTYPES)
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(x.shape[:-1])} (x without its last dimension), "
                             f"got {tuple(mask.shape)}")
        _check_device("mask", mask, acc)
        flat_mask = mask.reshape(-1)
    if rows.shape[0] == 0:
        return acc
    if utils.triton_path(acc):
        from slora_kernels.triton.sensitivity_kernels import activation_sq

        activation_sq(acc, rows, None if flat_mask is None else (flat_mask != 0).to(torch.int8).contiguous())
        return acc
    if flat_mask is not None:
        rows = rows.index_select(0, flat_mask.nonzero().squeeze(1))  # a copy: padding is never read again
    fresh = flat_mask is not None or rows.dtype != torch.float32  # rows is our own copy: square it in place
    squares = rows.float().square_() if fresh else rows.square()
    # the column sums as a BLAS matrix-vector product: several times faster than .sum(0), einsum or
    # vector_norm when the cores are shared (element-wise reductions suffer most from OpenMP contention)
    return acc.addmv_(squares.t(), squares.new_ones(squares.shape[0]))


def fisher_diag_accumulate(acc: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                           per_sample: bool = False) -> torch.Tensor:
    """Empirical Fisher diagonal of a linear layer's weight, accumulated; returns acc.

    acc: fp32 [d_out, d_in]; x: [B, T, d_in] (inputs), g: [B, T, d_out] (loss gradients of the
    outputs), fp32/bf16/fp16, same dtype. per_sample=False: acc += (g^2)^T (x^2) over all tokens;
    per_sample=True: acc += sum_b (g_b^T x_b)^2, the squared per-sample weight gradient.
    Zero the gradients of padding tokens before calling (they then add nothing).
    """
    _check_acc(acc, 2)
    check_tensor("x", x, ndim=3, dtypes=INPUT_DTYPES)
    check_tensor("g", g, ndim=3, dtypes=INPUT_DTYPES)
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be a bool, got {type(per_sample).__name__}")
    d_out, d_in = acc.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have last dimension d_in={d_in} (acc is [d_out, d_in]), got shape {tuple(x.shape)}")
    if g.shape[-1] != d_out:
        raise ValueError(f"g must have last dimension d_out={d_out} (acc is [d_out, d_in]), got shape {tuple(g.shape)}")
    if g.shape[:2] != x.shape[:2]:
        raise ValueError(f"g must have the batch and token dimensions of x {tuple(x.shape[:2])}, "
                         f"got {tuple(g.shape[:2])}")
    if g.dtype != x.dtype:
        raise TypeError(f"g must have the dtype of x ({x.dtype}), got {g.dtype}")
    _check_device("x", x, acc)
    _check_device("g", g, acc)
    if x.shape[0] * x.shape[1] == 0:
        return acc
    if utils.triton_path(acc):
        from slora_kernels.triton.sensitivity_kernels import fisher_sample, fisher_token

        if per_sample:
            fisher_sample(acc, x if x.stride(-1) == 1 else x.contiguous(), g if g.stride(-1) == 1 else g.contiguous())
        else:
            fisher_token(acc, _rows(x), _rows(g))
        return acc
    if not per_sample:
        xf, gf = _rows(x).float(), _rows(g).float()
        acc.addmm_(gf.square().T, xf.square())
        return acc
    chunk = max(1, SAMPLE_CHUNK_ELEMENTS // (d_out * d_in))
    for start in range(0, x.shape[0], chunk):
        grads = torch.bmm(g[start:start + chunk].float().transpose(1, 2), x[start:start + chunk].float())
        acc += grads.square_().sum(0)
    return acc
