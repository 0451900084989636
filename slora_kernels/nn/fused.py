"""PEFT's LoRA layers, computed one shared-input group at a time.

A fused layer is the PEFT layer itself (same parameters, ModuleDicts, adapters, merge / unmerge /
disable_adapter / set_adapter, same state_dict keys) with its class changed to a fused subclass
(`fused_class`: PEFT's LoRA Linear, and its bitsandbytes 4-bit and 8-bit classes) whose forward asks its
`LoraGroup` for its output. The group holds the layers that read the same input tensor (q/k/v, gate/up): the
first of them to be called runs one grouped op for all, the others pick up their output when they are
called with that same, unmodified tensor. Over nn.Linear or Conv1D the op computes the whole output; over a
quantized base each layer's base output comes from the base layer itself and the op adds the LoRA terms
(see `slora_kernels.nn.plan.Batch`). The fused path covers PEFT's dtypes (a bf16 / fp16 base with float32
factors, one dtype throughout), torch.autocast, no_grad and inference_mode; whatever it does not cover runs
PEFT's own forward, counted by reason (`slora_kernels.nn.stats`).

Inference tensors have no version counter, so nothing could prove that a cached output still
belongs to the tensor a later layer is called with: there each layer runs its own fused call.
Under torch.compile the layers run PEFT's own forward, which the compiler traces and fuses whole
(one graph, no break): per-layer fused calls measured no faster there (benchmarks/RESULTS.md), and
the group's tensor-identity cache is not traceable.
"""
from __future__ import annotations

import torch
from peft.tuners import lora
from torch import nn
from transformers.pytorch_utils import Conv1D

from slora_kernels.nn.plan import GroupPlan, fsdp_managed, has_hooks, version_sum
from slora_kernels.nn.stats import FusionRecorder
from slora_kernels.ops import _grouped_cuda
from slora_kernels.ops.grouped_lora import autocast_dtype


def fsdp_unit(module: nn.Module) -> bool:
    """Whether `fully_shard` was applied to module itself, not to a block holding it."""
    if not fsdp_managed(module):
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


