"""grouped_lora: G linear layers that share one input, each with a LoRA adapter of its own rank.

Output i = x W_i^T + b_i + scales[i] * drop(x) A_i^T B_i^T, which is what PEFT's LoRA Linear
computes, but for the whole group at once: one dropout mask, the shrink S = drop(x) A_cat^T as
one GEMM over the packed A, and the expand added straight into each base output (no temporaries
for the LoRA branch, no per-layer mask). Backward: dB_i = s_i dY_i^T S_i, dS_i = s_i dY_i B_i,
dA_cat = dS^T drop(x) (one GEMM), dx = sum_i dY_i W_i + drop(dS A_cat). S is saved; drop(x) is
not: each element's keep bit is a hash of (seed, index), drawn again, bit for bit, in the backward
(the extension's `slora::dropout` on CPU, the same hash in Triton on CUDA, so CPU and GPU runs drop
the same elements), and no mask tensor is stored. The device bodies: `_grouped_cpu` (plain torch,
one output per layer) and `_grouped_cuda` (Triton kernels around cuBLAS, the layers side by side
in one output buffer).

Dtypes follow PEFT's LoRA Linear: x, W and b share the base dtype; the factors share one dtype of
their own (PEFT keeps them in float32 under a bf16/fp16 base by default). The LoRA branch runs in
the factors' dtype on x cast to it, and is added to the base output with one rounding into the
base dtype; gradients reach the factors in their dtype and x in its own. Under torch.autocast the
op casts every floating input to the autocast dtype first, as autocast does for `F.linear`, and
casts each gradient back to its input's dtype.

Calls: `grouped_lora` checks its arguments and runs; `run_group` is the same computation without
checks for callers that decided once what a call is (a `GroupLayout`: ranks, sizes, scales,
dropout, autocast dtype), as the fused modules do. Eager calls run one light autograd.Function
(under autocast too: the casts happen inside it, so autograd records no cast nodes); under
torch.compile the op is a pair of `torch.library.custom_op`s with fake kernels and registered
autocast, so a module calling `grouped_lora` traces without graph breaks (when `seed` is given or
dropout_p == 0; drawing a seed from torch's global RNG is a `.item()`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from slora_kernels.ops import _grouped_cpu, _grouped_cuda
from slora_kernels.ops.utils import FLOAT_DTYPES, check_same, check_tensor, draw_seed


class GroupLayout:
    """What one grouped call computes apart from its tensors, decided once: ranks, output sizes, scales,
    dropout probability and the autocast dtype every input is cast to (None outside autocast). Holds the
    Triton tile tables of the group on each device it ran on."""

    __slots__ = ("ranks", "d_outs", "scales", "dropout_p", "cast_to", "_segments", "backward_calls")

    def __init__(self, ranks: Sequence[int], d_outs: Sequence[int], scales: Sequence[float], dropout_p: float = 0.0,
                 cast_to: torch.dtype | None = None):
        self.ranks, self.d_outs = tuple(ranks), tuple(d_outs)
        self.scales, self.dropout_p, self.cast_to = tuple(float(s) for s in scales), float(dropout_p), cast_to
        self._segments = {}
        self.backward_calls = 0  # backwards run by nodes of calls with this layout (see `prepare`)

    @classmethod
    def of(cls, lora_b: Sequence[torch.Tensor], scales: Sequence[float], dropout_p: float = 0.0,
           cast_to: torch.dtype | None = None) -> GroupLayout:
        return cls([b.shape[1] for b in lora_b], [b.shape[0] for b in lora_b], scales, dropout_p, cast_to)

    def segments(self, device: torch.device):
        """The Triton kernels' tile table and scales on device (built there once)."""
        layout = self._segments.get(device)
        if layout is None:
            from slora_kernels.triton.lora_kernels import segment_layout

            layout = self._segments[device] = segment_layout(self.d_outs, self.ranks, self.scales, device)
        return layout


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)  # a fast "no" outside autocast


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype torch.autocast casts x's device's GEMM inputs to here, or None outside autocast."""
    if not _any_autocast():
        return None
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class Operands:
    """The tensors of one grouped call besides x: base weights [d_out, d_in] and biases (one per layer; none
    when the call computes the LoRA terms alone) and the factors."""

    __slots__ = ("weights", "biases", "lora_a", "lora_b")

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]):
        self.weights, self.biases, self.lora_a, self.lora_b = list(weights), list(biases), list(lora_a), list(lora_b)

    def trainable_base(self) -> list[torch.Tensor]:
        """Base tensors that train (rare with LoRA): autograd must see them as inputs of the op."""
        return [t for t in (*self.weights, *self.biases) if t is not None and t.requires_grad]

    def cast(self, dtype: torch.dtype, device_type: str) -> Operands:
        """These operands as autocast casts F.linear's inputs (floating, float64 excepted)."""
        return Operands(*(_autocast_cast(v, device_type, dtype)
                          for v in (self.weights, self.biases, self.lora_a, self.lora_b)))


