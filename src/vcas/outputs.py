"""Finding the hidden-state tensor in whatever structure a block returns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def find_hidden_state(output: Any) -> torch.Tensor | None:
    """The hidden-state tensor in a block's output: the tensor itself, the first tensor of a
    tuple or list, or ``last_hidden_state`` / ``hidden_states`` (else the first tensor value) of
    a dict or ``ModelOutput``. Returns ``None`` when the output holds no floating-point tensor."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, Mapping):
        for key in ("last_hidden_state", "hidden_states"):
            value = output.get(key)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
        candidates = list(output.values())
    elif isinstance(output, (tuple, list)):
        candidates = list(output)
    else:
        return None
    for value in candidates:
        found = find_hidden_state(value)
        if found is not None:
            return found
    return None
