"""PEFT's LoRA Linear, computed one shared-input group at a time.

`FusedLoraLinear` is a `peft.tuners.lora.Linear` (same parameters, ModuleDicts, adapters, merge /
unmerge / disable_adapter / set_adapter, same state_dict keys) whose forward asks its `LoraGroup`
for its output. The group holds the layers that read the same input tensor (q/k/v, gate/up): the
first of them to be called runs one `grouped_lora` for all, the others pick up their output when
they are called with that same tensor. Whatever the fused path does not cover (adapters disabled
or merged, several active adapters, mixed-batch `adapter_names`, autocast, mismatched dtypes)
runs PEFT's own forward, so it behaves exactly as PEFT. So does a model under torch.compile: the
grouping follows tensor identity across module calls, which a traced graph cannot guard on
(13 graph breaks in a 2-layer BERT), so compiled code gets PEFT's forward, one graph as for stock
PEFT, and the fused path is for eager training.
"""
from __future__ import annotations

import torch
from peft.tuners import lora
from torch import nn

from slora_kernels.ops.grouped_lora import grouped_lora_unchecked, stack_biases, stacks_outputs


class LoraGroup:
    """Layers fed the same input; computes their outputs together and hands each its own once."""

    def __init__(self, members: list[FusedLoraLinear]):
        self.members = members
        self._pending: dict[int, torch.Tensor] = {}
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
            return None
        key = (id(x), x._version, torch.is_grad_enabled())
        if key == self._pending_key and id(layer) in self._pending:
            y = self._pending.pop(id(layer))
            if not self._pending:
                self._pending_key = self._pending_input = None
            return y
        own = layer.fused_state(x)
        if own is None:
            return None
        members = [m for m in self.members if m is layer or m.fused_state(x) == own]
        adapter, dropout_p = own
        weights, bias = self._base(members)
        outputs = grouped_lora_unchecked(
            x, weights, bias, [m.lora_A[adapter].weight for m in members], [m.lora_B[adapter].weight for m in members],
            [m.scaling[adapter] for m in members], dropout_p=dropout_p)
        self._pending = {id(m): y for m, y in zip(members, outputs) if m is not layer}
        # Keep x alive while outputs are pending, so its id cannot be reused by another tensor.
        self._pending_key = key if self._pending else None
        self._pending_input = x if self._pending else None
        return outputs[members.index(layer)]

    def _base(self, members: list[FusedLoraLinear]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The members' base weights (one per layer, or [W_cat] where the op stacks: CUDA) and stacked bias.

        CUDA's one base GEMM needs W_cat [sum d_out, d_in]: a copy of the frozen weights, cached
        while they are unchanged (a second copy of those weights in memory). CPU computes a GEMM
        per layer and takes the weights as they are, without a copy.
        """
        weights = [m.base_layer.weight for m in members]
        biases = [m.base_layer.bias for m in members]
        params = [p for p in weights + biases if p is not None]
        if len(members) == 1 or not stacks_outputs(weights[0]) or any(p.requires_grad for p in params):
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

    def fused_state(self, x: torch.Tensor) -> tuple[str, float] | None:
        """(adapter, dropout p) when the fused path computes exactly what PEFT's forward would, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant or self.lora_bias.get(adapter, False):
            return None
        dtype = self.base_layer.weight.dtype
        if (x.dtype != dtype or self.lora_A[adapter].weight.dtype != dtype or self.lora_B[adapter].weight.dtype != dtype
                or torch.is_autocast_enabled(x.device.type)):
            return None
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout):
            return adapter, dropout.p if dropout.training else 0.0
        return (adapter, 0.0) if isinstance(dropout, nn.Identity) else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs:
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
