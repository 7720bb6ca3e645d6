"""The adaptive controller's statistics and decision rules (``VCASConfig(controller="adaptive")``).

The paper's controller spends 2 extra forwards and 6 extra backwards per update on separate
batches, moves s by a fixed 0.01, and decides the direction from a two-batch variance estimate
that jumps by orders of magnitude, so short runs stay near exact training. This controller:

- Calibrates on the training step itself. A calibration step runs its backward exactly (its
  gradient trains the model) and the sampled layers record, for a random 1 % of their weight
  entries, each sample's contribution ``c_i`` to the weight gradient (:mod:`vcas.ops.records`);
  the block samplers record the per-sample gradient norms. No extra forward or backward.
- Estimates the SGD variance within the batch, from the spread of the ``c_i`` (``N - 1`` degrees
  of freedom instead of the ``M - 1 = 1`` of two batch gradients).
- Predicts the activation-sampling variance for any keep ratios without sampling: a sample
  kept with weight ``w_i`` (``1/p`` products along the nested samplers) adds
  ``(E[w_i^2] - 1) ||c_i||^2``. ``E[w_i^2]`` is computed by simulating the samplers on the
  recorded norms (exactly for the top sampler, Monte Carlo with common random numbers below).
- Solves for the smallest s whose predicted V_act stays within ``tau_act * V_sgd`` (bisection),
  both pooled over the last few calibrations with geometrically decaying weights (ratio of
  pooled sums, the quantity the bound is about), and each nu_l from the analytic SampleW variance
  of the recorded row scores against ``tau_w * V_sgd,l``.
- Jumps to the solution at the first calibration, then moves s within a trust region that grows
  while moves agree and shrinks when they flip, and doubles the calibration interval while the
  solution is stable.

Assumption: samples are independent in the backward (no BatchNorm in training mode between a
sampler and the layers below it); the per-sample estimates are then unbiased.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .calibration import Measurement
from .ops.records import SampleRecord
from .sampling import ShareSchedule, SortedScores, capped_proportional_probs

# Calibrations pooled by the decision rule (older ones have decayed away anyway) ...
MEMORY = 16
# ... and only those of the last WINDOW x update_every steps: early in training the gradients
# (and V_sgd) are much larger, and a calibration from then would dominate the pooled sums.
WINDOW = 8
# Monte Carlo draws of the samplers above a nested one (the top sampler is exact).
SIMULATION_DRAWS = 64


@dataclasses.dataclass
class CalibrationStats:
    """What one calibration step recorded.

    Attributes:
        layers: per measured weight, one :class:`SampleRecord` per backward pass.
        scales: per measured weight, its number of entries over the subset size.
        row_scores: per sampled linear, the SampleW row scores of each pass.
        n_blocks: the model's number of sampled blocks (some may record nothing).
    """

    layers: list[list[SampleRecord]]
    scales: list[float]
    row_scores: list[list[torch.Tensor]]
    n_blocks: int
    _sgd_variances: list[float] | None = dataclasses.field(default=None, init=False, repr=False,
                                                           compare=False)
    _sorted_scores: dict[int, SortedScores] = dataclasses.field(default_factory=dict, init=False,
                                                                repr=False, compare=False)

    @property
    def samples(self) -> int:
        return max((sum(r.squared_norms.numel() for r in records) for records in self.layers), default=0)

    def sgd_variances(self) -> list[float]:
        """Per measured weight, the unbiased within-batch estimate of the variance of the
        minibatch gradient: ``(N sum_i ||c_i||^2 - ||sum_i c_i||^2) / (N - 1)``, scaled up.
        Computed once: the records do not change, and every later update pools them again."""
        if self._sgd_variances is None:
            self._sgd_variances = self._within_batch_variances()
        return list(self._sgd_variances)

    def sorted_scores(self, site: int) -> SortedScores:
        """The SampleW row scores of one linear, a row per pass, sorted once."""
        if site not in self._sorted_scores:
            self._sorted_scores[site] = SortedScores(list(self.row_scores[site]))
        return self._sorted_scores[site]

    def _within_batch_variances(self) -> list[float]:
        variances = []
        for records, scale in zip(self.layers, self.scales):
            n = sum(r.squared_norms.numel() for r in records)
            if n < 2:
                variances.append(0.0)
                continue
            squares = sum(float(r.squared_norms.sum()) for r in records)
            total = float(sum(r.total for r in records).pow(2).sum())
            variances.append(scale * max(0.0, n * squares - total) / (n - 1))
        return variances

    def excess_weights(self) -> list[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
        """Per pass, its sampler norms and, per block, ``sum_l scale_l ||c_il||^2`` over the
        layers below that block's sampler: the total predicted V_act is then one dot product
        per pass and block, ``sum_i (E[w_i^2] - 1) * excess_i`` (what the bisection evaluates)."""
        passes: dict[int, tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]] = {}
        for records, scale in zip(self.layers, self.scales):
            for record in records:
                if record.block is None:
                    continue
                norms, sums = passes.setdefault(id(record.pass_norms), (record.pass_norms, {}))
                weighted = scale * record.squared_norms
                previous = sums.get(record.block)
                sums[record.block] = weighted if previous is None else previous + weighted
        return list(passes.values())

    def block_norms(self) -> list[list[torch.Tensor | None]]:
        """Per backward pass, per block: the per-sample gradient norms the samplers recorded."""
        return [[norms.get(block) for block in range(self.n_blocks)] for norms in self._passes()]

    def _passes(self) -> list[dict[int, torch.Tensor]]:
        seen: dict[int, dict[int, torch.Tensor]] = {}
        for records in self.layers:
            for record in records:
                seen.setdefault(id(record.pass_norms), record.pass_norms)
        return [norms for norms in seen.values() if norms]

    def state_dict(self) -> dict[str, Any]:
        passes = self._passes()
        index = {id(p): i for i, p in enumerate(passes)}
        return {"passes": [dict(p) for p in passes], "scales": list(self.scales),
                "row_scores": self.row_scores, "n_blocks": self.n_blocks,
                "layers": [[(index.get(id(r.pass_norms)), r.block, r.squared_norms, r.total)
                            for r in records] for records in self.layers]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "CalibrationStats":
        passes = [dict(p) for p in state["passes"]]
        layers = [[SampleRecord(block, squares, total, passes[index] if index is not None else {})
                   for index, block, squares, total in records] for records in state["layers"]]
        return cls(layers, list(state["scales"]), state["row_scores"], int(state["n_blocks"]))


def second_moments(norms: dict[int, torch.Tensor], above: Sequence[int | None],
                   ratios: Sequence[float], generator: torch.Generator,
                   draws: int = SIMULATION_DRAWS) -> dict[int, torch.Tensor]:
    """``E[w_i^2]`` per block: the second moment of each sample's weight after the block's
    sampler, for the keep ``ratios``, mirroring :class:`vcas.ops.activation.BlockSampler`.

    Upper samplers are simulated (``draws`` weight vectors); at each sampling block the moment
    given the weights above is exact (``w^2 / p``), which removes that block's own draw noise."""
    return _simulate([norms], above, ratios, generator, draws)[0]


