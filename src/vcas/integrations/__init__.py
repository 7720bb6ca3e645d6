"""Framework integrations, one module per framework, each imported only when used.

- :mod:`vcas.integrations.hf`: ``VCASCallback`` for the Hugging Face ``Trainer``.
- :mod:`vcas.integrations.lightning`: ``VCASCallback`` for Lightning.
- DDP and accelerate need no callback: ``vcas.attach`` looks through a DistributedDataParallel
  wrapper and keeps every rank's controller identical (see :mod:`vcas.control.distributed`).

The framework-free helpers shared by the callbacks live in :mod:`vcas.integrations.common`.
"""

from .common import calibration_batches, metrics

__all__ = ["calibration_batches", "metrics"]
