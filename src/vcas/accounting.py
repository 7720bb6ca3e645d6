"""FLOPs accounting of what the sampled layers really did (METHOD.md section 7)."""

from __future__ import annotations

import dataclasses
from typing import Any

TRAIN = "train"
CALIBRATION = "calibration"


@dataclasses.dataclass
class FlopBucket:
    """FLOPs of one phase (training or calibration): forward, exact backward, backward done."""

    forward: float = 0.0
    backward_exact: float = 0.0
    backward_done: float = 0.0

    def add(self, other: "FlopBucket") -> None:
        self.forward += other.forward
        self.backward_exact += other.backward_exact
        self.backward_done += other.backward_done


@dataclasses.dataclass
class FlopTally:
    """Running FLOPs of the sampled layers per phase, plus the rest of the model once measured.

    ``other_forward_per_linear`` is the model's forward FLOPs outside the sampled layers per
    forward FLOP of the sampled layers, ``other_backward_per_linear`` the same for one exact
    backward pass (measured with ``torch.utils.flop_counter``). They stay ``None`` until measured,
    and the reductions are then over the sampled layers only (see ``scope``).
    """

    train: FlopBucket = dataclasses.field(default_factory=FlopBucket)
    calibration: FlopBucket = dataclasses.field(default_factory=FlopBucket)
    other_forward_per_linear: float | None = None
    other_backward_per_linear: float | None = None

    def bucket(self, phase: str) -> FlopBucket:
        return self.calibration if phase == CALIBRATION else self.train

    @property
    def scope(self) -> str:
        return "sampled_layers" if self.other_forward_per_linear is None else "model"

    def _other(self, bucket: FlopBucket) -> tuple[float, float]:
        if self.other_forward_per_linear is None:
            return 0.0, 0.0
        return (bucket.forward * self.other_forward_per_linear,
                bucket.backward_exact * (self.other_backward_per_linear or 0.0))

    def bp_flops_reduction(self) -> float:
        """1 - (backward FLOPs done in training steps) / (backward FLOPs of exact training)."""
        _, other_bwd = self._other(self.train)
        exact = self.train.backward_exact + other_bwd
        done = self.train.backward_done + other_bwd
        return 1.0 - done / exact if exact > 0 else 0.0

    def train_flops_reduction(self) -> float:
        """1 - (all FLOPs spent, calibration included) / (FLOPs exact training would have spent)."""
        exact = self.exact_training_flops()
        return 1.0 - self.spent_flops() / exact if exact > 0 else 0.0

    def exact_training_flops(self) -> float:
        other_fwd, other_bwd = self._other(self.train)
        return self.train.forward + self.train.backward_exact + other_fwd + other_bwd

    def spent_flops(self) -> float:
        total = 0.0
        for bucket in (self.train, self.calibration):
            other_fwd, other_bwd = self._other(bucket)
            # Work outside the sampled layers is counted as exact: it is not skipped.
            total += bucket.forward + bucket.backward_done + other_fwd + other_bwd
        return total

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train = FlopBucket(**state["train"])
        self.calibration = FlopBucket(**state["calibration"])
        self.other_forward_per_linear = state["other_forward_per_linear"]
        self.other_backward_per_linear = state["other_backward_per_linear"]