def passes_second_moments(passes: Sequence[dict[int, torch.Tensor]], above: Sequence[int | None],
                          ratios: Sequence[float]) -> list[dict[int, torch.Tensor]]:
    """:func:`second_moments` of every pass with the fixed generator (common random numbers:
    each pass gets the draws a fresh generator gives), simulated together where passes have
    the same blocks and sizes: the bisection evaluates every pooled pass a dozen times."""
    moments: list[dict[int, torch.Tensor]] = [{} for _ in passes]
    for indices in _same_signature(passes):
        group = _simulate([passes[i] for i in indices], above, ratios, _fixed_generator())
        for index, result in zip(indices, group):
            moments[index] = result
    return moments


def _same_signature(passes: Sequence[dict[int, torch.Tensor]]) -> list[list[int]]:
    """Indices of the passes grouped by their blocks and sizes (simulated in one tensor)."""
    groups: dict[tuple[tuple[int, int], ...], list[int]] = {}
    for index, norms in enumerate(passes):
        signature = tuple(sorted((block, n.numel()) for block, n in norms.items()))
        groups.setdefault(signature, []).append(index)
    return list(groups.values())


def _simulate(passes: Sequence[dict[int, torch.Tensor]], above: Sequence[int | None],
              ratios: Sequence[float], generator: torch.Generator,
              draws: int = SIMULATION_DRAWS) -> list[dict[int, torch.Tensor]]:
    """:func:`second_moments` of passes with the same blocks and sizes, stacked along a first
    dimension; every pass sees the same uniform draws (one ``(draws, n)`` tensor per block)."""
    moments = _stacked_moments(_stack_norms(passes), above, ratios, generator, draws)
    return [{block: m[index] for block, m in moments.items()} for index in range(len(passes))]


