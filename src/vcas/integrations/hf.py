"""VCAS for the Hugging Face ``Trainer``: a callback, no Trainer subclass.

    from vcas.integrations.hf import VCASCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    VCASCallback(vcas.VCASConfig(update_every=50)).add_to(trainer)
    trainer.train()

When training starts (``on_train_begin``) the callback attaches with the Trainer's optimizer,
``vcas.attach(model, config, optimizer=...)``: the controller counts the optimizer's real steps
itself, so gradient accumulation counts optimizer steps, not micro-batches, and steps the fp16
grad scaler skips (inf/NaN gradients) are not counted. Otherwise it only logs and checkpoints:

- it adds :func:`~vcas.integrations.metrics` to the Trainer's training logs (``on_log``).
  ``add_to(trainer)`` puts it ahead of the reporting callbacks (TensorBoard, W&B), so they get
  the metrics; given in ``Trainer(callbacks=[...])`` it runs after them (callbacks get no handle
  on the Trainer to move themselves), and it warns once when ``report_to`` names reporters;
- each Trainer checkpoint gets the controller's state, one file per process
  (``vcas_state_{process_index}.pth``, next to the Trainer's ``rng_state_*.pth``, written in
  ``on_save`` to ``{output_dir}/checkpoint-{global_step}``), with the position of the default
  calibration stream;
- ``trainer.train(resume_from_checkpoint=...)`` restores it. Callbacks are not told the path
  they resume from; what they see is the Trainer state, which the Trainer has restored from the
  checkpoint before ``on_train_begin`` (``state.global_step > 0``). The callback takes the first
  of ``args.resume_from_checkpoint`` and ``{output_dir}/checkpoint-{global_step}`` whose
  ``trainer_state.json`` holds this very state (the same global step and log history), so a
  checkpoint of another run is never taken for this one. A resumed run then logs and trains
  exactly as the uninterrupted one. Resuming from a folder outside ``output_dir`` needs
  ``TrainingArguments(resume_from_checkpoint=<that folder>)`` as well.

DeepSpeed and FSDP1 (in the TrainingArguments or the accelerate launch configuration) are
refused with the reason; FSDP2 (``fsdp_config={"version": 2}``, the default version of
transformers 5) is accepted. Under DDP (``torchrun``/``accelerate launch``) every rank runs the
callback; the controllers stay identical (see :mod:`vcas.control.distributed`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import nn
from transformers import TrainerCallback

from ..config import VCASConfig
from ..control import distributed
from ..control.controller import Controller, attach
from ..errors import AttachError, ConfigError, StateDictError
from ..plan.wrappers import deepspeed_message, fsdp1_message
from .common import calibration_batches, metrics, restore_stream, stream_state, to_device

__all__ = ["STATE_FILE", "VCASCallback", "check_training_arguments"]

STATE_FILE = "vcas_state_{rank}.pth"
"""The controller state's file name in a checkpoint folder, per process index."""

_TRAINER_STATE = "trainer_state.json"  # what transformers.Trainer names its state file


