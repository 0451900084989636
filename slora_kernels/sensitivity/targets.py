"""Which modules to measure: nn.Linear and transformers' Conv1D (GPT-2), selected by PEFT's target_modules
rules (regex full match, or name suffixes)."""
from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from slora_kernels.layers import is_linear_like

MAX_LISTED = 12


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> dict[str, nn.Module]:
    """Full module name -> module for every nn.Linear or Conv1D that `target_modules` selects.

    A string is a regex that must match the whole module name (as PEFT does); a list selects a
    module whose name equals an entry or ends with "." + entry. Raises ValueError listing the
    model's Linear / Conv1D names when nothing matches.
    """
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules is not a valid regex ({err}): {target_modules!r}") from None

        def selected(name: str) -> bool:
            return pattern.fullmatch(name) is not None
    elif isinstance(target_modules, Sequence) and target_modules and all(isinstance(t, str) for t in target_modules):
        suffixes = tuple(target_modules)

        def selected(name: str) -> bool:
            return any(name == s or name.endswith("." + s) for s in suffixes)
    else:
        raise TypeError(f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}")
    linears = {name: m for name, m in model.named_modules() if is_linear_like(m)}
    found = {name: m for name, m in linears.items() if selected(name)}
    if not found:
        names = list(linears)
        listed = ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear in the model; "
                         f"candidates: {listed or 'none (the model has no nn.Linear nor Conv1D)'}")
    return found
