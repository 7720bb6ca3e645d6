"""VCAS for the Hugging Face ``Trainer``: a callback, no Trainer subclass.

    from vcas.integrations.hf import VCASCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    VCASCallback(vcas.VCASConfig(update_every=50)).add_to(trainer)
    trainer.train()

The callback only delegates to the methods a plain loop calls: it attaches at the start of
training, calls ``maybe_calibrate`` once per optimizer step (``on_step_end``, so gradient
accumulation counts optimizer steps, not micro-batches) and adds :func:`~vcas.integrations.metrics`
to the Trainer's training logs. Under DDP (``torchrun``/``accelerate launch``) every rank runs it;
the controllers stay identical (see :mod:`vcas.control.distributed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers import TrainerCallback

from ..control import distributed
from ..config import VCASConfig
from ..control.controller import Controller, attach
from .common import calibration_batches, metrics, to_device

__all__ = ["VCASCallback"]


class VCASCallback(TrainerCallback):
    """Attach VCAS to the Trainer's model and adapt its keep ratios during ``trainer.train()``.

    Args:
        config: the :class:`~vcas.VCASConfig` (its defaults if ``None``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for calibration; default
            ``model(**batch).loss``, the loss of a transformers model given ``labels``. Pass your
            own when the Trainer computes its loss differently (``compute_loss_func``, label
            smoothing, a ``compute_loss`` override).
        calibration_data: an iterable of batches to calibrate on; default: an endless shuffled
            stream drawn from the training dataset with the Trainer's collator through a separate
            DataLoader, so the Trainer's training batch order is unchanged.
        **attach_options: keyword options of :func:`vcas.attach` (``blocks``, ``include``, ...).

    The controller is ``callback.controller`` (``None`` before training starts).
    """

    def __init__(self, config: VCASConfig | None = None, *,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 calibration_data: Iterable[Any] | None = None, **attach_options: Any) -> None:
        self.config = config if config is not None else VCASConfig()
        self.attach_options = attach_options
        self.loss_fn = loss_fn if loss_fn is not None else _model_loss
        self.calibration_data = calibration_data
        self.controller: Controller | None = None
        self._model: nn.Module | None = None
        self._batches: Iterable[Any] | None = None

    def add_to(self, trainer: Any) -> "VCASCallback":
        """Add this callback to ``trainer`` ahead of its reporting callbacks.

        The Trainer runs ``callbacks=[...]`` after its reporters (TensorBoard, W&B, the console),
        so metrics added to the logs there would not reach them; inserted first, they do.
        """
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        return self

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("VCASCallback needs the Trainer's model; it is passed to callbacks "
                             "by transformers.Trainer")
        if self.controller is None or self._model is not model:
            if self.controller is not None:
                self.controller.detach()  # the Trainer built a new model (model_init)
            self.controller = attach(model, self.config, **self.attach_options)
            self._model = model
        if self._batches is None:
            self._batches = self.calibration_data if self.calibration_data is not None \
                else self._default_batches(args, train_dataloader)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                    **kwargs: Any) -> None:
        if self.controller is None:
            return
        if getattr(optimizer, "step_was_skipped", False):
            return  # fp16: the grad scaler skipped this step for inf/NaN; it is not a step
        self.controller.maybe_calibrate(self._loss, self._batches)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if self.controller is None or logs is None or "loss" not in logs:
            return  # only training logs (not eval or the end-of-training summary)
        values = metrics(self.controller)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the Trainer stored a copy before callbacks ran

    # ------------------------------------------------------------------ internals
    def _loss(self, batch: Any) -> torch.Tensor:
        device = next(self._model.parameters()).device
        return self.loss_fn(self._model, to_device(batch, device))

    def _default_batches(self, args: Any, train_dataloader: Any) -> Iterable[Any]:
        if train_dataloader is None:
            raise ValueError("the Trainer has no train dataloader to calibrate on; pass "
                             "VCASCallback(calibration_data=...)")
        seed = (self.config.seed if self.config.seed is not None else args.seed) + 7919 * distributed.rank()
        return calibration_batches(train_dataloader, args.per_device_train_batch_size, seed)


def _model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(f"the default calibration loss calls model(**batch).loss, but a batch is a "
                        f"{type(batch).__name__}; pass VCASCallback(loss_fn=lambda model, batch: ...)")
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("model(**batch).loss is None: the batches carry no labels; pass "
                         "VCASCallback(loss_fn=lambda model, batch: ...) to compute the loss")
    return loss