class LoraGroup:
    """Layers fed the same input; computes their outputs together and hands each its own once.

    Every call checks the calling layer's own state (its `LayerWatch`) against the plan: a layer whose state
    or call context changed rebuilds the plan, so no output is ever computed from decisions its layer no
    longer matches. The first member called with a tensor runs its batch's fused call and keeps the other
    members' outputs for as long as that tensor is unchanged (same object, same version counter, same grad
    and autocast mode): a member called with it gets its output if its own state and parameter versions
    are still those the output was computed from, and otherwise computes afresh.
    """

    def __init__(self, members: list[FusedLoraLayer], recorder: FusionRecorder):
        self.members = members
        self.recorder = recorder
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the plan and cached outputs (called when base weights change in place)."""
        self._plan: GroupPlan | None = None
        self._pending: dict[int, tuple] = {}
        self._pending_input: torch.Tensor | None = None
        self._pending_key: tuple | None = None

    def output(self, layer: FusedLoraLayer, x: torch.Tensor) -> torch.Tensor | None:
        """Layer's output for x, or None when the fused path does not apply (the caller runs PEFT's)."""
        if torch.compiler.is_compiling():
            return None  # PEFT's forward, traced whole (see the module docstring)
        cast_to = autocast_dtype(x)
        if x is self._pending_input:  # None when nothing is pending
            y = self._pending_output(layer, x, cast_to)
            if y is not None:
                self.recorder.fused(layer)
                return y
        plan = self._plan
        context = (x.dtype, x.device, cast_to, _grouped_cuda.stacks_outputs(x))
        if plan is None or plan.context != context or not plan.watch_of[id(layer)].matches(layer):
            plan = self._plan = GroupPlan(self.members, x, context)
        reason = plan.reasons.get(id(layer))
        if reason is not None:
            self.recorder.fell_back(layer, reason)
            return None
        self.recorder.fused(layer)
        if x.is_inference():  # no version counter to key a cache on: this layer alone
            return plan.alone(layer, x).compute(x)[0]
        batch = plan.batches[id(layer)]
        outputs = batch.compute(x)
        if len(outputs) > 1:
            # Keep x alive while outputs are pending, so its id cannot be reused by another tensor.
            self._pending_input, self._pending_key = x, (x._version, torch.is_grad_enabled(), cast_to)
            self._pending = {id(m): (y, plan.watch_of[id(m)], tracked, version_sum(tracked))
                             for m, y, tracked in zip(batch.members, outputs, batch.tracked) if m is not layer}
        return outputs[batch.position[id(layer)]]

    def _pending_output(self, layer: FusedLoraLayer, x: torch.Tensor, cast_to) -> torch.Tensor | None:
        """Layer's output computed with its group-mates' for this very x, if nothing it depends on changed."""
        entry = None
        if self._pending_key == (x._version, torch.is_grad_enabled(), cast_to):
            entry = self._pending.pop(id(layer), None)
        if not self._pending or entry is None:
            self._pending, self._pending_input, self._pending_key = {}, None, None
        if entry is None:
            return None
        y, watch, tracked, versions = entry
        if not watch.matches(layer) or version_sum(tracked) != versions:
            return None
        return y


class FusedLoraLayer:
    """A PEFT LoRA layer whose forward runs in its shared-input group (see the module docstring): mixed into
    the PEFT class it was made from (`fused_class`), whose forward it falls back to."""

    _slora_group: LoraGroup
    _slora_stock: type  # the PEFT class this fused class was made from

    def base_mode(self) -> str:
        """How the group computes this layer's base output: "gemm" (the fused op multiplies by the weight
        itself: nn.Linear, Conv1D), else the base layer is called and its output combined with the LoRA term
        as the PEFT class combines them: "linear" (PEFT's LoRA Linear over another Linear) or "bnb" (PEFT's
        bitsandbytes classes)."""
        if self._slora_stock is not lora.Linear:
            return "bnb"
        return "gemm" if type(self.base_layer) in (nn.Linear, Conv1D) else "linear"

    def fallback_reason(self, x: torch.Tensor) -> str | None:
        """Why PEFT's forward must run for x (a reason named in `slora_kernels.nn.stats`), or None."""
        if self.disable_adapters:
            return "disabled"
        if self.merged:
            return "merged"
        if len(self.active_adapters) != 1:
            return "multiple adapters"
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A:
            return "inactive adapter"
        if adapter in self.lora_variant or self.lora_bias.get(adapter, False):
            return "variant"
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        if not torch.is_autocast_enabled(x.device.type):
            factor_dtype = lora_a.weight.dtype
            # The fused GEMM multiplies x by the base weight itself; a quantized base casts x its own way.
            base_dtype = self.base_mode() == "gemm" and x.dtype != self.base_layer.weight.dtype
            if (base_dtype or lora_b.weight.dtype != factor_dtype
                    or (x.dtype != factor_dtype and not getattr(self, "cast_input_dtype_enabled", True))):
                return "dtype"
        if type(self.lora_dropout[adapter]) not in (nn.Dropout, nn.Identity):
            return "dropout"
        # A layer that is its own FSDP unit: its group-mates' weights, in other units, are sharded when it runs.
        if has_hooks(self.base_layer) or has_hooks(lora_a) or has_hooks(lora_b) or fsdp_unit(self):
            return "hooks"
        return None

    def fused_key(self, x: torch.Tensor) -> tuple:
        """What must agree for layers to share one fused call: adapter, dropout p, factor dtype, autocast, base mode."""
        adapter = self.active_adapters[0]
        dropout = self.lora_dropout[adapter]
        dropout_p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return adapter, dropout_p, self.lora_A[adapter].weight.dtype, autocast_dtype(x), self.base_mode()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            self._slora_group.recorder.fell_back(self, "arguments")
        else:
            y = self._slora_group.output(self, x)
            if y is not None:
                return y
        return super().forward(x, *args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self._slora_group.invalidate()
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        self._slora_group.invalidate()
        super().unmerge()


class FusedLoraLinear(FusedLoraLayer, lora.Linear):
    """PEFT's LoRA Linear, fused."""

    _slora_stock = lora.Linear


_FUSED_CLASSES: dict[type, type] = {lora.Linear: FusedLoraLinear}


def fused_class(stock: type) -> type:
    """The fused subclass of a PEFT LoRA layer class (made once per class; its instances keep every method and
    attribute of the PEFT class, so state_dict keys, merge and save stay PEFT's)."""
    if stock not in _FUSED_CLASSES:
        _FUSED_CLASSES[stock] = type(f"Fused{stock.__name__}", (FusedLoraLayer, stock),
                                     {"_slora_stock": stock, "__module__": __name__})
    return _FUSED_CLASSES[stock]
