"""The adaptive controller (``VCASConfig(controller="adaptive")``, the default where it applies).

The paper's controller spends 2 extra forwards and 6 extra backwards per update on separate
batches, moves s by a fixed 0.01, and decides the direction from a two-batch variance estimate
that jumps by orders of magnitude, so short runs stay near exact training. This controller:

- Calibrates on the training step itself. A calibration step propagates activation gradients
  exactly (its gradient trains the model; weight gradients are sampled at the ratios in force,
  as on any step) and the sampled layers record each sample's contribution ``c_i`` to the
  weight gradient through a random sketch drawn for the calibration (unbiased for the whole
  layer; :mod:`vcas.ops.records`); the block samplers record the per-sample gradient norms.
  No extra forward or backward.
- Estimates the SGD variance within the batch, from the spread of the ``c_i`` (``N - 1`` degrees
  of freedom instead of the ``M - 1 = 1`` of two batch gradients).
- Predicts the variance sampling would add at any keep ratios without sampling
  (:mod:`vcas.control.prediction`).
- Solves for the smallest s whose predicted V_act stays within ``tau_act * V_sgd``, both pooled
  over the last few calibrations (geometrically decaying weights over the trend of the gradients'
  size; a ratio of pooled sums, the quantity the bound is about) and for the newest calibration
  alone against the SGD variance the pool expects at its step (a pool lags behind an added
  variance that grows during training), and each nu_l, for the pool and the newest alike, from
  the analytic SampleW variance of the recorded row scores against ``tau_w * V_sgd,l``.
  Activation ratios above ``gather_below`` in a block of linears count as 1, in the solve as in
  the decision: there the block's backward runs dense, so sampling would spend the variance
  budget and save next to nothing (:attr:`Mechanism.dense_above <vcas.control.mechanism.Mechanism.dense_above>`).
- Jumps to the solution at the first calibration, then moves s within a trust region that grows
  while moves agree and shrinks when they flip. The calibration interval doubles while the
  solution is stable, halves when it rises (more must be kept) or when the newest calibration
  alone reads the ratios in force above ``SURPRISE * tau_act``, and stays when it falls.

Assumption: samples are independent in the backward (no BatchNorm in training mode between a
sampler and the layers below it); the per-sample estimates are then unbiased.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from statistics import median
from typing import Any, ClassVar, cast

from ..config import VCASConfig
from ..errors import ConfigError
from ..runtime.mode import CALIBRATION
from ..sampling import ShareSchedule
from . import prediction
from .mechanism import Mechanism, scalar_loss
from .policy import CalibrationSource, Decision, Merge, Outcome, Skip
from .statistics import CalibrationStats

# Calibrations pooled by the decision rule (older ones have decayed away anyway) ...
MEMORY = 16
# ... and only those of the last WINDOW x update_every steps: early in training the gradients
# (and V_sgd) are much larger, and a calibration from then would dominate the pooled sums.
WINDOW = 8
# A calibration that reads the ratios in force above SURPRISE x tau_act, on its own, means the
# added variance moved since the pool was formed: the next calibration comes sooner.
SURPRISE = 1.25
# In the pooled SGD variance, no calibration counts above SGD_CAP times the pool's median (both
# over the trend of the gradients' size): see AdaptiveState.pooled_sgd_variances.
SGD_CAP = 10.0


class AdaptivePolicy:
    """The adaptive decision rules on records of calibration steps (see the module docstring)."""

    name: ClassVar[str] = "adaptive"
    needs_batches: ClassVar[bool] = False

    def __init__(self, config: VCASConfig) -> None:
        self.config = config
        self.s = 1.0
        self.memory = AdaptiveState()
        self.draws = prediction.CommonDraws()  # the simulation's draws, the same for every decision

    def start(self, mechanism: Mechanism) -> None:
        """The first training step calibrates."""
        if self.memory.next_step <= 1 and not mechanism.recording:
            mechanism.start_recording()

    def pause(self, mechanism: Mechanism) -> None:
        mechanism.stop_recording()

    def on_step(self, step: int, mechanism: Mechanism, source: CalibrationSource,
                merge: Merge) -> Outcome | None:
        """Update from the step that just recorded (if it did), and arm the next calibration step."""
        outcome = None
        if mechanism.recording:
            stats = mechanism.take_stats()
            if stats is not None:
                mechanism.stop_recording()
                outcome = self.decide(merge(stats), step, mechanism)
        if not mechanism.recording and step + 1 >= self.memory.next_step:
            mechanism.start_recording()
        return outcome

    def calibrate(self, step: int, mechanism: Mechanism, source: CalibrationSource,
                  batches: Sequence[Any], merge: Merge) -> Outcome:
        """A calibration on separate batches: one recording exact pass each."""
        if not batches:
            raise ConfigError("calibrate needs at least 1 batch")
        assert source.loss_fn is not None
        mechanism.stop_recording()
        mechanism.start_recording()
        try:
            with mechanism.isolated(phase=CALIBRATION, sample_weights=False):
                for batch in batches:
                    mechanism.exact_pass(scalar_loss(source.loss_fn, batch))
            stats = mechanism.take_stats()
        finally:
            mechanism.stop_recording()
        if stats is None:
            return Skip("the calibration recorded nothing: no sampled layer took part in the loss")
        return self.decide(merge(stats), step, mechanism)

    def decide(self, stats: CalibrationStats, step: int, mechanism: Mechanism) -> Outcome:
        """Solve s and every nu for the variance budgets."""
        config, memory = self.config, self.memory
        every = cast(int, config.update_every)  # resolved by attach (VCASConfig.resolve)
        var_sgd = stats.sgd_variances()
        total_sgd = sum(var_sgd.values())
        if stats.samples < 2 or not all(math.isfinite(v) for v in var_sgd.values()) or total_sgd <= 0:
            memory.schedule_next(step, 0.5, config.shortest_interval, every)
            return Skip(f"the calibration step gave no usable SGD variance ({stats.samples} samples "
                        f"with finite gradients, var_sgd={total_sgd})")
        memory.remember(stats, step, WINDOW * every)
        pool = memory.pool(config.smoothing)
        pooled_sgd = memory.pooled_sgd_variances(pool)
        above = mechanism.above_positions
        previous_s, previous_nu = self.s, mechanism.ratios.weight_list
        # The newest calibration's added variance against the SGD variance the pool expects at
        # its step (one batch's own V_sgd is too noisy to divide by): the pool lags behind an
        # added variance that grows during training, the newest does not.
        newest = pool[-1:]
        newest_sgd = {name: v / sum(config.smoothing ** age for age in range(len(pool)))
                      for name, v in pooled_sgd.items()}
        # Every bound holds for the pool and for the newest calibration alone (with one
        # calibration remembered the pool is the newest: its constraints would repeat).
        parts = [(pool, pooled_sgd)] + ([(newest, newest_sgd)] if len(pool) > 1 else [])
        # One evaluator per part, the newest first: one calibration, cheap to evaluate, and often
        # the constraint a trial breaks (the pool's is then not evaluated).
        constraints = [(prediction.PooledActVariance(part, above, self.draws), config.tau_act * sum(sgd.values()))
                       for part, sgd in reversed(parts)]
        newest_act, pooled_act = constraints[0][0], constraints[-1][0]
        surprised = newest_act(mechanism.ratios.act_list) > SURPRISE * config.tau_act * sum(newest_sgd.values())
        schedule = ShareSchedule(prediction.pooled_block_norms(pool), mechanism.dense_above)
        # After the first decision the answer moves little between calibrations: search near the
        # share in force.
        near = previous_s if len(memory.history) > 1 else None
        target = prediction.smallest_share(schedule, constraints, near=near)
        self.s = target if len(memory.history) == 1 else memory.move(previous_s, target)
        act = schedule(self.s)
        solved = self._weight_ratios(parts, mechanism)
        cap = config.max_weight_ratio
        weight = {name: nu if nu <= cap else 1.0 for name, nu in solved.items()}
        memory.schedule_next(step, self._interval_factor(target - previous_s, solved, previous_nu, surprised),
                             config.shortest_interval, every)
        estimate = prediction.summary(stats, above, act, weight)
        return Decision(self.s, act, weight, estimate, pooled_act(act) / sum(pooled_sgd.values()))

    def _interval_factor(self, s_move: float, solved: dict[str, float], previous_nu: Sequence[float],
                         surprised: bool) -> float:
        """How the calibration interval changes: halved when the ratios in force need more kept
        (the newest calibration read them above the bound, or the solution rose), doubled while
        the solution is stable, kept when it falls (sampling more can wait for the next one)."""
        cap = self.config.max_weight_ratio
        # Moves between ratios above the cap change nothing that runs.
        nu_moves = [min(a, cap) - min(b, cap) for a, b in zip(solved.values(), previous_nu)]
        tolerance = 0.05 * max(1, len(nu_moves))
        if surprised or s_move >= 0.05 or sum(max(0.0, m) for m in nu_moves) >= tolerance:
            return 0.5
        if abs(s_move) < 0.05 and sum(abs(m) for m in nu_moves) < tolerance:
            return 2.0
        return 1.0

    def _weight_ratios(self, parts: Sequence[tuple[prediction.Pool, dict[str, float]]],
                       mechanism: Mechanism) -> dict[str, float]:
        """Each nu_l: the largest over ``parts`` (pools with their V_sgd per layer) of the
        smallest ratio that keeps the part's V_w within ``tau_w`` of its V_sgd of the layer."""
        solved = []
        for part, sgd in parts:
            budgets = {name: self.config.tau_w * sgd.get(name, 0.0) if mechanism.weight_sampled(name) else None
                       for name in mechanism.linear_names}
            solved.append(prediction.solve_weight_ratios(part, budgets, self.config.min_weight_ratio))
        return {name: max(ratios[name] for ratios in solved) for name in solved[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"s": self.s, **self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.s = float(state["s"])
        self.memory.load_state_dict(state)


@dataclasses.dataclass
class AdaptiveState:
    """What the adaptive controller carries between calibrations (checkpointed)."""

    history: list[CalibrationStats] = dataclasses.field(default_factory=list)  # newest last
    steps: list[int] = dataclasses.field(default_factory=list)  # the training step of each
    step: float = 0.1  # current trust region for moves of s
    direction: int = 0  # sign of the last move of s
    interval: int = 0
    next_step: int = 1


    def remember(self, stats: CalibrationStats, step: int, window: int) -> None:
        """Add a calibration; forget all but the last MEMORY ones within ``window`` steps."""
        recent = [i for i, seen in enumerate(self.steps) if step - seen <= window][-(MEMORY - 1):]
        self.history = [self.history[i] for i in recent] + [stats]
        self.steps = [self.steps[i] for i in recent] + [step]

    def pool(self, decay: float) -> list[tuple[float, CalibrationStats]]:
        """The remembered calibrations, each weighted ``decay ** age`` (newest: 1) over the
        scale of the gradients at its step: the trend of the calibrations' energies (total
        squared norm of the per-sample contributions), see :meth:`trend`.

        Gradients shrink by orders of magnitude as training goes on: unscaled pooled sums would
        let the oldest calibrations, the largest, decide the ratios long after the added variance
        they measured stopped being the current one. Dividing each by its own energy instead
        would weigh an easy batch (tiny gradients, whose added variance is a large share of its
        own) like a hard one: the pooled ratio would become a mean of per-batch ratios, which on
        a fine-tuned classifier, where most batches are easy, reads far above the ratio of the
        expected variances that the bound is about. Over the trend, pooled V_act / pooled V_sgd
        is a ratio of weighted sums, each batch counting with its real size."""
        trend = self.trend()
        newest = len(self.history) - 1
        return [(decay ** (newest - age) / scale, stats)
                for age, (scale, stats) in enumerate(zip(trend, self.history))]

    def pooled_sgd_variances(self, pool: prediction.Pool) -> dict[str, float]:
        """Per layer, the pool's weighted SGD variances, each calibration's capped at ``SGD_CAP``
        times the median over the pool (both over the trend).

        Per-sample gradients of a fine-tuned classifier are heavy-tailed: the rare misfit
        sample carries most of the expected SGD variance, and one batch's V_sgd spans four
        orders of magnitude from batch to batch, while the variance sampling adds (from the
        many small gradients) spans far less. Uncapped, the one batch in a pool that held such a
        sample would set the ratios for the whole window, far looser than the ratios the other
        batches allow; capped, the pool errs on the careful side of the expected V_sgd."""
        sizes = [sum(stats.sgd_variances().values()) / scale for stats, scale in zip(self.history, self.trend())]
        limit = SGD_CAP * median(sizes)
        capped = [(weight * min(1.0, limit / size), stats) for (weight, stats), size in zip(pool, sizes)]
        return prediction.pooled_sgd_variances(capped)

    def trend(self) -> list[float]:
        """The energy trend at each remembered calibration: a line through log energy over
        training steps, fitted robustly (Theil-Sen: the median of the pairwise slopes, then the
        median intercept), so that one batch's energy, far off by chance, hardly moves it."""
        logs = [math.log(stats.energy()) for stats in self.history]
        slopes = [(logs[j] - logs[i]) / (self.steps[j] - self.steps[i])
                  for i in range(len(logs)) for j in range(i + 1, len(logs)) if self.steps[j] != self.steps[i]]
        slope = median(slopes) if slopes else 0.0
        intercept = median([y - slope * step for y, step in zip(logs, self.steps)])
        return [math.exp(intercept + slope * step) for step in self.steps]

    def move(self, s: float, target: float, smallest: float = 0.01, largest: float = 0.4) -> float:
        """Move s toward the solved target within a trust region that doubles while moves agree
        in direction and halves when they flip, so noisy targets cannot make s oscillate."""
        direction = (target > s) - (target < s)
        if direction:
            agree = direction == self.direction
            self.step = min(largest, 2 * self.step) if agree else max(smallest, self.step / 2)
            self.direction = direction
        return min(1.0, max(0.0, s + max(-self.step, min(self.step, target - s))))

    def schedule_next(self, step: int, factor: float, shortest: int, longest: int) -> None:
        """Scale the calibration interval by ``factor`` within ``[shortest, longest]``."""
        self.interval = min(longest, max(shortest, int(self.interval * factor)))
        self.next_step = step + self.interval

    def state_dict(self) -> dict[str, Any]:
        return {"history": [stats.state_dict() for stats in self.history], "steps": list(self.steps),
                "step": self.step,
                "direction": self.direction, "interval": self.interval, "next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [CalibrationStats.from_state_dict(s) for s in state["history"]]
        self.steps = [int(s) for s in state["steps"]]
        self.step, self.direction = float(state["step"]), int(state["direction"])
        self.interval, self.next_step = int(state["interval"]), int(state["next_step"])
