"""Activation checkpointing around blocks: what vcas must know about it.

Two forms reach a block:

- transformers' layers (subclasses of ``GradientCheckpointingLayer``) checkpoint inside their
  class's ``forward`` once ``model.gradient_checkpointing_enable()`` ran; module hooks (vcas's
  block samplers among them) stay outside the checkpoint. A block that recomputes compactly
  (:mod:`vcas.ops.recompute`) already re-runs its forward in its backward, so for its own
  passes it calls the forward inside that wrapper (:func:`checkpoint_free_forward`) and, like
  checkpointing, keeps only its inputs (and dropout masks).
- ``torch.utils.checkpoint`` around a whole module call (a user's model, older transformers):
  the block's forward then runs under the checkpoint's saved-tensor hooks, or without a graph
  and again inside the backward. Compact recompute steps aside there
  (:func:`inside_checkpoint`), so that the checkpoint's re-run repeats exactly what its forward
  did.

Passes vcas runs on its own (calibration, FLOPs measurement, variance checks) take gradients
with ``torch.autograd.grad``, which torch's reentrant checkpoint refuses: they run with
transformers' checkpointing switched off (:func:`checkpointing_suspended`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

# The name of the function transformers' GradientCheckpointingLayer wraps a class's forward in.
_WRAPPER = "forward_with_checkpointing"


def checkpoint_free_forward(module: nn.Module) -> Callable[..., Any] | None:
    """``module``'s forward without transformers' checkpointing wrapper (bound to it), or
    ``None`` when its class's forward has no such wrapper."""
    forward = type(module).forward
    code = getattr(forward, "__code__", None)
    inner = getattr(forward, "__wrapped__", None)
    if code is None or code.co_name != _WRAPPER or inner is None or not _is_checkpointing_layer(module):
        return None
    return inner.__get__(module)


def checkpoints(module: nn.Module) -> bool:
    """Whether ``module``'s forward checkpoints now (transformers' wrapper, switched on, in
    training mode)."""
    return (checkpoint_free_forward(module) is not None and module.training
            and bool(getattr(module, "gradient_checkpointing", False)))


def inside_checkpoint() -> bool:
    """Whether the code running now is a checkpointed forward or its re-run: the innermost
    saved-tensor hooks are ``torch.utils.checkpoint``'s (the non-reentrant checkpoint's forward
    and re-run), or a backward is running (the reentrant checkpoint re-runs forwards there).
    Other saved-tensor hooks (``save_on_cpu``) do not count."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top_hooks(False) if top_hooks is not None else None
    hooked = hooks is not None and getattr(hooks[0], "__module__", None) == torch.utils.checkpoint.__name__
    task = getattr(torch._C, "_current_graph_task_id", None)
    return hooked or (task is not None and task() != -1)


@contextlib.contextmanager
def checkpointing_suspended(model: nn.Module) -> Iterator[None]:
    """Switch transformers' ``gradient_checkpointing`` flags off inside the scope (each flag is
    restored as it was, instance attribute or not)."""
    switched = [(module, module.__dict__.get("gradient_checkpointing", _MISSING))
                for module in model.modules() if getattr(module, "gradient_checkpointing", False) is True]
    for module, _ in switched:
        setattr(module, "gradient_checkpointing", False)  # noqa: B010 - nn.Module.__setattr__ is typed for tensors
    try:
        yield
    finally:
        for module, previous in switched:
            if previous is _MISSING:
                del module.gradient_checkpointing
            else:
                setattr(module, "gradient_checkpointing", previous)  # noqa: B010


_MISSING = object()


def _is_checkpointing_layer(module: nn.Module) -> bool:
    return any(cls.__name__ == "GradientCheckpointingLayer" and cls.__module__.startswith("transformers")
               for cls in type(module).__mro__)
