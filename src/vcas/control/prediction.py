"""Predicting the variance sampling adds, from what an adaptive calibration step recorded.

- Activation sampling: a sample kept with weight ``w_i`` (``1/p`` products along the nested
  samplers) adds ``(E[w_i^2] - 1) ||c_i||^2`` to a layer's gradient variance, where ``c_i`` is
  the sample's contribution to the layer's weight gradient. ``E[w_i^2]`` comes from simulating
  the samplers on the recorded per-sample norms: exactly for the top sampler, by Monte Carlo
  with common random numbers (a fixed generator) below, so a bisection sees a fixed function.
- Weight sampling: the analytic SampleW variance of the recorded row scores, in closed form at
  any keep ratio (:class:`vcas.sampling.SortedScores`).

Blocks are named in the records; the simulation works on their positions in plan order, with
``above[i]`` the position of the block whose sampler the gradient passed first (or None).
Assumption: samples are independent in the backward (no BatchNorm in training mode between a
sampler and the layers below it); the per-sample estimates are then unbiased.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..sampling import ShareSchedule, SortedScores, capped_proportional_probs
from .statistics import CalibrationStats, Measurement

# Monte Carlo draws of the samplers above a nested one (the top sampler is exact).
SIMULATION_DRAWS = 64


def positions(norms: Mapping[str, torch.Tensor], blocks: Sequence[str]) -> dict[int, torch.Tensor]:
    """A pass's norms keyed by block position instead of name (in the order recorded)."""
    index = {name: i for i, name in enumerate(blocks)}
    return {index[name]: value for name, value in norms.items()}


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
    moments = _stacked_moments(_stack_norms(passes), above, ratios, _drawing_from(generator), draws)
    return [{block: m[index] for block, m in moments.items()} for index in range(len(passes))]


