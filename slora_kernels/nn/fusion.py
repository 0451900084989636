"""fuse / unfuse: swap a PeftModel's LoRA layers for fused, shared-input grouped ones and back.

Fusing changes the class of each supported PEFT LoRA layer to its fused subclass in place (the parameters and
adapter state are the same objects), so state_dict keys, `save_pretrained`, optimizers already holding the
parameters and PEFT's adapter API keep working. Supported: PEFT's LoRA Linear (over nn.Linear, GPT-2's Conv1D
or another Linear) and its bitsandbytes 4-bit and 8-bit layers (QLoRA). Groups are found from the model itself:
one probe forward (eval mode, no grad) records the input tensor of every LoRA layer, and layers of one parent
module whose input is the very same tensor form a group (q/k/v, gate/up in BERT/RoBERTa, Llama and most
transformers).
"""
from __future__ import annotations

import functools
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners import lora
from peft.tuners.lora import LoraLayer
from torch import nn

from slora_kernels.nn.fused import FusedLoraLayer, LoraGroup, fused_class
from slora_kernels.nn.plan import has_hooks
from slora_kernels.nn.stats import FusionRecorder, FusionStats

SHOWN = 8  # layers a warning names before it only counts


@functools.cache
def fusable_classes() -> tuple[type, ...]:
    """The PEFT LoRA layer classes `fuse` converts: LoRA Linear, and the bitsandbytes ones where PEFT has them.

    Without bitsandbytes no model holds a bitsandbytes layer, and PEFT's bnb module (which some PEFT releases
    import only then, others always, failing) has nothing to offer.
    """
    try:
        from peft.tuners.lora import bnb
    except ImportError:
        return (lora.Linear,)
    return (lora.Linear, *(getattr(bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, name)))


def fuse(peft_model: nn.Module, example_inputs: Mapping[str, Any] | None = None) -> nn.Module:
    """Fuse the LoRA layers of `peft_model` in place and return it.

    example_inputs: keyword inputs for the probe forward that finds shared-input groups; default
    the base model's `dummy_inputs` (every transformers model has them). Layers of other PEFT classes
    (Embedding, Conv, other quantizers), layers with options the fused path does not implement (DoRA and
    other LoRA variants, lora_bias) and layers whose base_layer / lora_A / lora_B carry forward hooks
    (e.g. accelerate's device_map offload, which the fused op would bypass) stay stock PEFT layers, named
    with their reasons in one warning; `fusion_stats(model)` counts them too, and the forward calls that took
    the fused path. Under FSDP2, fuse before or after `fully_shard`, on every rank (there the probe forward is
    collective); after `get_peft_model` in any case, which must itself come before sharding.
    """
    unfuse(peft_model)
    layers, skipped = {}, []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            reason = _unsupported(module)
            if reason is None:
                layers[name] = module
            else:
                skipped.append((name, reason))
    peft_model._slora_left_to_peft = dict(Counter(reason for _, reason in skipped))
    if skipped:
        shown = "; ".join(f"{name} ({reason})" for name, reason in skipped[:SHOWN])
        more = f"; and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
        warnings.warn(f"slora_kernels.fuse left {len(skipped)} LoRA layer(s) as stock PEFT layers: {shown}{more}",
                      stacklevel=2)
    recorder = FusionRecorder(list(layers))
    for names in _shared_input_groups(peft_model, layers, example_inputs):
        members = [layers[n] for n in names]
        group = LoraGroup(members, recorder)
        for name, module in zip(names, members):
            module.__class__ = fused_class(type(module))
            module._slora_group, module._slora_name = group, name
    return peft_model


def unfuse(peft_model: nn.Module) -> nn.Module:
    """Put the stock PEFT layers back (in place, same parameters); returns the model."""
    for module in peft_model.modules():
        if isinstance(module, FusedLoraLayer):
            module.__class__ = module._slora_stock
            del module._slora_group, module._slora_name
    peft_model.__dict__.pop("_slora_left_to_peft", None)
    return peft_model


