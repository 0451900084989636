"""Block-by-block calibration (`estimate_sensitivity(..., offload="sequential")`), as GPTQ quantises.

The model stays where it is (CPU, or meta/disk under accelerate's offload hooks). The inputs of its first
transformer block are caught for every calibration batch (a pre-hook stops each forward there); then each
block in turn is put on the compute device (under accelerate: its weights loaded to the hooks' execution
device), run on every cached input with the collector's hooks attached, and put back, its outputs becoming
the next block's inputs. Each block's weights move once for all batches, not once per batch, and only one
block and the cached hidden states occupy the compute device.

Assumes what decoder and encoder stacks do: the blocks of one nn.ModuleList are called in order, once per
forward, each on the previous one's output (the first positional argument, or `hidden_states=`), with the
other arguments (masks, position ids, rotary `position_embeddings`) the same for every block. Models that
mix layer types (transformers' `config.layer_types`, e.g. Gemma 2's sliding-window layers) give their blocks
different masks and are refused.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from slora_kernels.sensitivity.collect import ActivationCollector, batch_size

MAX_LISTED = 8


class _Caught(Exception):
    """Raised by the first block's pre-hook: its inputs are known, the rest of the forward is not needed."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("first block reached")
        self.block_args, self.block_kwargs = args, kwargs


@dataclass
class _BlockInput:
    """One calibration batch as the blocks see it; `args[0]` or `kwargs["hidden_states"]` is replaced by
    each block's output."""
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None

    def advance(self, output: Any) -> None:
        hidden = output if isinstance(output, torch.Tensor) else output[0]  # a tensor, or a tuple led by it
        if self.args:
            self.args = (hidden, *self.args[1:])
        else:
            self.kwargs["hidden_states"] = hidden


def find_blocks(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[str, nn.ModuleList]:
    """(name, list) of the nn.ModuleList whose children hold the most targets (Llama `model.layers`, BERT
    `encoder.layer`, GPT-2 `transformer.h`). Every target must sit in it: the other modules never run here."""
    wanted = {id(m) for m in targets.values()}
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            held = sum(id(m) in wanted for m in module.modules())
            if held and (best is None or (held, len(module)) > best[:2]):
                best = (held, len(module), name, module)
    if best is None:
        raise ValueError("offload='sequential' runs the model one block at a time and needs its blocks in an "
                         "nn.ModuleList holding the target modules (Llama model.layers, BERT encoder.layer, "
                         "GPT-2 transformer.h); no nn.ModuleList of this model holds any target")
    _, _, name, blocks = best
    inside = {id(m) for m in blocks.modules()}
    outside = [n for n, m in targets.items() if id(m) not in inside]
    if outside:
        listed = ", ".join(outside[:MAX_LISTED]) + (f", ... ({len(outside)} in all)" if len(outside) > MAX_LISTED else "")
        raise ValueError(f"offload='sequential' measures only target modules inside the blocks {name!r}; these are "
                         f"outside: {listed}. Leave them out of target_modules, or use offload=None")
    return name, blocks


def _to(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts) on `device`; a transformers Cache dropped (None), since
    replaying the blocks would only fill it with every layer's keys and values."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Cache):
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _catch_inputs(model: nn.Module, first: nn.Module, batches: Iterable[dict], device: torch.device,
                  collector: ActivationCollector) -> list[_BlockInput]:
    """The first block's arguments for every batch, on `device`; counts the batches into the collector."""
    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Caught(args, kwargs)

    cached = []
    handle = first.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch)
            except _Caught as caught:
                args, kwargs = _to(caught.block_args, device), _to(caught.block_kwargs, device)
            else:
                raise ValueError("offload='sequential': the model's forward never called its first block")
            if not args and "hidden_states" not in kwargs:
                raise ValueError("offload='sequential': the first block was called with neither a positional "
                                 f"argument nor hidden_states=, so its hidden states are unknown (got {sorted(kwargs)})")
            mask = batch.get("attention_mask")
            cached.append(_BlockInput(args, kwargs, None if mask is None else mask.to(device)))
            collector.count_batch(batch_size(batch))
    finally:
        handle.remove()
    return cached


def _offload_hooks(block: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(module, hook) for every accelerate AlignDevicesHook in the block that offloads its module's weights
    (a SequentialHook's members included)."""
    found = []
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        found += [(module, h) for h in getattr(hook, "hooks", (hook,)) if getattr(h, "offload", False) is True]
    return found


@contextmanager
def _loaded_once(hooks: list[tuple[nn.Module, Any]]) -> Iterator[None]:
    """accelerate's offload hooks load a module's weights before every call and drop them after; here they
    load them once, stay resident for all cached inputs (the hooks still move inputs), and drop them at the end."""
    loaded = []
    try:
        for module, hook in hooks:
            hook.pre_forward(module)
            hook.offload = False
            loaded.append((module, hook))
        yield
    finally:
        for module, hook in loaded:
            hook.offload = True
            hook.post_forward(module, None)


@contextmanager
def _on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """The block on `device` while in use, then back. Under accelerate's hooks the hooks place it: offloaded
    weights are loaded once to their execution device."""
    if any(hasattr(m, "_hf_hook") for m in block.modules()):
        with _loaded_once(_offload_hooks(block)):
            yield
        return
    homes = {t.device for t in chain(block.parameters(), block.buffers())}
    if len(homes) > 1:
        raise ValueError(f"offload='sequential' moves each block whole, but one block spans devices "
                         f"{sorted(map(str, homes))}: put the model on one device, or dispatch it with accelerate")
    block.to(device)
    try:
        yield
    finally:
        if homes:
            block.to(homes.pop())


def run_sequential(model: nn.Module, collector: ActivationCollector, batches: Iterable[dict],
                   device: torch.device, progress: bool) -> None:
    """Fill the collector (hooks attached, model frozen in eval mode) block by block on `device`."""
    layer_types = getattr(getattr(model, "config", None), "layer_types", None) or ()
    if len(set(layer_types)) > 1:
        raise ValueError(f"offload='sequential' replays the first block's arguments (its attention mask) to every "
                         f"block, but this model mixes layer types {sorted(set(layer_types))}; use offload=None")
    name, blocks = find_blocks(model, collector.targets)
    with torch.no_grad():
        cached = _catch_inputs(model, blocks[0], batches, device, collector)
        for block in tqdm(blocks, disable=not progress, desc=f"sensitivity ({name})"):
            with _on_device(block, device):
                for item in cached:
                    with collector.masked(item.mask):
                        item.advance(block(*item.args, **item.kwargs))
