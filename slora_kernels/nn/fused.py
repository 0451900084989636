"""PEFT's LoRA layers, computed one shared-input group at a time.

A fused layer is the PEFT layer itself (same parameters, ModuleDicts, adapters, merge / unmerge /
disable_adapter / set_adapter, same state_dict keys) with its class changed to a fused subclass
(`fused_class`: PEFT's LoRA Linear, and its bitsandbytes 4-bit and 8-bit classes) whose forward asks its
`LoraGroup` for its output. The group holds the layers of one parent module that read the same input tensor
(q/k/v, gate/up): the first of them to be called runs one grouped op for all, the others pick up their output
when they are called with that same, unmodified tensor. Over nn.Linear or Conv1D the op computes the whole
output; over a quantized base each layer's base output comes from the base layer itself and the op adds the
LoRA terms (see `slora_kernels.nn.plan.Batch`). Whatever the fused op would not compute exactly as PEFT's
forward runs PEFT's own forward, counted by reason (`slora_kernels.nn.stats`).

What is kept between calls, and why each is current when used (all of it is a cache: never copied or
pickled, dropped by `invalidate` on merge / unmerge, `module.to()` and friends and state-dict loads, rebuilt
on first use):
- The plan (`slora_kernels.nn.plan.GroupPlan`): which members fuse, their layouts, the prepared op calls
  holding the parameters. Every call checks the calling layer against its `LayerWatch` (adapter state,
  scale, the identity and hooks of the base layer, factors and dropout, the layer's own hooks) and rebuilds the
  plan on any difference. The op reads the parameter tensors themselves on every call; no copy of weights is
  kept, so a write through `.data` or another alias is seen like any other.
- Pending outputs: the other members' outputs computed with the first one's, private to the calling thread,
  handed to a member only if it is called with the very tensor they were computed from with nothing changed
  that decides the result: x's version counter and requires_grad, grad mode, inference mode, autocast, the
  member's watch and its parameters' version counters, and no backward run through their node since (its graph
  may be freed). Between two members' calls only the model's own code runs: members with hooks of their own
  (user code that could write through `.data`, which no version counter sees) never share outputs.
  A member whose kept output cannot be used runs alone (a batch would pull its already served group-mates
  into its graph: their parameters would get gradients from a loss that does not use them). Inference
  tensors have no version counter, so nothing could prove a kept output current: there each layer runs its
  own fused call.

Under torch.compile and torch.func transforms the layers run PEFT's own forward: the compiler traces and fuses
it whole (per-layer fused calls measured no faster there, benchmarks/RESULTS.md), and neither can trace the
group's tensor-identity cache or the C++ autograd node. Global module hooks, which PEFT's forward would run
on the factors and base layer, send every layer to PEFT's forward while any is registered.
"""
from __future__ import annotations

import threading

import torch
from peft.tuners import lora
from torch import nn
from torch.nn.modules import module as _module
from transformers.pytorch_utils import Conv1D

from slora_kernels.nn.plan import GroupPlan, fsdp_managed, has_hooks, version_sum
from slora_kernels.nn.stats import FusionRecorder
from slora_kernels.ops import _grouped_cuda
from slora_kernels.ops.grouped_lora import autocast_dtype

_GLOBAL_HOOKS = (_module._global_forward_hooks, _module._global_forward_pre_hooks, _module._global_backward_hooks,
                 _module._global_backward_pre_hooks)
_functorch_level = torch._C._functorch.peek_interpreter_stack  # None outside torch.func transforms


def fsdp_unit(module: nn.Module) -> bool:
    """Whether `fully_shard` was applied to module itself, not to a block holding it."""
    if not fsdp_managed(module):
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _peft_forward_reason() -> str | None:
    """Why every fused layer must run PEFT's forward now, whatever its state: a torch.func transform, or a global
    module hook (torch.nn.modules.module.register_module_forward_hook and its kin)."""
    if _functorch_level() is not None:
        return "torch.func"
    if any(_GLOBAL_HOOKS):
        return "hooks"
    return None