def fusion_stats(peft_model: nn.Module, reset: bool = False) -> FusionStats:
    """Forward calls of the model's fused LoRA layers since `fuse()` (or the last `reset=True`): how many
    took the fused path and, by reason, how many ran PEFT's own forward; and the layers `fuse()` left to
    PEFT, by reason (all of them, when none could be fused)."""
    # The model fuse() was called on may sit inside a wrapper now (DDP, accelerate): look among the modules.
    fused = [m for m in peft_model.modules() if "_slora_left_to_peft" in m.__dict__]
    if not fused:
        raise ValueError("fusion_stats: the model is not fused; call slora_kernels.fuse(model) first")
    left = dict(fused[0]._slora_left_to_peft)
    for module in peft_model.modules():
        if isinstance(module, FusedLoraLayer):
            return module._slora_group.recorder.snapshot(reset, left)
    return FusionStats(left_to_peft=left)


def _unsupported(module: LoraLayer) -> str | None:
    stock = type(module)
    if stock not in fusable_classes():
        names = ", ".join(cls.__name__ for cls in fusable_classes())
        return f"{stock.__module__}.{stock.__name__} has no fused path (fused: {names})"
    if module.lora_variant:
        variants = sorted({type(v).__name__ for v in module.lora_variant.values()})
        return f"LoRA variant {', '.join(variants)} (e.g. DoRA) is not fused"
    if any(module.lora_bias.values()):
        return "lora_bias=True"
    hooked = [name for name, sub in (("base_layer", module.base_layer), *_factor_modules(module)) if has_hooks(sub)]
    if hooked:
        return f"forward hooks on {', '.join(hooked)} (the fused op would skip them)"
    return None


def _factor_modules(module: LoraLayer) -> list[tuple[str, nn.Module]]:
    return [(f"{kind}[{adapter!r}]", sub) for kind in ("lora_A", "lora_B")
            for adapter, sub in getattr(module, kind).items()]


def _shared_input_groups(model: nn.Module, layers: dict[str, LoraLayer],
                         example_inputs: Mapping[str, Any] | None) -> list[list[str]]:
    """Names of layers grouped by the identity of the tensor they read in one probe forward."""
    if example_inputs is None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        example_inputs = getattr(base, "dummy_inputs", None)
    if example_inputs is None:
        warnings.warn("slora_kernels.fuse: no example_inputs and the model has no dummy_inputs; every layer is "
                      "fused on its own (no shared-input groups)", stacklevel=3)
        return [[name] for name in layers]
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example_inputs.items()}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [module.register_forward_pre_hook(lambda _, args, name=name: seen[name].append(args[0]))
             for name, module in layers.items()]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        # The base layers run in training mode: bitsandbytes repacks a 4-bit weight for its CPU kernel, for good,
        # on an eval-mode call without grad (and fails on layers narrower than its block); the probe must leave
        # the model as it found it. A layer's mode changes its values at most, not which tensor it reads.
        for layer in layers.values():
            layer.base_layer.training = True
        with torch.no_grad():
            model(**inputs)
    except Exception as error:
        raise ValueError(f"slora_kernels.fuse: the probe forward that finds shared-input layers failed ({error}); "
                         "pass example_inputs, keyword inputs the model accepts") from error
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
        _reshard(model)
    groups: dict[tuple, list[str]] = {}
    for name, module in layers.items():
        calls = seen[name]
        # A layer called more than once (or never) is not part of a fixed sharing pattern: alone. Layers of
        # different parents never group, even on one input (BART's cross-attention reads the encoder's states in
        # every decoder layer): a group must lie within the block that checkpointing or FSDP wraps.
        parent = name.rpartition(".")[0]
        key = (id(calls[0]), parent, _dropouts(module)) if len(calls) == 1 else (name,)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _reshard(model: nn.Module) -> None:
    """Reshard a model already under FSDP2: its root keeps its parameters unsharded after a forward until
    the backward, which the probe has none of, so an optimizer built next would hold the unsharded
    tensors and its updates would be lost at the next reshard (and the memory kept)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _dropouts(module: LoraLayer) -> tuple:
    return tuple(sorted((a, getattr(d, "p", 0.0)) for a, d in module.lora_dropout.items()))