def _stack_norms(passes: Sequence[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per block, the norms of same-signature passes as one ``(passes, n)`` float64 tensor."""
    return {block: torch.stack([p[block].double().flatten() for p in passes]) for block in passes[0]}


def _stacked_moments(stacked: dict[int, torch.Tensor], above: Sequence[int | None],
                     ratios: Sequence[float], generator: torch.Generator,
                     draws: int = SIMULATION_DRAWS) -> dict[int, torch.Tensor]:
    """Per block, ``E[w_i^2]`` of the stacked passes' samples, ``(passes, n)``; blocks whose
    gradient no sampler (their own or one above) has touched are left out."""
    stacked = {block: norms.unsqueeze(1) for block, norms in stacked.items()}  # (passes, 1, n)
    memo: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def visit(block: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if block in memo:
            return memo[block]
        parent = above[block]
        weights, moments = visit(parent) if parent is not None else (None, None)
        block_norms = stacked.get(block)
        ratio_above = 1.0 if parent is None else ratios[parent]
        if block_norms is not None and ratios[block] < ratio_above:
            n = block_norms.shape[-1]
            # Weights of 1 at the top sampler: its probabilities are the same for every draw.
            incoming = torch.ones((), dtype=torch.float64) if weights is None else weights
            scores = incoming * block_norms  # (passes, 1 or draws, n)
            probs = capped_proportional_probs(scores.reshape(-1, n), ratios[block] * n).reshape(scores.shape)
            safe = probs.clamp(min=torch.finfo(probs.dtype).tiny)
            moments = torch.where(probs > 0, incoming.pow(2) / safe, 0.0).mean(1)
            kept = torch.rand((draws, n), generator=generator, dtype=probs.dtype) < probs
            weights = torch.where(kept, incoming / safe, 0.0)
        memo[block] = (weights, moments)
        return memo[block]

    results = {}
    for block in stacked:
        _, moments = visit(block)
        if moments is not None:
            results[block] = moments
    return results


def act_variances(stats: CalibrationStats, above: Sequence[int | None],
                  ratios: Sequence[float]) -> list[float]:
    """Per measured weight, the variance activation sampling at ``ratios`` adds to its gradient
    on this calibration's samples: ``sum_i (E[w_i^2] - 1) ||c_i||^2`` (deterministic: each
    pass's simulation uses the same fixed seed, so bisection sees a fixed function)."""
    passes = {id(r.pass_norms): r.pass_norms for records in stats.layers for r in records
              if r.block is not None and r.pass_norms}
    moments = dict(zip(passes, passes_second_moments(list(passes.values()), above, ratios)))
    variances = []
    for records, scale in zip(stats.layers, stats.scales):
        total = 0.0
        for record in records:
            if record.block is None:
                continue  # above every sampler: never sampled
            moment = moments.get(id(record.pass_norms), {}).get(record.block)
            if moment is not None and moment.numel() == record.squared_norms.numel():
                total += float((_added_variance_factor(moment) * record.squared_norms).sum())
        variances.append(scale * total)
    return variances


def _added_variance_factor(moment: torch.Tensor) -> torch.Tensor:
    """``E[w_i^2] - 1`` per sample: how much of ``||c_i||^2`` sampling adds (0 where never kept)."""
    return (moment - 1.0).clamp(min=0.0) * (moment > 0)


def _fixed_generator() -> torch.Generator:
    """The simulation's draws: the same for every pass and every evaluation (common random numbers)."""
    return torch.Generator().manual_seed(0)


Pool = Sequence[tuple[float, CalibrationStats]]


def pooled_sgd_variances(pool: Pool) -> list[float]:
    """Per measured weight, the weighted sum of the calibrations' SGD variances."""
    weighted = [(weight, stats.sgd_variances()) for weight, stats in pool]
    n_layers = len(weighted[0][1]) if weighted else 0
    return [sum(weight * values[layer] for weight, values in weighted) for layer in range(n_layers)]


def pooled_block_norms(pool: Pool) -> list[list[torch.Tensor | None]]:
    return [batch for _, stats in pool for batch in stats.block_norms()]


def pooled_act_variance(pool: Pool, above: Sequence[int | None], ratios: Sequence[float]) -> float:
    """The weighted sum over calibrations of the total predicted V_act at ``ratios``
    (the sum over layers of :func:`act_variances`, computed per pass and block)."""
    return _PooledExcess(pool).variance(above, ratios)


class _PooledExcess:
    """The pool's per-pass, per-block aggregated contributions, gathered once per solve and
    stacked (pool weight folded in) per group of passes with the same blocks and sizes, so an
    evaluation is a few tensor ops per group and block."""

    def __init__(self, pool: Pool) -> None:
        passes = [(weight, norms, sums) for weight, stats in pool
                  for norms, sums in stats.excess_weights()]
        self.groups = []
        for indices in _same_signature([norms for _, norms, _ in passes]):
            group = [passes[i] for i in indices]
            norms = _stack_norms([n for _, n, _ in group])
            excess = {block: torch.stack([_weighted_excess(weight, sums.get(block), stacked.shape[1])
                                          for weight, _, sums in group])
                      for block, stacked in norms.items()}
            self.groups.append((norms, excess))

    def variance(self, above: Sequence[int | None], ratios: Sequence[float]) -> float:
        total = 0.0
        for norms, excess in self.groups:
            moments = _stacked_moments(norms, above, ratios, _fixed_generator())
            for block, moment in moments.items():
                total += float((_added_variance_factor(moment) * excess[block]).sum())
        return total


def _weighted_excess(weight: float, excess: torch.Tensor | None, n: int) -> torch.Tensor:
    """A pass's excess at one block times its pool weight; zeros where it has none (or one of
    another size), which adds nothing."""
    if excess is None or excess.numel() != n:
        return torch.zeros(n, dtype=torch.float64)
    return weight * excess.double().flatten()


def solve_share(pool: Pool, above: Sequence[int | None], budget: float,
                iterations: int = 10) -> float:
    """The smallest s in [0, 1] whose schedule's pooled predicted V_act is within ``budget``."""
    norms = pooled_block_norms(pool)
    if not norms:
        return 1.0
    pooled, schedule = _PooledExcess(pool), ShareSchedule(norms)

    def within(share: float) -> bool:
        return pooled.variance(above, schedule(share)) <= budget

    if within(0.0):
        return 0.0
    low, high = 0.0, 1.0  # within(high) holds at s = 1 (nothing sampled)
    for _ in range(iterations):
        middle = (low + high) / 2
        if within(middle):
            high = middle
        else:
            low = middle
    return high


def weight_variance(scores: Sequence[tuple[float, torch.Tensor]], ratio: float) -> float:
    """Weighted sum over recorded passes of the analytic SampleW variance at keep ratio ``ratio``."""
    return float(_WeightedScores.of_tensors(scores).variances(torch.tensor([ratio]))[0])


class _WeightedScores:
    """The pooled row scores of several linears: each pass sorted once, stacked, each row with
    its pool weight and its linear, so one evaluation gives every linear's pooled V_w."""

    def __init__(self, layers: Sequence[Sequence[tuple[float, SortedScores]]]) -> None:
        rows = [(layer, weight, part) for layer, parts in enumerate(layers) for weight, part in parts]
        self.sorted = SortedScores.stack([part for _, _, part in rows])
        counts = [len(part.positive) for _, _, part in rows]
        self.weights = torch.tensor([w for (_, w, _), n in zip(rows, counts) for _ in range(n)],
                                    dtype=torch.float64)
        self.layer = torch.tensor([i for (i, _, _), n in zip(rows, counts) for _ in range(n)],
                                  dtype=torch.long)
        self.n_layers = len(layers)

    @classmethod
    def of_tensors(cls, scores: Sequence[tuple[float, torch.Tensor]]) -> "_WeightedScores":
        return cls([[(weight, SortedScores([row_scores])) for weight, row_scores in scores]])

    def variances(self, ratios: torch.Tensor) -> torch.Tensor:
        """Per linear, the pooled V_w at its keep ratio (``ratios``: one per linear)."""
        per_row = self.weights * self.sorted.variances(ratios.double()[self.layer])
        return torch.zeros(self.n_layers, dtype=torch.float64).index_add_(0, self.layer, per_row)


def solve_weight_ratio(scores: Sequence[tuple[float, torch.Tensor]], budget: float, floor: float,
                       iterations: int = 10) -> float:
    """The smallest nu in [floor, 1] with V_w(nu) <= budget (V_w grows as nu falls)."""
    pooled = _WeightedScores.of_tensors(scores)
    return float(_solve_nus(pooled, torch.tensor([budget], dtype=torch.float64), floor, iterations)[0])


def _solve_nus(pooled: _WeightedScores, budgets: torch.Tensor, floor: float,
               iterations: int = 10) -> torch.Tensor:
    """Every linear's bisection at once (the same steps as one bisection per linear)."""
    low = torch.full_like(budgets, floor)
    high = torch.ones_like(budgets)
    at_floor = pooled.variances(low) <= budgets
    for _ in range(iterations):
        middle = (low + high) / 2
        within = pooled.variances(middle) <= budgets
        high, low = torch.where(within, middle, high), torch.where(within, low, middle)
    return torch.where(at_floor, torch.full_like(high, floor), high)


def solve_weight_ratios(pool: Pool, budgets: Sequence[float | None], floor: float) -> list[float]:
    """Each sampled linear's nu against its budget, on the pooled row scores (1 where the
    budget is ``None``: a layer whose weight gradient is not sampled). Each calibration's
    scores are sorted once, on first use, and pooled by every later update."""
    sites = [site for site, budget in enumerate(budgets) if budget is not None]
    ratios = [1.0] * len(budgets)
    if not sites:
        return ratios
    pooled = _WeightedScores([[(w, stats.sorted_scores(site)) for w, stats in pool] for site in sites])
    solved = _solve_nus(pooled, torch.tensor([budgets[site] for site in sites], dtype=torch.float64), floor)
    for site, nu in zip(sites, solved.tolist()):
        ratios[site] = nu
    return ratios


def summary(stats: CalibrationStats, above: Sequence[int | None], act_ratios: Sequence[float],
            weight_ratios: Sequence[float]) -> Measurement:
    """This calibration's variances at the new ratios, in the form ``Controller.stats`` reports."""
    return Measurement(
        stats.sgd_variances(), act_variances(stats, above, act_ratios),
        [float(stats.sorted_scores(site).variances(nu).sum()) if nu < 1.0 else 0.0
         for site, nu in enumerate(weight_ratios)],
        stats.block_norms(), stats.row_scores, list(act_ratios))


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
        """The remembered calibrations with weights ``decay ** age`` (newest: 1)."""
        newest = len(self.history) - 1
        return [(decay ** (newest - age), stats) for age, stats in enumerate(self.history)]

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
        return {"history": [stats.state_dict() for stats in self.history], "steps": list(self.steps),
                "step": self.step,
                "direction": self.direction, "interval": self.interval, "next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [CalibrationStats.from_state_dict(s) for s in state["history"]]
        # Checkpoints from before the window: their calibrations count as recent.
        self.steps = [int(s) for s in state.get("steps", [state["next_step"]] * len(self.history))]
        self.step, self.direction = float(state["step"]), int(state["direction"])
        self.interval, self.next_step = int(state["interval"]), int(state["next_step"])
