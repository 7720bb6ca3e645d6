"""FLOPs accounting of what the sampled layers really did, against two references.

Every sampled op counts, per call, the products it ran (``done``) and what exact training would
have run: ``exact`` (stock PyTorch: every row, dense) and ``nonzero`` (an exact backward that
skips the rows whose incoming gradient is exactly zero without any sampling, such as all tokens
but the first in the top block of a [CLS] classifier). Skipping such rows is a real saving vcas
gives, but not one sampling made: ``sampling_*`` reductions are measured against ``nonzero``,
the plain reductions against ``exact``.

Work outside the sampled layers (attention products, embeddings, heads) is measured once with
``torch.utils.flop_counter`` as a multiple of the sampled layers' work and counted as exact,
except inside compactly recomputed blocks, which count their own (``recompute_other_*``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .runtime.mode import CALIBRATION

_FIELDS = ("forward", "backward_exact", "backward_nonzero", "backward_done",
           "recompute_other_exact", "recompute_other_done")


@dataclasses.dataclass
class FlopBucket:
    """FLOPs of one phase (training or calibration).

    Attributes:
        forward: forward products of the sampled layers.
        backward_exact: their backward products in stock PyTorch (every row).
        backward_nonzero: the same, skipping rows whose gradient is zero without sampling.
        backward_done: the backward products really run.
        recompute_other_exact: work outside the sampled layers that compactly recomputed blocks
            would have done in an exact backward.
        recompute_other_done: what they did instead (their re-run forward and backward on the
            kept samples).
    """

    forward: float = 0.0
    backward_exact: float = 0.0
    backward_nonzero: float = 0.0
    backward_done: float = 0.0
    recompute_other_exact: float = 0.0
    recompute_other_done: float = 0.0

    def add(self, other: FlopBucket, scale: float = 1.0) -> None:
        for name in _FIELDS:
            setattr(self, name, getattr(self, name) + scale * getattr(other, name))

    def settle(self) -> None:
        """Read counts the sync-free path kept on the device (0-dim tensors) as numbers."""
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, float):
                setattr(self, name, float(value))

    def scaled(self, factor: float) -> FlopBucket:
        out = FlopBucket()
        out.add(self, factor)
        return out


@dataclasses.dataclass(frozen=True)
class OtherWork:
    """Work outside the sampled layers per FLOP of the sampled layers (measured once).

    Attributes:
        forward: the model's other forward FLOPs per sampled-layer forward FLOP.
        backward: the model's other backward FLOPs per sampled-layer exact backward FLOP.
        blocks: per block name, the same two ratios for the work inside that block only (used
            by compactly recomputed blocks, which do that work on the kept samples only).
    """

    forward: float
    backward: float
    blocks: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FlopTally:
    """Running FLOPs per phase, plus the model's other work once measured (``scope``)."""

    train: FlopBucket = dataclasses.field(default_factory=FlopBucket)
    calibration: FlopBucket = dataclasses.field(default_factory=FlopBucket)
    other: OtherWork | None = None

    def bucket(self, phase: str) -> FlopBucket:
        return self.calibration if phase == CALIBRATION else self.train

    def settle(self) -> FlopTally:
        """The tally with every count read as a number (see :meth:`FlopBucket.settle`)."""
        self.train.settle()
        self.calibration.settle()
        return self

    @property
    def scope(self) -> str:
        """``"model"`` once the other work is measured, else ``"sampled_layers"``."""
        return "sampled_layers" if self.other is None else "model"

    # ------------------------------------------------------------------ totals
    def _other_forward(self, bucket: FlopBucket) -> float:
        return 0.0 if self.other is None else bucket.forward * self.other.forward

    def _other_backward_exact(self, bucket: FlopBucket) -> float:
        return 0.0 if self.other is None else bucket.backward_exact * self.other.backward

    def _other_backward_done(self, bucket: FlopBucket) -> float:
        if self.other is None:
            return 0.0
        return (self._other_backward_exact(bucket) - bucket.recompute_other_exact
                + bucket.recompute_other_done)

    def exact_training_flops(self) -> float:
        """What stock PyTorch would have spent on the training steps."""
        t = self.settle().train
        return t.forward + t.backward_exact + self._other_forward(t) + self._other_backward_exact(t)

    def nonzero_training_flops(self) -> float:
        """What exact training that skips exactly-zero rows would have spent."""
        t = self.settle().train
        return t.forward + t.backward_nonzero + self._other_forward(t) + self._other_backward_exact(t)

    def spent_flops(self) -> float:
        """Everything spent: training steps and calibration passes."""
        self.settle()
        return sum(b.forward + b.backward_done + self._other_forward(b) + self._other_backward_done(b)
                   for b in (self.train, self.calibration))

    def backward_spent(self) -> float:
        t = self.settle().train
        return t.backward_done + self._other_backward_done(t)

    # ------------------------------------------------------------------ reductions
    def bp_flops_reduction(self) -> float:
        """1 - training backward FLOPs done / stock PyTorch's."""
        self.settle()
        return _reduction(self.backward_spent(), self.train.backward_exact + self._other_backward_exact(self.train))

    def sampling_bp_flops_reduction(self) -> float:
        """1 - training backward FLOPs done / exact backward's that skips zero rows."""
        self.settle()
        return _reduction(self.backward_spent(), self.train.backward_nonzero + self._other_backward_exact(self.train))

    def train_flops_reduction(self) -> float:
        """1 - all FLOPs spent (calibration included) / stock PyTorch's training FLOPs."""
        return _reduction(self.spent_flops(), self.exact_training_flops())

    def sampling_train_flops_reduction(self) -> float:
        """1 - all FLOPs spent / exact training's that skips zero rows."""
        return _reduction(self.spent_flops(), self.nonzero_training_flops())

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        self.settle()
        other = None if self.other is None else {
            "forward": self.other.forward, "backward": self.other.backward,
            "blocks": {name: list(ratios) for name, ratios in self.other.blocks.items()}}
        return {"train": dataclasses.asdict(self.train),
                "calibration": dataclasses.asdict(self.calibration), "other": other}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train = _bucket(state["train"])
        self.calibration = _bucket(state["calibration"])
        other = state.get("other")
        if other is None and state.get("other_forward_per_linear") is not None:  # version 2
            other = {"forward": state["other_forward_per_linear"],
                     "backward": state["other_backward_per_linear"] or 0.0, "blocks": {}}
        self.other = None if other is None else OtherWork(
            float(other["forward"]), float(other["backward"]),
            {name: (float(f), float(b)) for name, (f, b) in other["blocks"].items()})


def _bucket(values: dict[str, float]) -> FlopBucket:
    bucket = FlopBucket(**{k: float(v) for k, v in values.items() if k in _FIELDS})
    if "backward_nonzero" not in values:  # version 2: no zero-row reference was kept
        bucket.backward_nonzero = bucket.backward_exact
    return bucket


def _reduction(done: float, reference: float) -> float:
    return 1.0 - done / reference if reference > 0 else 0.0
