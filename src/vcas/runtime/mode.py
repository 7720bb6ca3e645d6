"""What the installed ops do in the passes that run now: one frozen value.

A :class:`Mode` never changes; the runtime holds the current one and replaces it whole
(``Runtime.using(...)`` for a scope, ``Runtime.set_base_mode`` for the coming training steps).
An unknown field name is a ``TypeError``, not a silently created attribute.
"""

from __future__ import annotations

import dataclasses

TRAIN = "train"
CALIBRATION = "calibration"


@dataclasses.dataclass(frozen=True)
class Mode:
    """What the sampled ops do.

    Attributes:
        enabled: False while paused or detached: every hook and op behaves as plain PyTorch.
        sample_acts: apply activation sampling (SampleA) at block outputs.
        sample_weights: apply weight-gradient sampling (SampleW) in linear layers.
        record_norms: block samplers record their per-sample gradient norms (the paper's
            calibration, exact pass).
        record_row_scores: linears whose weight gradient may be sampled record their SampleW row
            scores, from which the analytic SampleW variance follows at any ratio.
        record_samples: sampled layers record per-sample weight-gradient statistics on their
            probe slices (the adaptive controller's calibration steps).
        phase: the FLOPs bucket work goes to: ``"train"`` or ``"calibration"``.
    """

    enabled: bool = True
    sample_acts: bool = True
    sample_weights: bool = True
    record_norms: bool = False
    record_row_scores: bool = False
    record_samples: bool = False
    phase: str = TRAIN

    def __post_init__(self) -> None:
        if self.phase not in (TRAIN, CALIBRATION):
            raise ValueError(f"Mode.phase={self.phase!r}: use {TRAIN!r} or {CALIBRATION!r}")

    @property
    def recording(self) -> bool:
        return self.record_norms or self.record_row_scores or self.record_samples

    def replace(self, **changes: object) -> Mode:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


SAMPLING = Mode()
"""Training steps: both samplers on, nothing recorded."""

EXACT = Mode(sample_acts=False, sample_weights=False)
"""An exact backward through the installed ops (zero rows are still skipped)."""

RECORDING_STEP = Mode(sample_acts=False, record_samples=True, record_row_scores=True)
"""An adaptive calibration step: activation gradients propagate exactly (the block samplers'
per-sample norms need them) and the update's records come from them; weight gradients are
sampled at the ratios in force, as on any training step (the records do not use them)."""

PAUSED = Mode(enabled=False)
"""Plain PyTorch: ``Controller.paused()`` and detached controllers."""