def grouped_lora(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
                 lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scales: Sequence[float], *,
                 dropout_p: float = 0.0, seed: int | None = None) -> list[torch.Tensor]:
    """Outputs of G LoRA linears sharing input x [..., d_in]: a list of G tensors [..., d_out_i].

    weights[i] [d_out_i, d_in], biases[i] [d_out_i] or None (x's dtype), lora_a[i] [r_i, d_in]
    (r_i >= 1), lora_b[i] [d_out_i, r_i] (all factors of one float dtype, x's or another, e.g.
    float32 factors under a bf16 x), scales[i] a float. Dropout with probability dropout_p is applied to
    the LoRA branch's input (one mask shared by the group); `seed` fixes the mask (None: drawn
    from torch's global RNG, so torch.manual_seed makes runs repeat). Differentiable in x, the
    LoRA factors, and W and b when they require grad. On CUDA the outputs are column views of one
    buffer, on CPU separate tensors.
    """
    _check_group(x, weights, biases, lora_a, lora_b, scales, dropout_p, seed)
    layout = GroupLayout.of(lora_b, scales, dropout_p, autocast_dtype(x))
    return run_group(layout, x, Operands(weights, biases, lora_a, lora_b), seed)


def run_group(layout: GroupLayout, x: torch.Tensor, operands: Operands, seed: int | None = None) -> list[torch.Tensor]:
    """`grouped_lora` without argument checks, for a layout and operands decided once (the fused modules keep
    both per group state)."""
    if layout.dropout_p > 0.0 and seed is None:
        seed = draw_seed()
    seed = seed or 0
    body = _grouped_cuda if _grouped_cuda.stacks_outputs(x) else _grouped_cpu
    if body is _grouped_cpu and _grouped_cpu.NATIVE and not torch.compiler.is_compiling():
        return _grouped_cpu.native(layout, x, operands, seed)
    if torch.compiler.is_compiling():
        flat = x.reshape(-1, x.shape[-1])
        *ys, _ = torch.ops.slora.grouped_lora_forward(flat, operands.weights, operands.biases, operands.lora_a,
                                                      operands.lora_b, layout.scales, layout.dropout_p, seed)
    elif torch.is_grad_enabled():
        trainable = operands.trainable_base()
        if layout.cast_to is not None:  # recorded outside the node: its saved x stays connected to x's graph
            x = _autocast_cast(x, x.device.type, layout.cast_to)
        ys = _GroupedLora.apply((layout, body, seed, operands, trainable), x, *operands.lora_a, *operands.lora_b,
                                *trainable)
    else:
        if layout.cast_to is not None:
            x, operands = _autocast_cast(x, x.device.type, layout.cast_to), operands.cast(layout.cast_to,
                                                                                         x.device.type)
        ys = body.forward(layout, x, operands, seed)[0]
    if body is _grouped_cpu and not torch.compiler.is_compiling():  # outputs shaped like x already
        return list(ys)
    if len(ys) < len(layout.ranks):  # the CUDA body's one [N, sum d_out] buffer
        ys = ys[0].split(layout.d_outs, dim=-1)
    return list(ys) if x.dim() == 2 else [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def prepare(layout: GroupLayout, operands: Operands,
            like: torch.Tensor) -> tuple[Callable[[torch.Tensor], list[torch.Tensor]], Callable[[], int]]:
    """`run_group(layout, x, operands)` for inputs x of like's dtype and device, as one callable with its path
    chosen now (the extension's C++ op on CPU: only x and the dropout seed vary per call, else run_group), and a
    function giving how many backwards the autograd nodes of its calls have run: an output whose node has run
    its backward may have had its graph freed (callers that keep outputs for later check it)."""
    if _grouped_cpu.NATIVE and not _grouped_cuda.stacks_outputs(like) and like.device.type == "cpu":
        return _grouped_cpu.prepared(layout, operands, like.dtype)
    return (lambda x: run_group(layout, x, operands)), functools.partial(getattr, layout, "backward_calls")


def _autocast_cast(value, device_type: str, dtype: torch.dtype):
    """value (a tensor, or a list of them) cast as autocast casts F.linear's inputs: floating tensors on its
    device, float64 excepted."""
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return [_autocast_cast(v, device_type, dtype) for v in value]
    return value


class _GroupedLora(torch.autograd.Function):
    """The eager op: the device body's forward and backward in one autograd node.

    Saved for the backward through `save_for_backward` (so saved-tensor hooks, checkpointing and offloading
    see them, and an in-place change before the backward raises as it does for F.linear): x (already in
    autocast's dtype: the cast is recorded outside), S and what else the device body keeps, and the factors and
    weights as the GEMMs read them, where F.linear would save them (A and W only when x needs a gradient; under
    autocast the copies, as F.linear's). A backward run with create_graph=True recomputes the outputs with
    recorded torch ops from the saved x and the parameters and differentiates them (`_differentiable_outputs`),
    so second-order gradients are exact; the ordinary backward is the body's. A layer whose output the loss does
    not use gets no gradient (None, as its own PEFT layer would), not zeros: the CPU body's outputs are one per
    layer (the CUDA body's one buffer gets its gradient whole, so there an unused layer's are zeros).
    """

    @staticmethod
    def forward(ctx, call, x, *tensors):
        layout, body, seed, operands, _ = call
        if layout.cast_to is not None:
            ctx.dtypes = [t.dtype for t in (x, *tensors)]
            operands = operands.cast(layout.cast_to, x.device.type)
        outputs, saved = body.forward(layout, x, operands, seed)
        ctx.call = call
        ctx.n_saved = len(saved)
        ctx.set_materialize_grads(False)
        need_x = ctx.needs_input_grad[1]
        ctx.save_for_backward(x, *saved, *(operands.lora_a if need_x else ()), *operands.lora_b,
                              *(operands.weights if need_x else ()))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        layout, body, seed, operands, trainable = ctx.call
        layout.backward_calls += 1
        groups = len(layout.ranks)
        x, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (None, *_differentiable_backward(ctx, layout, body, seed, operands, trainable, x, grads))
        unused = [i for i, g in enumerate(grads) if g is None]
        if unused:  # only the CPU body has an output per layer: shaped like x, in x's dtype (S's for terms alone)
            dtype = x.dtype if operands.weights else saved[0].dtype
            grads = [x.new_zeros(*x.shape[:-1], d_out, dtype=dtype) if g is None else g
                     for g, d_out in zip(grads, layout.d_outs)]
        saved, used = saved[:ctx.n_saved], saved[ctx.n_saved:]
        need = ctx.needs_input_grad
        lora_a = used[:groups] if need[1] else operands.lora_a
        lora_b = used[groups:2 * groups] if need[1] else used[:groups]
        weights = used[2 * groups:] if need[1] else operands.weights
        has_bias = tuple(b is not None for b in operands.biases)
        grad_x, grad_w, grad_bias, grad_a, grad_b = body.backward(
            layout, grads, x, weights, has_bias, lora_a, lora_b, saved, seed, need[1], bool(trainable),
            bool(trainable))
        if unused:  # as the unused layers' own PEFT layers: no gradient at all
            grad_a, grad_b = list(grad_a), list(grad_b)
            for grad_list in (grad_a, grad_b, *(g for g in (grad_w, grad_bias) if g is not None)):
                for i in unused:
                    grad_list[i] = None
        base = []
        if trainable:  # gradients of the base tensors given as inputs, in their order
            base = [g for g, t in zip((*grad_w, *grad_bias), (*operands.weights, *operands.biases))
                    if t is not None and any(t is u for u in trainable)]
        grads = (grad_x, *grad_a, *grad_b, *base)
        if layout.cast_to is not None:  # each gradient in its input's dtype, as autocast's cast nodes give it
            grads = [g if g is None or g.dtype == dtype else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (None, *grads)


def _differentiable_backward(ctx, layout, body, seed, operands, trainable, x, grads) -> list[torch.Tensor | None]:
    """The node's input gradients as recorded torch ops (a backward with create_graph=True): the outputs
    recomputed from x and the parameters, differentiated with the graph kept."""
    inputs = [x, *operands.lora_a, *operands.lora_b, *trainable]
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[1:]) if need]
    with torch.enable_grad():
        outputs = _differentiable_outputs(layout, body, seed, x, operands)
        if len(grads) != len(outputs):  # the CUDA body's [N, sum d_out]
            outputs = [torch.cat([y.reshape(-1, y.shape[-1]) for y in outputs], -1)]
        used = [(y, g) for y, g in zip(outputs, grads) if g is not None]
        found = iter(torch.autograd.grad([y for y, _ in used], wanted, [g.view_as(y) for y, g in used],
                                         create_graph=True, allow_unused=True))
    return [next(found) if need else None for need in ctx.needs_input_grad[1:]]


