"""Framework integrations, one module per framework, each imported only when used.

- :mod:`vcas.integrations.hf`: ``VCASCallback`` for the Hugging Face ``Trainer``.
- :mod:`vcas.integrations.lightning`: ``VCASCallback`` for Lightning.
- A plain loop, DDP and accelerate need no callback: ``vcas.attach(model, cfg, optimizer=opt)``
  counts the optimizer's real steps through its step hook (gradient accumulation and steps a
  grad scaler skips included, also through accelerate's wrapped optimizer), looks through a
  DistributedDataParallel wrapper and keeps every rank's controller identical (see
  :mod:`vcas.control.distributed`).

Both callbacks attach that way with the framework's optimizer, and otherwise only log and
checkpoint. The framework-free helpers they share live in :mod:`vcas.integrations.common`.
"""

from .common import CalibrationBatches, calibration_batches, metrics

__all__ = ["CalibrationBatches", "calibration_batches", "metrics"]
