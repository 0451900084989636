"""A fused group's plan: what its calls compute, decided once per state of the group.

Whether a layer may take the fused path, and with which layout, depends on its adapter state and
submodules and on the call (x's dtype and device, autocast, the device path). Deriving that member by
member on every call was most of the fused path's host time. A plan decides it once for a call context
and keeps, per member, a `LayerWatch` of what the decisions read; each layer call checks its own watch,
and any change (a hook added, an adapter disabled or switched, `model.eval()`) rebuilds the plan then.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from slora_kernels.layers import is_conv1d, linear_weight
from slora_kernels.ops.grouped_lora import GroupLayout, Operands, prepare, run_group
from slora_kernels.nn.watch import LayerWatch, hooked


def has_hooks(module: nn.Module) -> bool:
    """Whether calling module runs code besides its forward (see `slora_kernels.nn.watch.hooked`)."""
    return hooked(module.__dict__)


def fsdp_managed(module: nn.Module) -> bool:
    """Whether FSDP shards module's parameters: fully_shard and FullyShardedDataParallel both mark every
    module they manage with this flag (torch.compile reads it)."""
    return module.__dict__.get("_is_fsdp_managed_module", False)


_version_of = operator.attrgetter("_version")


def version_sum(tensors: tuple) -> int:
    """The sum of tensors' version counters: each counter only grows, so the sum of the same tensors is unchanged
    exactly when none of them was modified in place."""
    return sum(map(_version_of, tensors))


class Batch:
    """Members of a group computed by one call: their layout and tensors (the same fused key).

    Base mode "gemm" (nn.Linear, Conv1D): the fused op computes the whole output from the base weights. The
    other modes call each member's base layer (a quantized one computes with its own kernels), run the fused op
    for the LoRA terms alone, and add each to its base output as the member's PEFT class does.
    """

    def __init__(self, members: list, fused_key: tuple, x: torch.Tensor):
        adapter, dropout_p, _, cast_to, self.mode = fused_key
        self.members, self.fused_key = members, fused_key
        self.position = {id(m): i for i, m in enumerate(members)}
        # Members with hooks of their own run user code between their calls: no outputs kept across it.
        self.shares = not any(map(has_hooks, members))
        self.bases = [m.base_layer for m in members]
        self.weights = [b.weight for b in self.bases]
        self.biases = [getattr(b, "bias", None) for b in self.bases]
        self.lora_a = [m.lora_A[adapter].weight for m in members]
        self.lora_b = [m.lora_B[adapter].weight for m in members]
        self.layout = GroupLayout.of(self.lora_b, [m.scaling[adapter] for m in members], dropout_p, cast_to)
        gemm = self.mode == "gemm"
        self.conv1d = gemm and any(is_conv1d(b) for b in self.bases)
        self.operands = (Operands(self._weights(), self.biases, self.lora_a, self.lora_b) if gemm
                         else Operands([], [], self.lora_a, self.lora_b))
        # No copy of the frozen weights is kept (a stacked W_cat would save GEMM launches on small groups): writes
        # through `.data` or another alias reach a parameter without bumping its version counter, so nothing cheap
        # could prove such a copy current. The op reads the parameters themselves on every call.
        self.call, self.backward_calls = prepare(self.layout, self.operands, x)
        # `run`, or straight the prepared call when run would only forward to it (the common case: one less frame).
        self.compute = self.call if gemm and not self.conv1d else self.run
        # Per member, the tensors whose in-place changes make an output computed for it stale (an inference tensor
        # has no version counter: none is kept for it).
        self.tracked = [tuple(t for t in tensors if t is not None and not t.is_inference())
                        for tensors in zip(self.weights, self.biases, self.lora_a, self.lora_b)]

    def _weights(self) -> list[torch.Tensor]:
        """The base weights as [d_out, d_in]: Conv1D stores [d_in, d_out], read through a transposed view."""
        return [linear_weight(b) for b in self.bases]

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.mode != "gemm":
            return self._run_with_base_layers(x)
        if self.conv1d:  # a view made now follows the parameter even if its storage was swapped
            return run_group(self.layout, x, Operands(self._weights(), self.biases, self.lora_a, self.lora_b))
        return self.call(x)

    def _run_with_base_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each base layer's own output plus its LoRA term, summed and cast as the PEFT class does: LoRA Linear
        adds in the wider dtype and rounds once into the base output's; the bitsandbytes classes round the term
        into the base output's dtype first, unless `torch.is_autocast_enabled()` (CUDA autocast)."""
        results = [base(x) for base in self.bases]
        terms = self.call(x)
        if self.mode == "linear":
            return [(r + t).to(r.dtype) for r, t in zip(results, terms)]
        if torch.is_autocast_enabled():
            return [r + t for r, t in zip(results, terms)]
        return [r + t.to(r.dtype) for r, t in zip(results, terms)]


class GroupPlan:
    """Which members run PEFT's forward (and why), and the batches the others are computed in, for one
    call context (x's dtype and device, autocast dtype, device path) and the members' states."""

    def __init__(self, members: list, x: torch.Tensor, context: tuple):
        self.context = context
        self.watch_of = {id(m): LayerWatch(m) for m in members}
        self.reasons: dict[int, str] = {}
        by_key: dict[tuple, list] = {}
        for member in members:
            reason = member.fallback_reason(x)
            if reason is None:
                by_key.setdefault(member.fused_key(x), []).append(member)
            else:
                self.reasons[id(member)] = reason
        self.batches = {id(m): batch for key, batch_members in by_key.items()
                        for batch in (Batch(batch_members, key, x),) for m in batch_members}
        self._alone: dict[int, Batch] = {}

    def alone(self, layer, x: torch.Tensor) -> Batch:
        """A batch of layer by itself (inference tensors: no version counter proves a shared output fresh)."""
        batch = self._alone.get(id(layer))
        if batch is None:
            batch = self.batches[id(layer)]
            if len(batch.members) > 1:
                batch = Batch([layer], batch.fused_key, x)
            self._alone[id(layer)] = batch
        return batch