def _differentiable_outputs(layout, body, seed, x, operands) -> list[torch.Tensor]:
    """The op's outputs from recorded torch ops (PEFT's per-layer formula; the dropout mask drawn as the body
    draws it, applied as a product)."""
    if layout.cast_to is not None:
        operands = operands.cast(layout.cast_to, x.device.type)
    factor_dtype = operands.lora_a[0].dtype
    xf = x.to(factor_dtype)
    if layout.dropout_p > 0.0:
        xf = xf * body.dropout(torch.ones_like(xf), layout.dropout_p, seed)
    outputs = []
    for i, (a, b, scale) in enumerate(zip(operands.lora_a, operands.lora_b, layout.scales)):
        term = torch.nn.functional.linear(torch.nn.functional.linear(xf, a), b) * scale
        if operands.weights:
            base = torch.nn.functional.linear(x, operands.weights[i], operands.biases[i])
            term = (base + term).to(base.dtype)
        outputs.append(term)
    return outputs


def _check_group(x, weights, biases, lora_a, lora_b, scales, dropout_p, seed) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last (feature) dimension, got shape {tuple(x.shape)}")
    d_in = x.shape[-1]
    lists = {"weights": weights, "biases": biases, "lora_a": lora_a, "lora_b": lora_b, "scales": scales}
    for name, value in lists.items():
        if isinstance(value, (torch.Tensor, str)) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    groups = len(weights)
    if groups == 0:
        raise ValueError("weights must hold at least one weight, got an empty list")
    for name, value in lists.items():
        if len(value) != groups:
            raise ValueError(f"{name} must have one entry per layer ({groups} like weights), got {len(value)}")
    check_tensor("lora_a[0]", lora_a[0], dtypes=FLOAT_DTYPES)
    # Under autocast the op casts its inputs to one dtype first (as for F.linear): any mix is fine.
    check_dtypes = not torch.is_autocast_enabled(x.device.type)
    for i in range(groups):
        w = check_tensor(f"weights[{i}]", weights[i], ndim=2)
        a = check_tensor(f"lora_a[{i}]", lora_a[i], ndim=2)
        b = check_tensor(f"lora_b[{i}]", lora_b[i], ndim=2)
        for name, t in (("weights", w), ("lora_a", a), ("lora_b", b)):
            check_same(name, i, t, x, "device", "x")
        if check_dtypes:
            check_same("weights", i, w, x, "dtype", "x")
            for name, t in (("lora_a", a), ("lora_b", b)):
                check_same(name, i, t, lora_a[0], "dtype", "lora_a[0]")
        d_out, rank = w.shape[0], a.shape[0]
        if w.shape[1] != d_in:
            raise ValueError(f"weights[{i}] must be [d_out, d_in={d_in}] like x's last dim, got {tuple(w.shape)}")
        if rank < 1:
            raise ValueError(f"lora_a[{i}] must have rank >= 1 rows, got shape {tuple(a.shape)}")
        if a.shape[1] != d_in:
            raise ValueError(f"lora_a[{i}] must be [r, d_in={d_in}], got {tuple(a.shape)}")
        if tuple(b.shape) != (d_out, rank):
            raise ValueError(f"lora_b[{i}] must be [d_out={d_out}, r={rank}] to match weights[{i}] and "
                             f"lora_a[{i}], got {tuple(b.shape)}")
        if biases[i] is not None:
            bias = check_tensor(f"biases[{i}]", biases[i], ndim=1)
            for attr in ("dtype", "device") if check_dtypes else ("device",):
                check_same("biases", i, bias, x, attr, "x")
            if bias.shape[0] != d_out:
                raise ValueError(f"biases[{i}] must be [d_out={d_out}] or None, got {tuple(bias.shape)}")
        scale = scales[i]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scales[{i}] must be a float, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scales[{i}] must be finite, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")



