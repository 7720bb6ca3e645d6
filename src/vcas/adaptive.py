"""The adaptive controller's decision rules (``VCASConfig(controller="adaptive")``).

The paper's controller moves s by a fixed 0.01 per update and decides the direction from a
single noisy variance ratio, so short runs stay near exact training. This controller instead
*solves* for the operating point at each calibration, from statistics it already collects:

- Activation sampling: the variance that SampleA adds at a block output is known analytically
  from the recorded per-sample norms, ``sum_i (1/p_i - 1) ||G_i||^2`` ("proxy"). The variance it
  causes in the weight gradients, V_act, is measured at one schedule; their ratio ``c`` (smoothed
  over calibrations in log space, which tames the heavy-tailed single estimates) turns the proxy
  into a prediction of V_act for any s. Bisection finds the smallest s whose predicted V_act
  stays within ``tau_act * V_sgd``.
- Weight sampling: V_w,l(nu) is analytic given the recorded row scores, so each nu_l is solved
  directly by bisection against ``tau_w * V_sgd,l``.
- Calibration spacing: the first calibration runs at the first step; the interval doubles while
  the solution is stable and halves when it moves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from .sampling import capped_proportional_probs, sampling_variance, share_schedule

def proxy_act_variance(block_norms: list[list[torch.Tensor | None]], ratios: Sequence[float]) -> float:
    """Sum over blocks of the variance SampleA adds at each block output under ``ratios``
    (a block samples only below the ratio of the block above, as the sampler does)."""
    total = 0.0
    for batch in block_norms:
        for block, norms in enumerate(batch):
            above = ratios[block + 1] if block + 1 < len(ratios) else 1.0
            if norms is None or ratios[block] >= above:
                continue
            probs = capped_proportional_probs(norms, ratios[block] * norms.numel())
            total += float(sampling_variance(probs, norms))
    return total / max(1, len(block_norms))


def solve_share(block_norms: list[list[torch.Tensor | None]], budget: float,
                iterations: int = 24) -> float:
    """The smallest s in [0, 1] with proxy(rho(s)) <= budget (proxy grows as s falls)."""
    if proxy_act_variance(block_norms, share_schedule(block_norms, 0.0)) <= budget:
        return 0.0
    low, high = 0.0, 1.0  # proxy(low) > budget >= proxy(high) = 0
    for _ in range(iterations):
        middle = (low + high) / 2
        if proxy_act_variance(block_norms, share_schedule(block_norms, middle)) <= budget:
            high = middle
        else:
            low = middle
    return high


def weight_variance(scores: list[torch.Tensor], ratio: float) -> float:
    """Mean over recorded passes of the analytic SampleW variance at keep ratio ``ratio``."""
    if not scores:
        return 0.0
    total = 0.0
    for row_scores in scores:
        n = int((row_scores > 0).sum())
        probs = capped_proportional_probs(row_scores, ratio * n)
        total += float(sampling_variance(probs, row_scores))
    return total / len(scores)


def solve_weight_ratio(scores: list[torch.Tensor], budget: float, floor: float,
                       iterations: int = 14) -> float:
    """The smallest nu in [floor, 1] with V_w(nu) <= budget (V_w grows as nu falls)."""
    if weight_variance(scores, floor) <= budget:
        return floor
    low, high = floor, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if weight_variance(scores, middle) <= budget:
            high = middle
        else:
            low = middle
    return high


@dataclasses.dataclass
class AdaptiveState:
    """What the adaptive controller carries between calibrations (checkpointed)."""

    log_gain: float | None = None  # log of c = V_act / proxy, smoothed
    var_sgd_layers: list[float] | None = None  # smoothed per measured layer
    interval: int = 0
    next_step: int = 1

    def smooth_gain(self, measured: float, decay: float) -> float:
        log_value = math.log(measured)
        self.log_gain = log_value if self.log_gain is None else (
            decay * self.log_gain + (1 - decay) * log_value)
        return math.exp(self.log_gain)

    def smooth_sgd(self, measured: Sequence[float], decay: float) -> list[float]:
        if self.var_sgd_layers is None or len(self.var_sgd_layers) != len(measured):
            self.var_sgd_layers = list(measured)
        else:
            self.var_sgd_layers = [decay * old + (1 - decay) * new
                                   for old, new in zip(self.var_sgd_layers, measured)]
        return list(self.var_sgd_layers)

    def schedule_next(self, step: int, stable: bool, shortest: int, longest: int) -> None:
        """Double the interval while the solution is stable, halve it when it moves."""
        grown = 2 * self.interval if stable else self.interval // 2
        self.interval = min(longest, max(shortest, grown))
        self.next_step = step + self.interval

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state[field.name])
