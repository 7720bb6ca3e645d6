"""Which layer kinds vcas samples, by registration.

A *site* is a sampled layer installed as its module's ``forward``. A :class:`SiteRegistry` maps
module types (or predicates) to a *site kind* that builds the site; :data:`DEFAULT_SITES` holds
``nn.Linear``, transformers' ``Conv1D`` and ``nn.Conv1d/2d/3d``. A registry is immutable:
:meth:`SiteRegistry.register` returns a new one, passed to ``vcas.attach(..., sites=...)``::

    class ScaledLinear(nn.Module):          # y = x @ w.T * s + b
        ...

    sites = vcas.DEFAULT_SITES.register(
        ScaledLinear, vcas.LinearKind(weight=lambda m: m.w * m.s, bias=lambda m: m.b))
    ctl = vcas.attach(model, cfg, sites=sites)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, cast, runtime_checkable

import torch
from torch import nn

from ..ops.conv import ConvKind
from ..ops.linear import LinearKind
from ..runtime.runtime import Runtime


@runtime_checkable
class Site(Protocol):
    """A sampled layer: callable as its module's forward."""

    name: str
    module: nn.Module
    kind: str  # "linear" (may sample its weight gradient) or "conv"
    weight_sampled: bool

    @property
    def weight(self) -> torch.Tensor: ...

    def __call__(self, *args, **kwargs): ...


class SiteKind(Protocol):
    """Builds the site of one module (see :class:`vcas.LinearKind` for linear-like layers)."""

    kind: str

    def weight_of(self, module: nn.Module) -> torch.Tensor:
        """The module's weight parameter (whose gradient the controllers measure)."""

    def build(self, name: str, module: nn.Module, runtime: Runtime, *, weight_sampled: bool,
              block: str | None = None) -> Site: ...


Match = type | Callable[[nn.Module], bool]


@dataclasses.dataclass(frozen=True)
class SiteRegistry:
    """Module types (matched exactly, not by subclass) or predicates, each with its site kind.

    Subclasses are not matched: a subclass may compute something else in its forward (a
    quantized linear, for instance); register it explicitly if it is a plain linear layer.
    Later registrations take precedence.
    """

    entries: tuple[tuple[Match, SiteKind, str], ...] = ()

    def register(self, match: Match, kind: SiteKind, description: str | None = None) -> SiteRegistry:
        """A new registry where modules matching ``match`` (a type, or a predicate
        ``fn(module) -> bool``) get sites built by ``kind``."""
        if not (isinstance(match, type) or callable(match)):
            raise TypeError(f"register: match must be a module type or a predicate, got {match!r}")
        if not callable(getattr(kind, "build", None)):
            raise TypeError(f"register: {kind!r} has no build(name, module, runtime, weight_sampled=..., block=...)")
        label = description or (match.__name__ if isinstance(match, type)
                                else cast(str, getattr(match, "__name__", "predicate")))
        return SiteRegistry(((match, kind, label),) + self.entries)

    def lookup(self, module: nn.Module) -> SiteKind | None:
        for match, kind, _ in self.entries:
            if type(module) is match if isinstance(match, type) else match(module):
                return kind
        return None


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' Conv1D: a linear layer that stores its weight as (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


DEFAULT_SITES = (SiteRegistry()
                 .register(_is_conv, ConvKind(), "nn.Conv1d/2d/3d and subclasses")
                 .register(is_transposed_linear, LinearKind(transposed=True), "transformers Conv1D")
                 .register(nn.Linear, LinearKind(), "nn.Linear"))
"""The layer kinds vcas samples by default."""