# ----------------------------------------------------------------------------- torch.compile: two custom ops


def _body(x: torch.Tensor):
    return _grouped_cuda if _grouped_cuda.stacks_outputs(x) else _grouped_cpu


@torch.library.custom_op("slora::grouped_lora_forward", mutates_args=())
def _grouped_forward(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                     lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scales: list[float], dropout_p: float,
                     seed: int) -> list[torch.Tensor]:
    """[*outputs, S]: the device body's outputs (one per layer on CPU, one buffer on CUDA) and S."""
    outputs, (s, *_) = _body(x).forward(GroupLayout.of(lora_b, scales, dropout_p), x,
                                        Operands(weights, biases, lora_a, lora_b), seed)
    return [*outputs, s]


@_grouped_forward.register_fake
def _grouped_forward_fake(x, weights, biases, lora_a, lora_b, scales, dropout_p, seed):
    s = lora_a[0].new_empty((x.shape[0], sum(a.shape[0] for a in lora_a)))
    d_outs = [b.shape[0] for b in lora_b]
    d_outs = [sum(d_outs)] if _grouped_cuda.stacks_outputs(x) else d_outs
    return [*(x.new_empty((x.shape[0], d)) for d in d_outs), s]


@torch.library.custom_op("slora::grouped_lora_backward", mutates_args=())
def _grouped_backward(grads: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                      biases: list[torch.Tensor | None], lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                      s: torch.Tensor, scales: list[float], dropout_p: float, seed: int, need_x: bool,
                      need_weight: bool, need_bias: bool) -> list[torch.Tensor]:
    """[dx, *dW, *db, *dA, *dB]: empty tensors where no gradient is needed or a layer has no bias (a
    custom op returns tensors only); every gradient its own tensor (custom op outputs may not alias)."""
    body = _body(x)
    layout = GroupLayout.of(lora_b, scales, dropout_p)
    has_bias = tuple(b is not None for b in biases)
    grad_x, grad_w, grad_bias, grad_a, grad_b = body.backward(
        layout, [g.contiguous() for g in grads], x, weights, has_bias, lora_a, lora_b, (s,), seed, need_x,
        need_weight, need_bias)
    def given(grad):
        return x.new_empty(0) if grad is None else grad

    return [given(grad_x), *map(given, grad_w or [None] * len(weights)),
            *map(given, grad_bias or [None] * len(biases)), *[g.clone() for g in grad_a], *grad_b]


