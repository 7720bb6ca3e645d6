"""VCAS for Lightning: a Callback that uses the LightningModule's own ``training_step``.

    from vcas.integrations.lightning import VCASCallback

    trainer = L.Trainer(callbacks=[VCASCallback(vcas.VCASConfig(update_every=50))], ...)
    trainer.fit(module, train_loader)

The callback only delegates to the methods a plain loop calls: it attaches when fitting starts,
calls ``maybe_calibrate`` once per optimizer step (so ``accumulate_grad_batches`` counts optimizer
steps, not micro-batches), logs :func:`~vcas.integrations.metrics` with ``pl_module.log_dict``,
and saves the controller in Lightning checkpoints. Under the DDP strategy every rank runs it; the
controllers stay identical (see :mod:`vcas.control.distributed`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import lightning.pytorch as pl
import torch

from ..control import distributed
from ..config import VCASConfig
from ..control.controller import Controller, attach
from .common import calibration_batches, loader_batch_size, metrics

__all__ = ["VCASCallback"]


class VCASCallback(pl.Callback):
    """Attach VCAS to the LightningModule and adapt its keep ratios during ``trainer.fit``.

    Args:
        config: the :class:`~vcas.VCASConfig` (its defaults if ``None``).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar loss`` for calibration; default: the
            module's ``training_step`` (its ``self.log`` calls are silenced during calibration),
            run in the precision plugin's autocast context like training. Required with manual
            optimization, whose ``training_step`` does not return the loss.
        calibration_data: an iterable of batches to calibrate on; default: an endless shuffled
            stream from the training DataLoader's dataset and collate function through a separate
            DataLoader, so the training batch order is unchanged.
        **attach_options: keyword options of :func:`vcas.attach` (``blocks``, ``include``, ...).

    The controller is ``callback.controller`` (``None`` before fitting starts).
    """

    def __init__(self, config: VCASConfig | None = None, *,
                 loss_fn: Callable[[pl.LightningModule, Any], torch.Tensor] | None = None,
                 calibration_data: Iterable[Any] | None = None, **attach_options: Any) -> None:
        self.config = config if config is not None else VCASConfig()
        self.attach_options = attach_options
        self.loss_fn = loss_fn
        self.calibration_data = calibration_data
        self.controller: Controller | None = None
        self._pending_state: dict[str, Any] | None = None
        self._batches: Iterable[Any] | None = None
        self._last_step = 0
        self._scale_before_step: float | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the strategy's wrapping: attach to the module itself.
        if self.controller is not None and self.controller.model is not pl_module:
            self.controller.detach()  # fitting another module with the same callback
            self.controller = None
        if self.controller is None:
            self.controller = attach(pl_module, self.config, **self.attach_options)
        if self._pending_state is not None:
            self.controller.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        if self._batches is None:
            self._batches = self.calibration_data if self.calibration_data is not None \
                else _default_batches(trainer, self.config)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        scaler = _grad_scaler(trainer)
        self._scale_before_step = scaler.get_scale() if scaler is not None else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.controller is None or trainer.global_step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        if self._step_was_skipped(trainer):
            return  # fp16: the grad scaler skipped this step for inf/NaN; it is not a step
        self.controller.maybe_calibrate(lambda b: self._loss(trainer, pl_module, b), self._batches)
        pl_module.log_dict(metrics(self.controller), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()} if self.controller is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start attaches: keep it until then.
        if "controller" in state_dict:
            if self.controller is not None:
                self.controller.load_state_dict(state_dict["controller"])
            else:
                self._pending_state = state_dict["controller"]

    # ------------------------------------------------------------------ internals
    def _step_was_skipped(self, trainer: pl.Trainer) -> bool:
        scaler = _grad_scaler(trainer)
        before, self._scale_before_step = self._scale_before_step, None
        # GradScaler.update lowers the scale exactly when it found inf/NaN and skipped the step.
        return scaler is not None and before is not None and scaler.get_scale() < before

    def _loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> torch.Tensor:
        batch = trainer.strategy.batch_to_device(batch)
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        with trainer.precision_plugin.train_step_context(), _logging_silenced(pl_module):
            output = _call_training_step(pl_module, batch)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, torch.Tensor):
            raise ValueError(
                "training_step returned no loss to calibrate on (manual optimization, or a step "
                "that returns None); pass VCASCallback(loss_fn=lambda module, batch: ...)")
        return loss


def _call_training_step(pl_module: pl.LightningModule, batch: Any) -> Any:
    takes_index = len(inspect.signature(pl_module.training_step).parameters) >= 2
    return pl_module.training_step(batch, 0) if takes_index else pl_module.training_step(batch)


@contextlib.contextmanager
def _logging_silenced(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside: calibration losses are not training
    metrics. Instance attributes shadow the methods and are deleted again on exit."""
    def silent(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.log, pl_module.log_dict = silent, silent
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def _grad_scaler(trainer: pl.Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


def _default_batches(trainer: pl.Trainer, config: VCASConfig) -> Iterable[Any]:
    loader = trainer.train_dataloader
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise ValueError(
            f"the training data is a {type(loader).__name__}, not one DataLoader; pass "
            "VCASCallback(calibration_data=...) with batches to calibrate on")
    batch_size = loader_batch_size(loader)
    if batch_size is None:
        raise ValueError("cannot tell the training batch size; pass VCASCallback(calibration_data=...)")
    seed = (config.seed if config.seed is not None else torch.initial_seed() % (2**31)) \
        + 7919 * distributed.rank()
    return calibration_batches(loader, batch_size, seed)
