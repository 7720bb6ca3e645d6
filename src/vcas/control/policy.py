"""What a controller policy is: the object that decides the keep ratios.

A policy gathers its evidence through the :class:`~vcas.control.mechanism.Mechanism` (extra
calibration passes on batches of its own, or records of training steps) and returns an
:class:`Outcome`; the :class:`~vcas.control.controller.Controller` applies it, counts steps,
keeps the history and checkpoints the policy with its own ``state_dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, Protocol

import torch

from ..errors import ConfigError
from .mechanism import LossFn, Mechanism
from .statistics import Measurement


@dataclasses.dataclass(frozen=True)
class Decision:
    """New keep ratios, and the estimates behind them.

    Attributes:
        s: the kept share of the gradient norm the activation ratios follow from.
        act: activation keep ratios, plan order.
        weight: weight keep ratios by linear name.
        estimate: the variances the policy measured or predicted (for ``stats()`` and plots).
        bound: what the policy keeps below tau: its estimate of V_act / V_sgd at the new ratios
            (the pooled prediction for the adaptive policy, the one measurement for the paper's).
    """

    s: float
    act: list[float]
    weight: dict[str, float]
    estimate: Measurement | None = None
    bound: float | None = None


@dataclasses.dataclass(frozen=True)
class Skip:
    """No update: the ratios stay as they are, for ``reason``."""

    reason: str
    estimate: Measurement | None = None


Outcome = Decision | Skip


class CalibrationSource:
    """Where a calibration gets its loss and batches: given at attach or at each call.

    Batches come from an iterator (``next`` is called as needed) or an iterable such as a
    DataLoader, iterated again when exhausted.
    """

    def __init__(self, loss_fn: LossFn | None = None, batches: Iterable[Any] | None = None) -> None:
        self.loss_fn = loss_fn
        self.batches = batches
        self.first_batch: Any = None  # the first batch handed out (the FLOPs are measured on it)
        self._iterator: tuple[Iterable[Any], Iterator[Any]] | None = None

    def offer(self, loss_fn: LossFn | None, batches: Iterable[Any] | None) -> None:
        """Take the loss and batches given to this call, where given."""
        if loss_fn is not None:
            self.loss_fn = loss_fn
        if batches is not None:
            self.batches = batches

    @property
    def complete(self) -> bool:
        return self.loss_fn is not None and self.batches is not None

    def require(self, why: str) -> None:
        if not self.complete:
            raise ConfigError(
                f"{why}: pass controller.maybe_calibrate(loss_fn, batches) (loss_fn(batch) -> "
                "scalar training loss; batches: an iterable such as a DataLoader, other than the "
                "training iterator), or give both at attach: vcas.attach(model, cfg, "
                "loss_fn=..., calibration_data=...)")

    def loss(self, batch: Any) -> torch.Tensor:
        assert self.loss_fn is not None
        return self.loss_fn(batch)

    def take(self, count: int) -> list[Any]:
        return [self.next_batch() for _ in range(count)]

    def next_batch(self) -> Any:
        batch = self._next_batch()
        if self.first_batch is None:
            self.first_batch = batch
        return batch

    def _next_batch(self) -> Any:
        batches = self.batches
        if isinstance(batches, Iterator):
            try:
                return next(batches)
            except StopIteration:
                raise ValueError("the calibration batch iterator is exhausted; pass an iterable "
                                 "(e.g. a DataLoader) or an endless iterator") from None
        if batches is None:
            raise ValueError("no calibration batches were given")
        if self._iterator is None or self._iterator[0] is not batches:
            self._iterator = (batches, iter(batches))
        try:
            return next(self._iterator[1])
        except StopIteration:
            self._iterator = (batches, iter(batches))
            try:
                return next(self._iterator[1])
            except StopIteration:
                raise ValueError("the calibration batch source is empty") from None


Merge = Callable[[Any], Any]
"""Gathers a statistics object from every data-parallel rank and merges it (identity alone)."""


class Policy(Protocol):
    """Decides the keep ratios from calibrations.

    Attributes:
        name: ``"paper"`` or ``"adaptive"`` (``VCASConfig.controller``, resolved).
        needs_batches: whether its calibrations run on batches of their own.
        s: the kept gradient-norm share of the activation keep ratios in use.
    """

    name: ClassVar[str]
    needs_batches: ClassVar[bool]
    s: float

    def start(self, mechanism: Mechanism) -> None:
        """Attached (or restored): prepare the coming training steps."""

    def on_step(self, step: int, mechanism: Mechanism, source: CalibrationSource,
                merge: Merge) -> Outcome | None:
        """Optimizer step ``step`` is done: calibrate and decide if due (None: nothing due)."""

    def calibrate(self, step: int, mechanism: Mechanism, source: CalibrationSource,
                  batches: Sequence[Any], merge: Merge) -> Outcome:
        """Calibrate now on ``batches`` (after optimizer step ``step``) and decide."""

    def pause(self, mechanism: Mechanism) -> None:
        """Ratios are set by hand: stop whatever the coming steps would record."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