class LoraGroup:
    """Layers of one parent module fed the same input; computes their outputs together and hands each its own
    once (see the module docstring for what is kept between calls and how it is checked)."""

    def __init__(self, members: list[FusedLoraLayer], recorder: FusionRecorder):
        self.members = members
        self.recorder = recorder
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the plan and every thread's pending outputs."""
        self._plan: GroupPlan | None = None
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {"members": self.members, "recorder": self.recorder}  # the caches are rebuilt on first use

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.invalidate()

    def output(self, layer: FusedLoraLayer, x: torch.Tensor) -> torch.Tensor | None:
        """Layer's output for x, or None when the fused path does not apply (the caller runs PEFT's)."""
        if torch.compiler.is_compiling():
            return None  # PEFT's forward, traced whole (see the module docstring)
        reason = _peft_forward_reason()
        if reason is not None:
            self.recorder.fell_back(layer, reason)
            return None
        cast_to = autocast_dtype(x)
        local = self._local
        pending = getattr(local, "pending", None)
        kept_for_x = pending is not None and pending[0] is x
        if kept_for_x:
            y = self._pending_output(layer, x, cast_to, pending)
            if y is not None:
                self.recorder.fused(layer)
                return y
        elif pending is not None:
            local.pending = None
        plan = self._plan
        context = (x.dtype, x.device, cast_to, _grouped_cuda.stacks_outputs(x))
        if plan is None or plan.context != context or not plan.watch_of[id(layer)].matches(layer):
            plan = self._plan = GroupPlan(self.members, x, context)
        reason = plan.reasons.get(id(layer))
        if reason is not None:
            self.recorder.fell_back(layer, reason)
            return None
        self.recorder.fused(layer)
        batch = plan.batches[id(layer)]
        # Alone: on an inference tensor (nothing to key a kept output on), with user code between members, or when
        # this x's kept output could not be used (the members served already must not join this call's graph).
        if x.is_inference() or not batch.shares or kept_for_x:
            return plan.alone(layer, x).compute(x)[0]
        outputs = batch.compute(x)
        if len(outputs) > 1:
            # Kept with x itself, so x's id cannot be reused by another tensor while outputs are pending.
            entries = {id(m): (y, plan.watch_of[id(m)], tracked, version_sum(tracked))
                       for m, y, tracked in zip(batch.members, outputs, batch.tracked) if m is not layer}
            local.pending = (x, _call_key(x, cast_to), entries, batch.backward_calls, batch.backward_calls())
        return outputs[batch.position[id(layer)]]

    def _pending_output(self, layer: FusedLoraLayer, x: torch.Tensor, cast_to, pending: tuple) -> torch.Tensor | None:
        """Layer's output computed with its group-mates' for this very x, if nothing it depends on changed."""
        _, key, entries, backward_calls, backwards_then = pending
        entry = entries.pop(id(layer), None)
        if not entries:
            self._local.pending = None
        if entry is None or key != _call_key(x, cast_to) or backward_calls() != backwards_then:
            return None
        y, watch, tracked, versions = entry
        if not watch.matches(layer) or version_sum(tracked) != versions:
            return None
        return y


def _call_key(x: torch.Tensor, cast_to) -> tuple:
    """What decides a call's result besides the layers' state: x's contents and grad requirement, the modes."""
    return x._version, x.requires_grad, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), cast_to


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
        if isinstance(self.scaling[adapter], torch.Tensor):  # PEFT's hotswap: a scale that may change in place
            return "scaling"
        dropout = self.lora_dropout[adapter]
        if type(dropout) not in (nn.Dropout, nn.Identity) or (dropout.training and getattr(dropout, "p", 0.0) >= 1.0):
            return "dropout"
        # A layer that is its own FSDP unit: its group-mates' weights, in other units, are sharded when it runs.
        if any(map(has_hooks, (self.base_layer, lora_a, lora_b, dropout))) or fsdp_unit(self):
            return "hooks"
        if not (_plain_weight(lora_a) and _plain_weight(lora_b)):
            return "parametrized"
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

    def _apply(self, fn, recurse: bool = True):
        self._slora_group.invalidate()  # the plan's prepared calls hold the tensors `fn` may swap
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._slora_group.invalidate()
        super()._load_from_state_dict(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        # By the PEFT class it was made from: a fused class made at run time has no importable name.
        return _new_fused, (self._slora_stock,), self.__dict__

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self._slora_group.invalidate()
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        self._slora_group.invalidate()
        super().unmerge()


def _plain_weight(module: nn.Module) -> bool:
    """Whether module's weight is a registered tensor (not a parametrization computing it, or a plain attribute)."""
    return module.__dict__["_parameters"].get("weight") is not None


def _new_fused(stock: type) -> FusedLoraLayer:
    """An empty instance of stock's fused class, which unpickling fills with the layer's state."""
    cls = fused_class(stock)
    return cls.__new__(cls)


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
