"""PEFT's LoRA Linear, computed one shared-input group at a time.

`FusedLoraLinear` is a `peft.tuners.lora.Linear` (same parameters, ModuleDicts, adapters, merge /
unmerge / disable_adapter / set_adapter, same state_dict keys) whose forward asks its `LoraGroup`
for its output. The group holds the layers that read the same input tensor (q/k/v, gate/up): the
first of them to be called runs one `grouped_lora` for all, the others pick up their output when
they are called with that same, unmodified tensor. The fused path covers PEFT's dtypes (a bf16 /
fp16 base with float32 factors, one dtype throughout), torch.autocast, no_grad and inference_mode;
whatever it does not cover runs PEFT's own forward, counted by reason (`slora_kernels.nn.stats`).

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

from slora_kernels.layers import linear_weight
from slora_kernels.nn.stats import FusionRecorder
from slora_kernels.ops.grouped_lora import grouped_lora_unchecked, stack_biases, stacks_outputs


def has_hooks(module: nn.Module) -> bool:
    """Whether calling module runs code besides its forward: forward (pre-)hooks, or a forward
    replaced on the instance (accelerate's `_hf_hook`, e.g. device_map offload)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "_hf_hook" in module.__dict__
                or "forward" in module.__dict__)


def fsdp_managed(module: nn.Module) -> bool:
    """Whether FSDP shards module's parameters: fully_shard and FullyShardedDataParallel both mark every
    module they manage with this flag (torch.compile reads it)."""
    return getattr(module, "_is_fsdp_managed_module", False)


def fsdp_unit(module: nn.Module) -> bool:
    """Whether `fully_shard` was applied to module itself, not to a block holding it."""
    if not fsdp_managed(module):
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


class LoraGroup:
    """Layers fed the same input; computes their outputs together and hands each its own once."""

    def __init__(self, members: list[FusedLoraLinear], recorder: FusionRecorder):
        self.members = members
        self.recorder = recorder
        self._pending: dict[int, tuple[torch.Tensor, tuple]] = {}
        self._pending_key: tuple | None = None
        self._pending_input: torch.Tensor | None = None
        self._stacked_key: tuple | None = None
        self._stacked: tuple[list[torch.Tensor], torch.Tensor | None] = ([], None)

    def invalidate(self) -> None:
        """Forget cached outputs and the stacked base weight (called when base weights change in place)."""
        self._pending, self._pending_key, self._pending_input, self._stacked_key = {}, None, None, None

    def output(self, layer: FusedLoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """Layer's output for x, or None when the fused path does not apply (the caller runs PEFT's)."""
        if torch.compiler.is_compiling():
            return None  # PEFT's forward, traced whole (see the module docstring)
        reason = layer.fallback_reason(x)
        if reason is not None:
            self.recorder.fell_back(layer, reason)
            return None
        self.recorder.fused(layer)
        own = layer.fused_key(x)
        if x.is_inference():  # no version counter to key a cache on: this layer alone
            return self._compute([layer], x, own)[0]
        key = (id(x), x._version, torch.is_grad_enabled())
        if key == self._pending_key and id(layer) in self._pending:
            y, state = self._pending.pop(id(layer))
            if not self._pending:
                self._pending_key = self._pending_input = None
            if state == layer.parameter_state(own):
                return y
        members = [m for m in self.members if m is layer or (m.fallback_reason(x) is None and m.fused_key(x) == own)]
        outputs = self._compute(members, x, own)
        self._pending = {id(m): (y, m.parameter_state(own)) for m, y in zip(members, outputs) if m is not layer}
        # Keep x alive while outputs are pending, so its id cannot be reused by another tensor.
        self._pending_key = key if self._pending else None
        self._pending_input = x if self._pending else None
        return outputs[members.index(layer)]

    def _compute(self, members: list[FusedLoraLinear], x: torch.Tensor, key: tuple) -> list[torch.Tensor]:
        """The members' outputs for x, one grouped_lora call; key is their common `fused_key`."""
        adapter, dropout_p = key[0], key[1]
        weights, bias = self._base(members)
        return grouped_lora_unchecked(
            x, weights, bias, [m.lora_A[adapter].weight for m in members], [m.lora_B[adapter].weight for m in members],
            [m.scaling[adapter] for m in members], dropout_p=dropout_p)

    def _base(self, members: list[FusedLoraLinear]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The members' base weights (one per layer, or [W_cat] where the op stacks: CUDA) and stacked bias.

        CUDA's one base GEMM needs W_cat [sum d_out, d_in]: a copy of the frozen weights, cached
        while they are unchanged (a second copy of those weights in memory). CPU computes a GEMM
        per layer and takes the weights as they are, without a copy. A Conv1D base (GPT-2, PEFT's
        fan_in_fan_out) stores [d_in, d_out]: the op gets its transposed view, and the cache key stays
        on the parameters (a view is a new object on every call). Weights FSDP manages (fully_shard or
        FullyShardedDataParallel) are never cached: FSDP frees their unsharded copies after each forward,
        and a cached W_cat would keep a full copy of them alive between steps; they are stacked per call.
        """
        biases = [m.base_layer.bias for m in members]
        params = [p for p in [m.base_layer.weight for m in members] + biases if p is not None]
        weights = [linear_weight(m.base_layer) for m in members]
        if (len(members) == 1 or not stacks_outputs(weights[0]) or any(p.requires_grad for p in params)
                or any(fsdp_managed(m.base_layer) for m in members)):
            return weights, stack_biases(weights, biases)
        key = tuple((id(p), p.data_ptr(), p._version) for p in params)
        if key != self._stacked_key:
            with torch.no_grad():
                self._stacked = ([torch.cat(weights)], stack_biases(weights, biases))
            self._stacked_key = key
        return self._stacked


class FusedLoraLinear(lora.Linear):
    """A PEFT LoRA Linear whose forward runs in its shared-input group (see the module docstring)."""

    _slora_group: LoraGroup

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
            if (x.dtype != self.base_layer.weight.dtype or lora_b.weight.dtype != factor_dtype
                    or (x.dtype != factor_dtype and not getattr(self, "cast_input_dtype_enabled", True))):
                return "dtype"
        if type(self.lora_dropout[adapter]) not in (nn.Dropout, nn.Identity):
            return "dropout"
        # A layer that is its own FSDP unit: its group-mates' weights, in other units, are sharded when it runs.
        if has_hooks(self.base_layer) or has_hooks(lora_a) or has_hooks(lora_b) or fsdp_unit(self):
            return "hooks"
        return None

    def fused_key(self, x: torch.Tensor) -> tuple:
        """What must agree for layers to share one fused call: adapter, dropout p, factor dtype, autocast."""
        adapter = self.active_adapters[0]
        dropout = self.lora_dropout[adapter]
        dropout_p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        device_type = x.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return adapter, dropout_p, self.lora_A[adapter].weight.dtype, autocast

    def parameter_state(self, key: tuple) -> tuple:
        """The fused key with the versions of the tensors an output was computed from (in-place edits show)."""
        adapter = key[0]
        tensors = (self.base_layer.weight, self.base_layer.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight)
        return key, tuple(None if t is None else (id(t), -1 if t.is_inference() else t._version) for t in tensors)

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
