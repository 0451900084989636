"""grouped_lora's bodies for CUDA tensors: the segmented Triton kernels around cuBLAS GEMMs.

Forward: S = drop(x) A_cat^T (one GEMM over the packed A); the expand kernel writes every layer's
LoRA term (and bias) side by side into one [N, sum d_out] buffer, which the base GEMMs take as their
addend, so Y is written once: one cuBLAS GEMM per layer into its columns (a strided view cuBLAS writes as
it is; no weight is copied). Backward: dS and dB from one read of dY (a
Triton kernel split over tokens, fp32 atomics; under torch.use_deterministic_algorithms per-layer GEMMs
instead), dA_cat = dS^T drop(x) as one GEMM, dx = dY W + drop(dS A_cat) with the LoRA part as the base
GEMMs' addend (one per layer over its columns of dY).

The packed A and the flat B are built once per forward and handed to the backward; the tile table
and scales live in the caller's layout, on the device, so a call reads nothing back from the GPU.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from slora_kernels.ops import utils
from slora_kernels.ops.pack import pack_layout


def dropout(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """t with each element kept by the counter-based hash of (seed, index) (the CPU op's bits)."""
    if p == 0.0:
        return t
    from slora_kernels.triton.dropout_kernels import hash_dropout

    return hash_dropout(t, p, seed)


def _pack_a(lora_a: list[torch.Tensor]) -> torch.Tensor:
    """A_cat [R, d_in]: the mixed-rank gather, one launch (offsets cached per rank tuple)."""
    if len(lora_a) == 1:
        return lora_a[0]
    offsets, total_rows = pack_layout(tuple(a.shape[0] for a in lora_a), 1, lora_a[0].device)
    return torch.ops.slora.pack(lora_a, offsets, total_rows)


def stacked_biases(tensors: list[torch.Tensor | None], layout) -> torch.Tensor | None:
    """The group's biases [sum d_out] as one tensor (zeros for a layer without a bias; None if none has one)."""
    if len(tensors) == 1:
        return tensors[0]
    if all(t is None for t in tensors):
        return None
    like = next(t for t in tensors if t is not None)
    return torch.cat([like.new_zeros(d) if t is None else t for t, d in zip(tensors, layout.d_outs)])


def pack_factors(lora_a, lora_b):
    """(A_cat [R, d_in], B_flat): A packed by the mixed-rank gather, the B factors back to back."""
    b_flat = lora_b[0].reshape(-1) if len(lora_b) == 1 else torch.cat([b.reshape(-1) for b in lora_b])
    return _pack_a(lora_a), b_flat


def forward(layout, x, operands, seed):
    """([Y], (S, A_cat, B_flat)): Y [N, sum d_out] in x's dtype, the layers side by side (N: x's rows)."""
    from slora_kernels.triton.lora_kernels import lora_expand

    x = x.reshape(-1, x.shape[-1])
    factor_dtype = operands.lora_a[0].dtype
    xf = x if x.dtype == factor_dtype else x.to(factor_dtype)
    a_cat, b_flat = pack_factors(operands.lora_a, operands.lora_b)
    s = torch.mm(dropout(xf, layout.dropout_p, seed), a_cat.t())
    if not operands.weights:  # the LoRA terms alone, in the factors' dtype
        return [lora_expand(s, b_flat, None, layout.segments(x.device), factor_dtype)], (s, a_cat, b_flat)
    lora_term = lora_expand(s, b_flat, stacked_biases(operands.biases, layout), layout.segments(x.device), x.dtype)
    if len(operands.weights) == 1:  # one layer: one GEMM with the term as addend
        return [torch.addmm(lora_term, x, operands.weights[0].t())], (s, a_cat, b_flat)
    for y, w in zip(lora_term.split(layout.d_outs, 1), operands.weights):  # each layer's columns, in place
        y.addmm_(x, w.t())
    return [lora_term], (s, a_cat, b_flat)


def backward(layout, grads, x, weights, has_bias, lora_a, lora_b, saved, seed, need_x, need_weight, need_bias):
    """(dx, dW, db, [dA_i], [dB_i]) from the one [N, sum d_out] output gradient; dW and db one per tensor
    per layer, None where not needed. saved: the forward's
    (S, A_cat, B_flat), or (S,) alone (the factors are packed again)."""
    s, *packed = saved
    a_cat, b_flat = packed or pack_factors(lora_a, lora_b)
    grad_y = grads[0].contiguous()  # the kernels read dY row-major
    shape, x = x.shape, x.reshape(-1, x.shape[-1])
    if not torch.are_deterministic_algorithms_enabled():
        from slora_kernels.triton import lora_kernels

        ds, db = lora_kernels.lora_grad_sb(grad_y, s, b_flat, layout.segments(x.device))
        ds = ds.to(s.dtype)
        grad_b = [g.view_as(b).to(b.dtype, copy=True) for g, b in zip(db.split([b.numel() for b in lora_b]), lora_b)]
    else:
        grad_b, ds_parts = [], []
        for dy, b, s_i, scale in zip(grad_y.split(layout.d_outs, 1), lora_b, s.split(layout.ranks, 1), layout.scales):
            dy = dy.to(s.dtype)
            ds_parts.append(torch.mm(dy, b).mul_(scale))
            grad_b.append(torch.mm(dy.t(), s_i).mul_(scale))
        ds = torch.cat(ds_parts, 1)
    xf = x if x.dtype == s.dtype else x.to(s.dtype)
    grad_a = torch.mm(ds.t(), dropout(xf, layout.dropout_p, seed)).split(layout.ranks)
    grad_x = None
    if need_x:  # one cuBLAS GEMM with the LoRA part as its addend: dx is written once
        lora_part = dropout(torch.mm(ds, a_cat), layout.dropout_p, seed).to(x.dtype)
        if len(weights) == 1:
            lora_part = torch.addmm(lora_part, grad_y, weights[0])
        else:  # per layer: its columns of dY (a strided view cuBLAS reads as it is) times its weight
            for dy, w in zip(grad_y.split(layout.d_outs, 1), weights):
                lora_part.addmm_(dy, w)
        grad_x = lora_part.view(shape)
    grad_w = _like(torch.mm(grad_y.t(), x), [True] * len(weights), layout) if need_weight else None
    grad_bias = _like(grad_y.sum(0), has_bias, layout) if need_bias else None
    return grad_x, grad_w, grad_bias, grad_a, grad_b


def _like(grad: torch.Tensor, present: Sequence[bool], layout) -> list[torch.Tensor | None]:
    """The group's gradient [sum d_out, ...] split per layer (None for a layer whose tensor is absent)."""
    return [g if has else None for g, has in zip(grad.split(layout.d_outs), present)]


def stacks_outputs(x: torch.Tensor) -> bool:
    """Whether x takes this path (CUDA; tests route CPU tensors here through Triton's interpreter)."""
    return utils.triton_path(x)