@_grouped_backward.register_fake
def _grouped_backward_fake(grads, x, weights, biases, lora_a, lora_b, s, scales, dropout_p, seed, need_x, need_weight,
                           need_bias):
    def like(t, needed):
        return t.new_empty(t.shape if needed and t is not None else (0,)) if t is not None else x.new_empty(0)

    return [like(x, need_x), *(like(w, need_weight) for w in weights), *(like(b, need_bias) for b in biases),
            *[a.new_empty(a.shape) for a in lora_a], *[b.new_empty(b.shape) for b in lora_b]]


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_a, lora_b, scales, dropout_p, seed = inputs
    ctx.sizes = (len(weights), len(biases))
    ctx.args = (scales, dropout_p, seed)
    ctx.need = (x.requires_grad, any(w.requires_grad for w in weights),
                any(b is not None and b.requires_grad for b in biases))
    ctx.has_bias = [b is not None for b in biases]
    ctx.save_for_backward(x, output[-1], *weights, *[b for b in biases if b is not None], *lora_a, *lora_b)


def _backward(ctx, grads):
    x, s, *saved = ctx.saved_tensors
    (n_weights, n_biases), groups = ctx.sizes, (len(saved) - ctx.sizes[0] - sum(ctx.has_bias)) // 2
    weights = saved[:n_weights]
    present = iter(saved[n_weights:n_weights + sum(ctx.has_bias)])
    biases = [next(present) if has else None for has in ctx.has_bias]
    lora_a, lora_b = saved[-2 * groups:-groups], saved[-groups:]
    out = torch.ops.slora.grouped_lora_backward(list(grads[:-1]), x, list(weights), biases, list(lora_a),
                                                list(lora_b), s, *ctx.args, *ctx.need)
    grad_x, rest = out[0], out[1:]
    grad_w, rest = rest[:n_weights], rest[n_weights:]
    grad_bias, rest = rest[:n_biases], rest[n_biases:]
    need_x, need_weight, need_bias = ctx.need
    # The gradients' structure follows the inputs' as torch.library flattens them (a list holding only None
    # and tensors is a list; the biases' list is one leaf when it holds None: its gradient then too).
    grad_biases = [g if has and need_bias else None for g, has in zip(grad_bias, ctx.has_bias)]
    if not all(ctx.has_bias):
        grad_biases = None
    return (grad_x if need_x else None, [g if need_weight else None for g in grad_w], grad_biases,
            list(rest[:groups]), list(rest[groups:]), None, None, None)


_grouped_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- autocast
# torch.library.register_autocast fixes one dtype at registration; users pick bf16 or fp16 per
# region, so these kernels read the region's dtype and cast as autocast casts F.linear's inputs.
_AUTOCAST_LIBRARY = torch.library.Library("slora", "IMPL")


def _register_autocast(op: torch._ops.OpOverload, device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*(_autocast_cast(a, device_type, dtype) for a in args))

    _AUTOCAST_LIBRARY.impl(op.__name__.split(".")[0], kernel, key_name, with_keyset=True)


def _register_autocast_rules() -> None:
    for op in (torch.ops.slora.grouped_lora_forward.default, torch.ops.slora.grouped_lora_backward.default):
        for device_type in ("cpu", "cuda"):
            _register_autocast(op, device_type)


_register_autocast_rules()