def _stack_norms(passes: Sequence[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Per block, the norms of same-signature passes as one ``(passes, n)`` float64 tensor."""
    return {block: torch.stack([p[block].double().flatten() for p in passes]) for block in passes[0]}


# ``uniforms(draws, n, dtype)``: the next ``(draws, n)`` uniform draws of a simulation.
Uniforms = Callable[[int, int, torch.dtype], torch.Tensor]


def _drawing_from(generator: torch.Generator) -> Uniforms:
    return lambda draws, n, dtype: _stratified_uniforms(draws, n, generator, dtype)


def _stacked_moments(stacked: dict[int, torch.Tensor], above: Sequence[int | None],
                     ratios: Sequence[float], uniforms: Uniforms,
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
            kept = uniforms(draws, n, probs.dtype) < probs
            weights = torch.where(kept, incoming / safe, 0.0)
        memo[block] = (weights, moments)
        return memo[block]

    results = {}
    for block in stacked:
        _, moments = visit(block)
        if moments is not None:
            results[block] = moments
    return results


def _stratified_uniforms(draws: int, n: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``(draws, n)`` uniform draws, stratified per sample: each sample's draws fall once into
    each of the ``draws`` equal intervals of [0, 1), in a random order of their own (a Latin
    hypercube). Each is uniform, so the moments stay unbiased, but the share of draws that keep
    a sample is its probability to within 1 / draws instead of binomial noise. Near keep ratios
    of 1, where a sampler drops a sample in a few draws out of 64, plain draws mis-estimate the
    added variance below a nested sampler (mostly from below: it is a skewed, rare-event mean)."""
    offsets = torch.rand((draws, n), generator=generator, dtype=dtype)
    strata = torch.argsort(torch.rand((draws, n), generator=generator, dtype=torch.float64), dim=0)
    below_one = 1 - torch.finfo(dtype).eps  # a draw of 1 would drop a sample kept with p = 1
    return ((strata.to(dtype) + offsets) / draws).clamp_(max=below_one)


def act_variances(stats: CalibrationStats, above: Sequence[int | None],
                  ratios: Sequence[float]) -> dict[str, float]:
    """Per measured layer, the variance activation sampling at ``ratios`` adds to its gradient
    on this calibration's samples: ``sum_i (E[w_i^2] - 1) ||c_i||^2`` (deterministic: each
    pass's simulation uses the same fixed seed, so bisection sees a fixed function)."""
    passes = {id(r.pass_norms): positions(r.pass_norms, stats.blocks)
              for records in stats.layers.values() for r in records if r.block is not None and r.pass_norms}
    moments = dict(zip(passes, passes_second_moments(list(passes.values()), above, ratios)))
    index = {name: i for i, name in enumerate(stats.blocks)}
    variances = {}
    for name, records in stats.layers.items():
        total = 0.0
        for record in records:
            if record.block is None:
                continue  # above every sampler: never sampled
            moment = moments.get(id(record.pass_norms), {}).get(index[record.block])
            if moment is not None and moment.numel() == record.squared_norms.numel():
                total += float((_added_variance_factor(moment) * record.squared_norms).sum())
        variances[name] = stats.scales[name] * total
    return variances


def _added_variance_factor(moment: torch.Tensor) -> torch.Tensor:
    """``E[w_i^2] - 1`` per sample: how much of ``||c_i||^2`` sampling adds (0 where never kept)."""
    return (moment - 1.0).clamp(min=0.0) * (moment > 0)


def _fixed_generator() -> torch.Generator:
    """The simulation's draws: the same for every pass and every evaluation (common random numbers)."""
    return torch.Generator().manual_seed(0)


class CommonDraws:
    """The fixed generator's draws, kept across evaluations (and across decisions, when the
    controller holds one): a bisection evaluates the same passes a dozen times, each from a
    fresh :func:`_fixed_generator`, and which blocks draw (those that sample at the evaluated
    ratios) decides which draws each block gets. So the draws are kept by the shapes drawn
    before them in an evaluation, with the generator's state after them; an evaluation gets
    exactly the draws a fresh generator would give, without drawing (or sorting, for the
    strata) again. At most ``limit`` sequences are kept (batch sizes that vary would add new
    ones without end); past it the cache starts over."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self.kept: dict[tuple[tuple[int, int, torch.dtype], ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def stream(self) -> Uniforms:
        """The draws of one fresh generator, in order."""
        drawn: tuple[tuple[int, int, torch.dtype], ...] = ()

        def uniforms(draws: int, n: int, dtype: torch.dtype) -> torch.Tensor:
            nonlocal drawn
            key = drawn + ((draws, n, dtype),)
            if key not in self.kept:
                generator = _fixed_generator()
                if drawn:
                    generator.set_state(self.kept[drawn][1])
                values = _stratified_uniforms(draws, n, generator, dtype)
                if len(self.kept) >= self.limit:
                    self.kept = {}  # the state after the prefix is read above: nothing else is needed
                self.kept[key] = (values, generator.get_state())
            drawn = key
            return self.kept[key][0]

        return uniforms


Pool = Sequence[tuple[float, CalibrationStats]]
# ``(act_variance, budget)``: a pool's predicted V_act as a function of the keep ratios, and
# the most it may be.
Constraint = tuple[Callable[[Sequence[float]], float], float]


def pooled_sgd_variances(pool: Pool) -> dict[str, float]:
    """Per measured layer, the weighted sum of the calibrations' SGD variances."""
    weighted = [(weight, stats.sgd_variances()) for weight, stats in pool]
    names = list(weighted[0][1]) if weighted else []
    return {name: sum(weight * values[name] for weight, values in weighted) for name in names}


def pooled_block_norms(pool: Pool) -> list[list[torch.Tensor | None]]:
    return [batch for _, stats in pool for batch in stats.block_norms()]


def pooled_act_variance(pool: Pool, above: Sequence[int | None], ratios: Sequence[float]) -> float:
    """The weighted sum over calibrations of the total predicted V_act at ``ratios``
    (the sum over layers of :func:`act_variances`, computed per pass and block)."""
    return PooledActVariance(pool, above)(ratios)


class PooledActVariance:
    """:func:`pooled_act_variance` of one pool at any ratios, as a function of the ratios.

    The pool's per-pass, per-block aggregated contributions are gathered once and stacked (pool
    weight folded in) per group of passes with the same blocks and sizes, so an evaluation is a
    few tensor ops per group and block; each ratio vector is evaluated once (the bisection and
    the decision's own reads of the same ratios share it).

    Args:
        pool: weighted calibrations.
        above: per block position, the position of the block whose sampler the gradient
            passes first (or None).
        draws: the simulation's common draws, shared with other evaluators (a fresh cache if
            None; the draws are the same either way).
    """

    def __init__(self, pool: Pool, above: Sequence[int | None], draws: CommonDraws | None = None) -> None:
        passes = [(weight, positions(norms, stats.blocks), positions(sums, stats.blocks))
                  for weight, stats in pool for norms, sums in stats.excess_weights()]
        self.groups = []
        for indices in _same_signature([norms for _, norms, _ in passes]):
            group = [passes[i] for i in indices]
            norms = _stack_norms([n for _, n, _ in group])
            excess = {block: torch.stack([_weighted_excess(weight, sums.get(block), stacked.shape[1])
                                          for weight, _, sums in group])
                      for block, stacked in norms.items()}
            self.groups.append((norms, excess))
        self.above = list(above)
        self.draws = draws if draws is not None else CommonDraws()
        self.evaluated: dict[tuple[float, ...], float] = {}

    def __call__(self, ratios: Sequence[float]) -> float:
        key = tuple(ratios)
        if key not in self.evaluated:
            self.evaluated[key] = self._variance(key)
        return self.evaluated[key]

    def _variance(self, ratios: Sequence[float]) -> float:
        total = 0.0
        for norms, excess in self.groups:
            moments = _stacked_moments(norms, self.above, ratios, self.draws.stream())
            for block, moment in moments.items():
                total += float((_added_variance_factor(moment) * excess[block]).sum())
        return total


def _weighted_excess(weight: float, excess: torch.Tensor | None, n: int) -> torch.Tensor:
    """A pass's excess at one block times its pool weight; zeros where it has none (or one of
    another size), which adds nothing."""
    if excess is None or excess.numel() != n:
        return torch.zeros(n, dtype=torch.float64)
    return weight * excess.double().flatten()


def solve_share(pool: Pool, above: Sequence[int | None], budget: float, iterations: int = 10, *,
                also: Sequence[tuple[Pool, float]] = (), dense_above: Sequence[float] | None = None) -> float:
    """The smallest s in [0, 1] whose schedule (from the pool's block norms) keeps the pool's
    predicted V_act within ``budget`` and, for each ``(pool, budget)`` in ``also``, that pool's
    within its budget. With ``dense_above``, the schedule's ratios are rounded up to 1 where
    they are above it (:func:`vcas.sampling.share_schedule`), as the decision applies them: the
    budget goes to the blocks where sampling saves work."""
    draws = CommonDraws()
    constraints = [(PooledActVariance(part, above, draws), limit) for part, limit in [(pool, budget), *also]]
    return smallest_share(ShareSchedule(pooled_block_norms(pool), dense_above), constraints, iterations)


def smallest_share(schedule: ShareSchedule, constraints: Sequence[Constraint], iterations: int = 10,
                   near: float | None = None) -> float:
    """The smallest s in [0, 1] (to ``2 ** -iterations``) whose ratios ``schedule(s)`` meet every
    constraint (1 when the schedule has no batch of norms). Each constraint only loosens as s
    grows, so bisection finds it; the constraints are tried in the order given and the first
    one broken ends a trial (put the cheap first).

    Without ``near`` the search tries s = 0, then bisects [0, 1]. With ``near`` (a share close to
    the answer: the controller passes the share in force) it starts there and widens a bracket
    by doubling steps from ``2 ** -NEAR_BITS`` before it bisects: the same point of the
    ``2 ** -iterations`` grid when the constraints loosen with s. An answer within
    ``2 ** -NEAR_BITS`` of ``near`` takes 6 trials instead of 11 (each trial simulates the
    samplers over the whole pool); one more than 1/16 away takes up to 16. Where the
    simulated variance is not monotone in s the two searches may stop at different points, each
    a point where the constraints hold and the one below breaks them."""
    if not schedule.n_batches:
        return 1.0
    grid = 2 ** iterations

    def within(point: int) -> bool:
        ratios = schedule(point / grid)
        return all(act_variance(ratios) <= limit for act_variance, limit in constraints)

    if near is None:
        start, step = 0, grid
    else:
        start, step = min(grid, max(0, round(near * grid))), max(1, grid >> NEAR_BITS)
    low, high = _bracket(within, start, step, grid)
    while high - low > 1:  # within(low) is broken (or low = -1), within(high) holds (or high = grid)
        middle = (low + high) // 2
        if within(middle):
            high = middle
        else:
            low = middle
    return high / grid


# A warm-started share search first looks 2 ** -NEAR_BITS either side of the last answer.
NEAR_BITS = 6


def _bracket(within: Callable[[int], bool], start: int, step: int, grid: int) -> tuple[int, int]:
    """Grid points ``(low, high)`` around the smallest point that is within: from ``start``,
    steps that double, down while the point holds and up while it is broken. ``low = -1`` stands
    for "below 0"; ``high = grid`` (s = 1, nothing sampled) holds without a trial."""
    if start >= grid or within(start):
        high = start
        while True:
            low = high - step
            if low < 0:
                return -1, high
            if not within(low):
                return low, high
            high, step = low, 2 * step
    low = start
    while True:
        high = low + step
        if high >= grid:
            return low, grid
        if within(high):
            return low, high
        low, step = high, 2 * step


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
    def of_tensors(cls, scores: Sequence[tuple[float, torch.Tensor]]) -> _WeightedScores:
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


def solve_weight_ratios(pool: Pool, budgets: Mapping[str, float | None], floor: float) -> dict[str, float]:
    """Each sampled linear's nu against its budget, on the pooled row scores (1 where the
    budget is ``None``: a layer whose weight gradient is not sampled). Each calibration's
    scores are sorted once, on first use, and pooled by every later update."""
    sites = [site for site, budget in budgets.items() if budget is not None]
    ratios = dict.fromkeys(budgets, 1.0)
    if not sites:
        return ratios
    pooled = _WeightedScores([[(w, stats.sorted_scores(site)) for w, stats in pool] for site in sites])
    solved = _solve_nus(pooled, torch.tensor([budgets[site] for site in sites], dtype=torch.float64), floor)
    for site, nu in zip(sites, solved.tolist()):
        ratios[site] = nu
    return ratios


def summary(stats: CalibrationStats, above: Sequence[int | None], act_ratios: Sequence[float],
            weight_ratios: Mapping[str, float]) -> Measurement:
    """This calibration's variances at the new ratios, in the form ``Controller.stats`` reports."""
    return Measurement(
        stats.sgd_variances(), act_variances(stats, above, act_ratios),
        {site: float(stats.sorted_scores(site).variances(nu).sum()) if nu < 1.0 else 0.0
         for site, nu in weight_ratios.items()},
        stats.block_norms(), dict(stats.row_scores), list(act_ratios))
