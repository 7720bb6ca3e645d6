"""Finding the hidden-state tensor in whatever structure a block returns, and checking that it
is batch-first (activation sampling drops samples along dimension 0)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import BlockDetectionError


class BatchLayoutError(BlockDetectionError):
    """A block's hidden state is not batch-first: sequence-first, or without a batch dimension."""


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


def iter_tensors(output: Any):
    """Every tensor in a block's output (tensors, tuples, lists, dicts and ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from iter_tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from iter_tensors(value)


def replace_tensor(output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """A copy of a block's output structure with the tensor ``old`` replaced by ``new``."""
    if output is old:
        return new
    if isinstance(output, Mapping):
        values = {key: replace_tensor(value, old, new) for key, value in output.items()}
        return values if type(output) is dict else type(output)(**values)
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return type(output)(*(replace_tensor(value, old, new) for value in output))
    if isinstance(output, (tuple, list)):
        return type(output)(replace_tensor(value, old, new) for value in output)
    return output


def input_batch_sizes(args: tuple, kwargs: dict[str, Any]) -> set[int]:
    """Dimension-0 sizes of the tensors a model is called with (nested one level in containers).

    Every tensor counts, so a model fed two batches of different sizes (text and images) passes."""
    sizes: set[int] = set()
    for value in (*args, *kwargs.values()):
        if isinstance(value, Mapping):
            items = list(value.values())
        else:
            items = list(value) if isinstance(value, (tuple, list)) else [value]
        sizes.update(t.shape[0] for t in items if isinstance(t, torch.Tensor) and t.dim() > 0)
    return sizes


def check_batch_first(hidden: torch.Tensor, batch_sizes: set[int], block_name: str) -> None:
    """Raise :class:`BatchLayoutError` if ``hidden`` has no dimension 0 among ``batch_sizes``."""
    if hidden.dim() > 0 and hidden.shape[0] in batch_sizes:
        return
    raise BatchLayoutError(
        f"block {block_name!r} returned a hidden state of shape {tuple(hidden.shape)}, but the "
        f"model was called with batch size {sorted(batch_sizes)}: vcas samples dimension 0, which "
        "must be the batch. Make the blocks batch-first (e.g. batch_first=True, or transpose "
        "inside the block), name other blocks with attach(..., blocks=[...]), or pass "
        "check_batch_first=False if the blocks see a reshaped batch on purpose.")
