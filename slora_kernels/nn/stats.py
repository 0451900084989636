"""Counting which forward calls of fused LoRA layers took the fused path, and why the others did not.

A fused layer falls back to PEFT's own forward whenever the fused op would not compute exactly what
PEFT computes; the reasons, by name:

- "disabled": adapters disabled (`with model.disable_adapter()`), PEFT runs the base layer alone
- "merged": the adapter is merged into the base weight
- "multiple adapters": more than one active adapter
- "inactive adapter": the active adapter has no LoRA factors in this layer
- "variant": a LoRA variant (DoRA, ...) or lora_bias on the active adapter
- "dtype": dtypes the op does not combine (x unlike the base weight outside autocast, A unlike B,
  or PEFT's input casting disabled while x and the factors differ)
- "dropout": a lora_dropout module other than torch.nn.Dropout / Identity, or p = 1 in training mode
- "arguments": extra forward arguments, e.g. PEFT's mixed-batch `adapter_names`
- "hooks": hooks of any kind (forward, forward pre-, full backward, backward pre-, or an accelerate hook)
  on base_layer, lora_A, lora_B or lora_dropout, which the fused op, reading their weights directly, would
  skip; a global module hook (`torch.nn.modules.module.register_module_forward_hook` and its kin), which
  sends every layer there while registered; or FSDP2's `fully_shard` applied to the LoRA layer itself (its
  group-mates' weights, in FSDP units of their own, are still sharded when it runs)
- "scaling": a tensor-valued scale (PEFT's hotswap preparation), which may change in place
- "parametrized": a lora_A / lora_B whose weight is not a registered tensor (a parametrization, an attribute)
- "torch.func": a torch.func transform (grad, vmap, ...) is active

Calls traced by torch.compile are not counted: a Python counter inside a compiled region would be
frozen into the graph (or force a recompile on every call).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field


@dataclass
class FusionStats:
    """Forward calls of a model's fused LoRA layers since `fuse()` or the last reset, and the LoRA layers
    `fuse()` left to PEFT by reason (their calls are PEFT's and not counted in `calls`)."""

    fused: int = 0
    fallback: dict[str, int] = field(default_factory=dict)
    left_to_peft: dict[str, int] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return self.fused + sum(self.fallback.values())

    @property
    def fused_fraction(self) -> float:
        """Share of the fused layers' calls that took the fused path (1.0 when there were none yet)."""
        return self.fused / self.calls if self.calls else 1.0

    def __str__(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.fallback.items())) or "none"
        text = (f"{self.fused} of {self.calls} LoRA layer calls fused ({100 * self.fused_fraction:.1f}%); "
                f"fallbacks: {reasons}")
        if self.left_to_peft:
            left = "; ".join(f"{count} x {reason}" for reason, count in sorted(self.left_to_peft.items()))
            text += f"; LoRA layers left to PEFT by fuse(): {sum(self.left_to_peft.values())} ({left})"
        return text


class FusionRecorder:
    """The live counters of one fused model, shared by all its groups; warns once per fallback reason seen on a
    layer's first call (a layer that is never fused as set up). Layers are known by the names `fuse` gave them
    (`_slora_name`), so a copy of the model (deepcopy, pickle) keeps counting with a copy of its recorder."""

    def __init__(self, layer_names: list[str]):
        self.stats = FusionStats()
        self._not_yet_called = set(layer_names)
        self._warned: set[str] = set()

    def fused(self, layer: object) -> None:
        self.stats.fused += 1
        self._not_yet_called.discard(layer._slora_name)

    def fell_back(self, layer: object, reason: str) -> None:
        self.stats.fallback[reason] = self.stats.fallback.get(reason, 0) + 1
        name = layer._slora_name
        if name in self._not_yet_called:
            self._not_yet_called.discard(name)
            if reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"slora_kernels: {name} runs PEFT's own forward, not the fused one ({reason}); "
                              "slora_kernels.fusion_stats(model) counts every fallback", stacklevel=4)

    def snapshot(self, reset: bool = False, left_to_peft: dict[str, int] | None = None) -> FusionStats:
        stats = FusionStats(self.stats.fused, dict(self.stats.fallback), dict(left_to_peft or {}))
        if reset:
            self.stats = FusionStats()
        return stats
