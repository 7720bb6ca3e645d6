"""VCAS for Lightning: a Callback that uses the LightningModule's own ``training_step``.

    from vcas.integrations.lightning import VCASCallback

    trainer = L.Trainer(callbacks=[VCASCallback(vcas.VCASConfig(update_every=50))], ...)
    trainer.fit(module, train_loader)

When training starts (``on_train_start``, after the strategy has set up the module and its
optimizers) the callback attaches with the optimizer that trains the sampled layers,
``vcas.attach(module, config, optimizer=...)``: the controller counts that optimizer's real
steps itself, so ``accumulate_grad_batches`` counts optimizer steps, not micro-batches, and steps
the fp16 grad scaler skips (inf/NaN gradients) are not counted. Otherwise it only logs
:func:`~vcas.integrations.metrics` with ``pl_module.log_dict`` once per optimizer step, and
saves the controller's state (with the position of the default calibration stream) in Lightning
checkpoints: ``trainer.fit(module, ckpt_path=...)`` resumes it exactly.

DeepSpeed and FSDP1 strategies (``DeepSpeedStrategy``, ``FSDPStrategy``) are refused in
``setup``, before the strategy wraps the module; FSDP2 through ``ModelParallelStrategy`` is
accepted. Under the DDP strategy every rank runs the callback; the controllers stay identical
(see :mod:`vcas.control.distributed`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import lightning.pytorch as pl
import torch

from ..config import VCASConfig
from ..control import distributed
from ..control.controller import Controller, attach
from ..errors import AttachError, ConfigError
from ..plan.wrappers import deepspeed_message, fsdp1_message
from .common import calibration_batches, loader_batch_size, metrics, restore_stream, stream_state

__all__ = ["VCASCallback", "check_strategy"]


class VCASCallback(pl.Callback):
    """Attach VCAS to the LightningModule and adapt its keep ratios during ``trainer.fit``.

    Args:
        config: the :class:`~vcas.VCASConfig` (its defaults if ``None``).
        loss_fn: ``loss_fn(pl_module, batch) -> scalar loss`` for calibration passes (the
            paper's controller) and the one FLOPs measurement; default: the module's
            ``training_step`` (its ``self.log`` calls are silenced), run in the precision
            plugin's autocast context like training. Required with manual optimization, whose
            ``training_step`` does not return the loss.
        calibration_data: an iterable of batches to calibrate on; default: an endless shuffled
            stream from the training DataLoader's dataset and collate function
            (:class:`~vcas.integrations.common.CalibrationBatches`), so the training batch order
            is unchanged. Its position is checkpointed (as is that of any source with
            ``state_dict()`` / ``load_state_dict()``).
        **attach_options: keyword options of :func:`vcas.attach` (``blocks``, ``include``, ...);
            not ``optimizer``, ``loss_fn`` or ``calibration_data``, which the callback passes.

    The adaptive controller calibrates on the training steps themselves and uses the loss and
    batches only to measure the FLOPs of the rest of the model once; without them the FLOPs
    reductions cover the sampled layers only (``stats()["flops_scope"] == "sampled_layers"``).
    The paper's controller calibrates on batches of its own, every ``update_every`` steps.

    The controller is ``callback.controller`` (``None`` before training starts).
    """

    def __init__(self, config: VCASConfig | None = None, *,
                 loss_fn: Callable[[pl.LightningModule, Any], torch.Tensor] | None = None,
                 calibration_data: Iterable[Any] | None = None, **attach_options: Any) -> None:
        taken = sorted({"optimizer", "loss_fn", "calibration_data"} & set(attach_options))
        if taken:
            raise TypeError(f"VCASCallback passes {', '.join(taken)} to vcas.attach itself (the "
                            "module's optimizer; VCASCallback(loss_fn=..., calibration_data=...)); "
                            f"remove {', '.join(taken)} from its keyword options")
        self.config = config if config is not None else VCASConfig()
        self.attach_options = attach_options
        self.loss_fn = loss_fn
        self.calibration_data = calibration_data
        self.controller: Controller | None = None
        self._trainer: pl.Trainer | None = None
        self._batches: Iterable[Any] | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_step = 0

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # the callback acts in fit only
            check_strategy(trainer.strategy)  # before the strategy wraps or shards the module

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        if self.controller is not None and self.controller.model is not pl_module:
            self.controller.detach()  # fitting another module with the same callback
            self.controller = None
        if self.controller is None:
            if self._batches is None:
                self._batches = self.calibration_data if self.calibration_data is not None \
                    else _default_batches(trainer, self.config)
            self.controller = attach(pl_module, self.config, loss_fn=self._loss,
                                     calibration_data=self._batches, **self.attach_options)
            try:
                self.controller.hook_optimizer(_training_optimizer(trainer, self.controller))
            except Exception:
                self.controller.detach()  # leave the module as it was
                self.controller = None
                raise
        else:
            self.controller.hook_optimizer(_training_optimizer(trainer, self.controller))
        if self._pending_state is not None:
            self.controller.load_state_dict(self._pending_state["controller"])
            restore_stream(self._batches, self._pending_state.get("calibration"))
            self._pending_state = None
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.controller is None or trainer.global_step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation)
        self._last_step = trainer.global_step
        pl_module.log_dict(metrics(self.controller), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return {}
        return {"controller": self.controller.state_dict(), "calibration": stream_state(self._batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before training starts: kept until the controller exists.
        if "controller" not in state_dict:
            return
        if self.controller is not None:
            self.controller.load_state_dict(state_dict["controller"])
            restore_stream(self._batches, state_dict.get("calibration"))
        else:
            self._pending_state = state_dict

    # ------------------------------------------------------------------ internals
    def _loss(self, batch: Any) -> torch.Tensor:
        # Called by the controller, attached in on_train_start after the trainer is kept.
        trainer = cast(pl.Trainer, self._trainer)
        pl_module = cast(pl.LightningModule, cast(Controller, self.controller).model)
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


def check_strategy(strategy: Any) -> None:
    """Refuse Lightning strategies that use DeepSpeed or FSDP1.

    Raises:
        AttachError: with the reason and what to use instead (``ModelParallelStrategy`` for FSDP2).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        raise AttachError(deepspeed_message(f"the Lightning strategy {type(strategy).__name__}"))
    if isinstance(strategy, FSDPStrategy):
        raise AttachError(fsdp1_message(f"the Lightning strategy {type(strategy).__name__}"))


def _training_optimizer(trainer: pl.Trainer, controller: Controller) -> torch.optim.Optimizer:
    """The one optimizer that updates the weights the controller samples."""
    optimizers = list(trainer.strategy.optimizers)
    sampled = {id(p) for p in controller.measured_parameters.values()}
    holding = [opt for opt in optimizers
               if any(id(p) in sampled for group in opt.param_groups for p in group["params"])]
    if len(holding) == 1:
        return holding[0]
    if not holding:
        raise ConfigError("VCASCallback counts the steps of the optimizer that trains the sampled "
                          "layers, and no optimizer from configure_optimizers holds their weights")
    raise ConfigError(
        f"VCASCallback counts the steps of the optimizer that trains the sampled layers, and "
        f"{len(holding)} optimizers hold their weights; attach in your LightningModule instead: "
        "controller = vcas.attach(self, cfg, optimizer=<the one whose steps count>) in on_train_start")


def _call_training_step(pl_module: pl.LightningModule, batch: Any) -> Any:
    takes_index = len(inspect.signature(pl_module.training_step).parameters) >= 2
    return pl_module.training_step(batch, 0) if takes_index else pl_module.training_step(batch)


@contextlib.contextmanager
def _logging_silenced(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside: calibration losses are not training
    metrics. Instance attributes shadow the methods and are deleted again on exit."""
    def silent(*args: Any, **kwargs: Any) -> None:
        return None

    # Instance attributes shadowing methods on purpose, which mypy refuses as method assignment.
    pl_module.log, pl_module.log_dict = silent, silent  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


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
