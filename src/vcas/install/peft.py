"""PEFT models (LoRA and the other adapters of the ``peft`` package) under vcas.

Nothing here is needed to sample them: an adapter layer wraps a frozen base layer and small
trainable linears (LoRA's A and B), all plain layers that the plan handles like any other. What
needs care is unloading: ``merge_and_unload()`` and ``unload()`` replace every adapter layer by
its base layer, which carries vcas's sampled forward, so the plain model they return would keep
vcas's forwards (and the controller's live state) while the controller's plan still names the
adapter layers. While vcas is attached, these methods refuse with the fix instead; after
``controller.detach()`` they work as usual. Merging in place (``merge_adapter()``) replaces no
module and works while attached: the base layer's sampled forward reads the merged weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import AttachError

# The tuner methods that replace adapter layers by their base layers.
UNLOADING_METHODS = ("merge_and_unload", "unload")


def unloading_methods(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, method name) of every PEFT tuner method in ``model`` that replaces modules.
    A ``PeftModel`` forwards these calls to its tuner (``base_model``), which is listed."""
    return [(module, method) for module in model.modules() if type(module).__module__.startswith("peft")
            for method in UNLOADING_METHODS if callable(getattr(type(module), method, None))]


def refusal(method: str) -> Callable[..., Any]:
    """A stand-in for a tuner's ``method`` that raises :class:`vcas.AttachError` with the fix."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AttachError(
            f"vcas is attached to this PEFT model: {method}() replaces its adapter layers by their "
            "base layers, which carry vcas's sampled forwards, so the model it returns would keep "
            f"them. Call controller.detach() first, then {method}() (attach the returned model "
            "again to train it further with vcas)")

    return refuse
