"""Whether a fused LoRA layer is still as its group's plan saw it, checked on every call.

A plan's decisions for a layer (PEFT's forward or the fused one, and which batch and layout) depend on
the layer's adapter state (active adapter, disabled, merged, input casting, scale, LoRA variant or bias)
and on its submodules (base layer, factors and dropout: identity, hooks, FSDP, parameters; the dropout's
mode), and on whether the layer itself has hooks. `LayerWatch` records those when the plan is built, keeping
references to the dictionaries it reads them from, and `matches` reads them again and compares, stopping at
the first difference:
identity for objects (modules, parameters, and the active-adapter value, which PEFT assigns anew on every
change), equality for flags and the scale. Tensors are compared by identity only; their dtype, storage
and requires_grad are read by the op itself on every call. On a large model a layer's attributes are
cold in the CPU's caches by the time it is called again, so this check is a noticeable part of a
host-bound step: it follows as few references as it can.
"""
from __future__ import annotations

from torch import nn


def hooked(attributes: dict) -> bool:
    """Whether the module with these attributes runs code besides its forward when called: forward (pre-)hooks,
    full backward (pre-)hooks, or a forward replaced on the instance (accelerate's hooks, e.g. device_map
    offload, replace it)."""
    return bool(attributes["_forward_hooks"] or attributes["_forward_pre_hooks"] or attributes["_backward_hooks"]
                or attributes["_backward_pre_hooks"] or "forward" in attributes)


def _dropout_mode(attributes: dict) -> tuple:
    """A dropout module's mode and probability, read from its attributes: an nn.Identity has no `p`, and
    asking the module for it would raise (and catch) an AttributeError through nn.Module.__getattr__ on every
    call."""
    return attributes["training"], attributes.get("p")


class _Submodule:
    """A base layer or factor as the plan saw it: the module, its hooks, FSDP flag and parameters."""

    __slots__ = ("module", "attributes", "params", "hooked", "fsdp", "weight", "bias")

    def __init__(self, module: nn.Module | None):
        self.module = module
        if module is not None:
            self.attributes = module.__dict__
            self.params = self.attributes["_parameters"]
            self.hooked = hooked(self.attributes)
            self.fsdp = self.attributes.get("_is_fsdp_managed_module", False)
            self.weight, self.bias = self.params.get("weight"), self.params.get("bias")


def _same(seen: _Submodule, module: nn.Module | None) -> bool:
    """Whether module is the one seen, with the same hooks, FSDP flag and parameters."""
    if module is not seen.module:
        return False
    if module is None:
        return True
    attributes, params = seen.attributes, seen.params
    return (hooked(attributes) is seen.hooked and attributes.get("_is_fsdp_managed_module", False) is seen.fsdp
            and params.get("weight") is seen.weight and params.get("bias") is seen.bias)


class LayerWatch:
    """One fused layer's state as its group's plan saw it (see the module docstring)."""

    __slots__ = ("cls", "attributes", "modules", "own_hooks", "active", "adapter", "disabled", "merged", "cast_input",
                 "scale", "variant", "lora_bias", "dicts", "base", "lora_a", "lora_b", "dropout", "dropout_mode")

    def __init__(self, layer):
        attributes = layer.__dict__
        self.cls, self.attributes, self.modules = layer.__class__, attributes, attributes["_modules"]
        self.own_hooks = hooked(attributes)  # the layer's own: user code that runs between members' calls
        self.active = layer._active_adapter
        adapter = self.active if isinstance(self.active, str) else tuple(self.active)
        self.adapter = adapter if isinstance(adapter, str) or len(adapter) != 1 else adapter[0]
        self.disabled, self.merged = layer._disable_adapters, bool(attributes["merged_adapters"])
        self.cast_input = attributes.get("cast_input_dtype_enabled", True)
        self.scale = attributes["scaling"].get(self.adapter)
        self.variant = self.adapter in attributes["lora_variant"]
        self.lora_bias = attributes["lora_bias"].get(self.adapter, False)
        # The ModuleDicts holding the factors and dropout, and their own entry dictionaries.
        self.dicts = tuple((self.modules[kind], self.modules[kind]._modules)
                           for kind in ("lora_A", "lora_B", "lora_dropout"))
        self.base = _Submodule(self.modules["base_layer"])
        (_, a), (_, b), (_, dropout) = self.dicts
        self.lora_a, self.lora_b = _Submodule(a.get(self.adapter)), _Submodule(b.get(self.adapter))
        self.dropout = _Submodule(dropout.get(self.adapter))
        self.dropout_mode = None if self.dropout.module is None else _dropout_mode(self.dropout.attributes)

    def matches(self, layer) -> bool:
        """Whether layer still is as recorded (compared in order of how often each thing changes)."""
        attributes, adapter = self.attributes, self.adapter
        if (layer._active_adapter is not self.active or layer._disable_adapters is not self.disabled
                or bool(attributes["merged_adapters"]) is not self.merged or layer.__class__ is not self.cls
                or attributes.get("cast_input_dtype_enabled", True) is not self.cast_input
                or attributes["scaling"].get(adapter) != self.scale
                or (adapter in attributes["lora_variant"]) is not self.variant
                or attributes["lora_bias"].get(adapter, False) != self.lora_bias
                or hooked(attributes) is not self.own_hooks):
            return False
        modules = self.modules
        (dict_a, entries_a), (dict_b, entries_b), (dict_dropout, entries_dropout) = self.dicts
        if (modules["lora_A"] is not dict_a or modules["lora_B"] is not dict_b
                or modules["lora_dropout"] is not dict_dropout):
            return False
        dropout = entries_dropout.get(adapter)
        if not _same(self.dropout, dropout) or (dropout is not None
                                                and _dropout_mode(self.dropout.attributes) != self.dropout_mode):
            return False
        return (_same(self.base, modules["base_layer"]) and _same(self.lora_a, entries_a.get(adapter))
                and _same(self.lora_b, entries_b.get(adapter)))
