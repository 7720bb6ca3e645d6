"""The adaptive controller's decision rules (``VCASConfig(controller="adaptive")``).

The paper's controller moves s by a fixed 0.01 per update and decides the direction from a
single noisy variance ratio, so short runs stay near exact training. This controller instead
*solves* for the operating point at each calibration, from statistics it already collects:

- Activation sampling: the variance that SampleA adds at a block output is known analytically
  from the recorded per-sample norms, ``sum_i (1/p_i - 1) ||G_i||^2`` ("proxy"). The variance it
  causes in the weight gradients, V_act, is measured at one schedule; their ratio ``c`` (smoothed
  over calibrations in log space, which tames the heavy-tailed single estimates) turns the proxy
  into a prediction of V_act for any s. Bisection finds the smallest s whose predicted V_act
  stays within ``tau_act * V_sgd``; s moves toward it within a trust region that grows while
  the moves agree and shrinks when they flip.
- Weight sampling: V_w,l(nu) is analytic given the recorded row scores, so each nu_l is solved
  directly by bisection against ``tau_w * V_sgd,l``.
- Calibration spacing: the first calibration runs at the first step; the interval doubles while
  the solution is stable and halves when it moves. A regime change, the SGD variance falling by
  more than 4x between calibrations (as when the loss collapses late in fine-tuning), restarts
  the averages and goes back to the shortest interval, so the budget follows it at once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from .sampling import capped_proportional_probs, sampling_variance, share_schedule

def proxy_act_variance(block_norms: list[list[torch.Tensor | None]], ratios: Sequence[float]) -> float:
    """Sum over blocks of ``sum_i (1/p_i - 1) ||G_i||^2`` with ``p`` the capped-proportional
    probabilities for ``ratio * N`` kept samples on the block's exact norms: the marginal keep
    probabilities the block's parameters see under nested sampling. Monotone in every ratio,
    so bisection on s is well posed."""
    total = 0.0
    for batch in block_norms:
        for block, norms in enumerate(batch):
            if norms is None or ratios[block] >= 1.0:
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


# A fall of the measured SGD variance by more than this factor restarts the averages.
REGIME_CHANGE = 4.0


def _fell(old: float, new: float, factor: float) -> bool:
    return new * factor < old


@dataclasses.dataclass
class AdaptiveState:
    """What the adaptive controller carries between calibrations (checkpointed).

    The gain ``c = V_act / proxy`` is a ratio of moving averages (not an average of ratios):
    single V_act estimates are heavy-tailed, and averaging ratios, or their logs, would
    under-estimate the mean and make the controller too aggressive.
    """

    var_act: float = 0.0  # moving averages of the measured V_act and of the proxy at the draws
    proxy: float = 0.0
    var_sgd_layers: list[float] | None = None  # smoothed per measured layer
    step: float = 0.1  # current trust region for moves of s
    direction: int = 0  # sign of the last move of s
    interval: int = 0
    next_step: int = 1

    def gain(self, var_act: float, proxy: float, decay: float) -> float | None:
        """Fold one measurement into the averages; the gain, or None while nothing sampled."""
        if proxy > 0 and math.isfinite(var_act):
            first = self.proxy == 0.0
            self.var_act = var_act if first else decay * self.var_act + (1 - decay) * var_act
            self.proxy = proxy if first else decay * self.proxy + (1 - decay) * proxy
        return self.var_act / self.proxy if self.proxy > 0 and self.var_act > 0 else None

    def smooth_sgd(self, measured: Sequence[float], decay: float) -> tuple[list[float], bool]:
        """The smoothed V_sgd per layer, and whether the total fell by more than
        ``REGIME_CHANGE`` times (as when the loss collapses late in fine-tuning): then the
        averages restart from this measurement, since smoothing would lag the fall and let the
        added variance exceed its budget until it caught up. Rises are smoothed as usual: a
        lagging budget is then only conservative."""
        previous = self.var_sgd_layers
        changed = previous is None or len(previous) != len(measured) or _fell(
            sum(previous), sum(measured), REGIME_CHANGE)
        if changed:
            self.var_sgd_layers = list(measured)
            if previous is not None:
                self.var_act = self.proxy = 0.0  # the gain too is re-learned from now on
        else:
            self.var_sgd_layers = [decay * old + (1 - decay) * new
                                   for old, new in zip(previous, measured)]
        return list(self.var_sgd_layers), changed and previous is not None

    def move(self, s: float, target: float, smallest: float = 0.01, largest: float = 0.4) -> float:
        """Move s toward the solved target within a trust region that doubles while moves agree
        in direction and halves when they flip, so noisy targets cannot make s oscillate."""
        direction = (target > s) - (target < s)
        if direction:
            agree = direction == self.direction
            self.step = min(largest, 2 * self.step) if agree else max(smallest, self.step / 2)
            self.direction = direction
        return min(1.0, max(0.0, s + max(-self.step, min(self.step, target - s))))

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