class VCASCallback(TrainerCallback):
    """Attach VCAS to the Trainer's model and adapt its keep ratios during ``trainer.train()``.

    Args:
        config: the :class:`~vcas.VCASConfig` (its defaults if ``None``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for calibration passes (the paper's
            controller) and the one FLOPs measurement; default ``model(**batch).loss``, the loss
            of a transformers model given ``labels``. Pass your own when the Trainer computes
            its loss differently (``compute_loss_func``, label smoothing, a ``compute_loss``
            override).
        calibration_data: an iterable of batches to calibrate on; default: an endless shuffled
            stream drawn from the training dataset with the Trainer's collator
            (:class:`~vcas.integrations.common.CalibrationBatches`), so the Trainer's training
            batch order is unchanged. Its position is checkpointed (as is that of any source with
            ``state_dict()`` / ``load_state_dict()``).
        **attach_options: keyword options of :func:`vcas.attach` (``blocks``, ``include``, ...);
            not ``optimizer``, ``loss_fn`` or ``calibration_data``, which the callback passes.

    The adaptive controller calibrates on the training steps themselves and uses the loss and
    batches only to measure the FLOPs of the rest of the model once; when the loss cannot be
    computed there, the FLOPs reductions cover the sampled layers only
    (``stats()["flops_scope"] == "sampled_layers"``). The paper's controller calibrates on
    batches of its own, every ``update_every`` optimizer steps.

    The controller is ``callback.controller`` (``None`` before training starts).
    """

    def __init__(self, config: VCASConfig | None = None, *,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 calibration_data: Iterable[Any] | None = None, **attach_options: Any) -> None:
        taken = sorted({"optimizer", "loss_fn", "calibration_data"} & set(attach_options))
        if taken:
            raise TypeError(f"VCASCallback passes {', '.join(taken)} to vcas.attach itself (the Trainer's "
                            "optimizer; VCASCallback(loss_fn=..., calibration_data=...)); remove "
                            f"{', '.join(taken)} from its keyword options")
        self.config = config if config is not None else VCASConfig()
        self.attach_options = attach_options
        self.loss_fn = loss_fn if loss_fn is not None else _model_loss
        self.calibration_data = calibration_data
        self.controller: Controller | None = None
        self._model: nn.Module | None = None
        self._batches: Iterable[Any] | None = None
        self._placed = False  # add_to put it ahead of the reporters
        self._warned_reporters = False

    def add_to(self, trainer: Any) -> VCASCallback:
        """Add this callback to ``trainer`` ahead of its reporting callbacks.

        The Trainer runs ``callbacks=[...]`` after its reporters (TensorBoard, W&B, the console),
        so metrics added to the logs there would not reach them; inserted first, they do.

        Raises:
            AttachError: the Trainer's arguments use DeepSpeed or FSDP1.
        """
        check_training_arguments(trainer.args)
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        self._placed = True
        return self

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        check_training_arguments(args)  # Trainer(callbacks=[...]): refuse before any training

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        check_training_arguments(args)
        if model is None or optimizer is None:
            raise ValueError("VCASCallback needs the Trainer's model and optimizer; transformers.Trainer "
                             "passes them to callbacks when training begins")
        self._warn_if_behind_reporters(args)
        if self.controller is not None and self._model is not model:
            self.controller.detach()  # the Trainer built a new model (model_init)
            self.controller = None
        if self.controller is None:
            if self._batches is None:
                self._batches = self.calibration_data if self.calibration_data is not None \
                    else self._default_batches(args, train_dataloader)
            self._model = model
            self.controller = attach(model, self.config, optimizer=optimizer, loss_fn=self._loss,
                                     calibration_data=self._batches, **self.attach_options)
        else:
            self.controller.hook_optimizer(optimizer)  # train() again: the Trainer's optimizer now
        if state.global_step > 0:
            self._resume(args, state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if self.controller is None or logs is None or "loss" not in logs:
            return  # only training logs (not eval or the end-of-training summary)
        values = metrics(self.controller)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the Trainer stored a copy before callbacks ran

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.controller is None:
            return
        folder = checkpoint_folder(args, state.global_step)
        os.makedirs(folder, exist_ok=True)  # as the Trainer's own per-process rng_state files
        saved = {"controller": self.controller.state_dict(), "calibration": stream_state(self._batches)}
        torch.save(saved, os.path.join(folder, STATE_FILE.format(rank=args.process_index)))

    # ------------------------------------------------------------------ internals
    def _resume(self, args: Any, state: Any) -> None:
        """Restore the controller saved in the checkpoint this training resumes from."""
        folder = _resumed_folder(args, state)
        path = os.path.join(folder, STATE_FILE.format(rank=args.process_index))
        if not os.path.isfile(path):
            saved = sorted(name for name in os.listdir(folder) if name.startswith("vcas_state_"))
            if saved:
                raise StateDictError(
                    f"{folder} holds the vcas states {saved}, none for process {args.process_index}: "
                    "resume with the number of processes that saved it")
            warnings.warn(f"VCASCallback: {folder} holds no vcas state (it was saved without "
                          f"VCASCallback); the controller starts afresh at step {state.global_step}",
                          stacklevel=2)
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        controller = cast(Controller, self.controller)  # on_train_begin attaches before resuming
        controller.load_state_dict(saved["controller"])
        restore_stream(self._batches, saved.get("calibration"))

    def _warn_if_behind_reporters(self, args: Any) -> None:
        reporters = list(getattr(args, "report_to", None) or [])
        if self._placed or not reporters or self._warned_reporters:
            return
        self._warned_reporters = True
        warnings.warn(
            f"VCASCallback was given to Trainer(callbacks=[...]), which runs it after the reporting "
            f"callbacks of report_to={reporters}: they do not get the vcas/... metrics (the logs "
            "and trainer.state.log_history do). Add it with VCASCallback(...).add_to(trainer) "
            "instead, which puts it ahead of them", stacklevel=2)

    def _loss(self, batch: Any) -> torch.Tensor:
        model = cast(nn.Module, self._model)  # set before attach, which takes this loss
        device = next(model.parameters()).device
        return self.loss_fn(model, to_device(batch, device))

    def _default_batches(self, args: Any, train_dataloader: Any) -> Iterable[Any]:
        if train_dataloader is None:
            raise ValueError("the Trainer has no train dataloader to calibrate on; pass "
                             "VCASCallback(calibration_data=...)")
        seed = (self.config.seed if self.config.seed is not None else args.seed) + 7919 * distributed.rank()
        return calibration_batches(train_dataloader, args.per_device_train_batch_size, seed)


def checkpoint_folder(args: Any, global_step: int) -> str:
    """The Trainer's checkpoint folder for ``global_step``, outside hyperparameter search."""
    return os.path.join(args.output_dir, f"checkpoint-{global_step}")


def _resumed_folder(args: Any, state: Any) -> str:
    """The checkpoint folder whose Trainer state the Trainer restored into ``state``."""
    candidates = []
    if isinstance(getattr(args, "resume_from_checkpoint", None), str):
        candidates.append(args.resume_from_checkpoint)
    candidates.append(checkpoint_folder(args, state.global_step))
    for folder in candidates:
        try:
            with open(os.path.join(folder, _TRAINER_STATE), encoding="utf-8") as file:
                saved = json.load(file)
        except (OSError, ValueError):
            continue
        if saved.get("global_step") == state.global_step and saved.get("log_history") == state.log_history:
            return folder
    raise ConfigError(
        f"VCASCallback: training resumes from a checkpoint at step {state.global_step}, but none of "
        f"{candidates} holds that Trainer state, so the controller's state cannot be found. When "
        "the checkpoint is outside output_dir, give its folder as TrainingArguments("
        "resume_from_checkpoint=...) too")


def check_training_arguments(args: Any) -> None:
    """Refuse Trainer arguments (or an accelerate launch configuration) that use DeepSpeed or FSDP1.

    Raises:
        AttachError: with the reason and what to use instead.
    """
    if getattr(args, "deepspeed", None):
        raise AttachError(deepspeed_message("TrainingArguments(deepspeed=...)"))
    if getattr(args, "deepspeed_plugin", None) is not None or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise AttachError(deepspeed_message("the accelerate configuration (ACCELERATE_USE_DEEPSPEED=true)"))
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args:  # transformers 5 resolves fsdp / fsdp_config into these
        version = int(plugin_args.get("fsdp_version", 1))
        where = f"TrainingArguments(fsdp_config={{'version': {version}}})"
    elif getattr(args, "fsdp", None):  # transformers 4: fsdp options, and FSDP1 unless the config says 2
        config = getattr(args, "fsdp_config", None) or {}
        version = int(config.get("version", config.get("fsdp_version", 1)))
        where = f"TrainingArguments(fsdp=...) with FSDP version {version}"
    elif _env_flag("ACCELERATE_USE_FSDP"):  # accelerate launch --use_fsdp; accelerate's default is 1
        version = int(os.environ.get("FSDP_VERSION", "1"))
        where = f"the accelerate configuration (ACCELERATE_USE_FSDP=true, FSDP_VERSION={version})"
    else:
        return
    if version != 2:
        raise AttachError(fsdp1_message(where))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(f"the default calibration loss calls model(**batch).loss, but a batch is a "
                        f"{type(batch).__name__}; pass VCASCallback(loss_fn=lambda model, batch: ...)")
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("model(**batch).loss is None: the batches carry no labels; pass "
                         "VCASCallback(loss_fn=lambda model, batch: ...) to compute the loss")
    return loss
