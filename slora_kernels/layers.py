"""The layers the library adapts, seen the way nn.Linear sees them.

torch.nn.Linear stores its weight as [d_out, d_in]; transformers' Conv1D (GPT-2, GPT) computes the same
y = x W^T + b but stores the weight transposed, [d_in, d_out] (what PEFT calls `fan_in_fan_out`).
Statistics, reports, ranks and the fused op all use [d_out, d_in], so a Conv1D is read through a
transposed view (no copy).
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """Whether module is a transformers Conv1D. transformers is not imported for this: a model that holds
    a Conv1D has imported it already."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear or a Conv1D: the modules `target_modules` can select."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_orientation(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """t, laid out like module.weight, as nn.Linear's [d_out, d_in]: a transposed view for a Conv1D.
    A transpose undoes itself, so the same call maps a [d_out, d_in] tensor to the weight's layout."""
    return t.t() if is_conv1d(module) else t


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as [d_out, d_in] (a view for a Conv1D)."""
    return linear_orientation(module, module.weight)


def features(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an nn.Linear or a Conv1D."""
    d_out, d_in = linear_weight(module).shape
    return d_out, d_in
