"""The sampling mathematics of VCAS as pure functions on tensors.

Nothing here holds state: randomness comes from an explicit draw (a ``torch.Generator``, or
the expectation of the draw for deterministic tests).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def capped_proportional_probs(scores: torch.Tensor, budget: float) -> torch.Tensor:
    """Keep probabilities ``p`` minimising ``sum (1/p - 1) x^2`` under ``sum p = budget``.

    The solution keeps the largest scores with probability 1 ("capped") and gives the rest
    ``p_i = c * x_i`` with ``c`` such that the probabilities add up to the budget. Scores of zero
    get probability 0 and are never kept. A budget at or above the number of positive scores
    keeps every positive score with probability 1.

    Args:
        scores: non-negative, finite scores (e.g. per-sample gradient norms); a 1-D tensor, or
            a 2-D tensor whose rows are solved independently (the controller's simulations).
        budget: expected number of kept items per row, ``k = ratio * n``.
    """
    scores = scores.detach()
    scores = scores if scores.dtype == torch.float64 else scores.float()
    rows = scores.reshape(-1, scores.shape[-1]) if scores.dim() else scores.reshape(1, 1)
    if budget <= 0 or rows.numel() == 0:
        return torch.zeros_like(scores)
    if scores.dim() == 1 and scores.device.type == "cpu":
        probs = finite_capped_vector(scores, budget)
        if probs is None:
            raise ValueError("capped_proportional_probs: the scores must be finite")
        return probs
    positive = rows > 0
    keep_all = positive.sum(1, keepdim=True) <= budget
    probs = torch.where(keep_all, positive.to(rows.dtype), _capped_rows(rows, budget))
    return probs.reshape(scores.shape)


# Fewer than ``budget`` scores are capped, so only the ``ceil(budget)`` largest are ranked: a
# partial top-k costs a fraction of a full sort. The sampled ops solve once per layer and step,
# so the solvers below are written in few tensor ops.

def _fitting_ranks(rows: torch.Tensor, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``fits[:, m]``: whether the (m+1)-th largest score stays below 1 with the m largest
    capped, at ``c = (k - m) / tail[m]``; ``tail[:, m]``: the sum of the scores ranked below the
    m largest, in float64 (a small difference of large sums under heavy capped scores). The
    solution caps the smallest fitting m, which exists for rows with more than ``budget``
    positive scores."""
    top = torch.topk(rows, min(rows.shape[1], math.ceil(budget)), dim=1).values
    total = rows.sum(1, keepdim=True, dtype=torch.float64)
    tail = (total + top) - top.cumsum(1, dtype=torch.float64)
    m = torch.arange(top.shape[1], device=rows.device, dtype=torch.float64)
    return (budget - m) * top <= tail, tail


def _capped_rows(rows: torch.Tensor, budget: float) -> torch.Tensor:
    """The solution for every row, without a host sync (the GPU's and the simulations' case)."""
    fits, tail = _fitting_ranks(rows, budget)
    n_capped = fits.int().argmax(dim=1, keepdim=True)
    free_tail = tail.gather(1, n_capped).clamp(min=torch.finfo(torch.float64).tiny)
    scale = ((budget - n_capped.double()) / free_tail).to(rows.dtype)
    return (rows * scale).clamp_(max=1.0)


def capped_probs_on_device(scores: torch.Tensor, budget: torch.Tensor, width: int) -> torch.Tensor:
    """:func:`capped_proportional_probs` of a 1-D vector for a budget held on the device (a
    0-dim tensor), with no host sync: ``width`` bounds the number of capped scores from above
    (any ``width >= ceil(budget)`` will do; the budget's bound on the host is enough)."""
    scores = scores.detach().float()
    budget = budget.to(torch.float64)
    width = max(1, min(scores.numel(), width))
    top = torch.topk(scores, width).values.double()  # 0-dim sums would not promote a vector
    total = scores.sum(dtype=torch.float64)
    tail = (total + top) - top.cumsum(0)
    m = torch.arange(width, device=scores.device, dtype=torch.float64)
    fits = ((budget - m) * top <= tail) & (m < budget)  # fewer than the budget are capped
    n_capped = fits.int().argmax().unsqueeze(0)
    free_tail = tail.gather(0, n_capped).clamp(min=torch.finfo(torch.float64).tiny)
    scale = ((budget - n_capped.double()) / free_tail).clamp(max=torch.finfo(torch.float32).max)
    probs = (scores * scale.to(scores.dtype)).clamp_(min=0.0, max=1.0)
    positive = scores > 0
    # Keep every positive score when they fit the budget, or when rounding leaves no rank that
    # fits (a tail below float64's resolution): exact for them, never biased.
    keep_all = (positive.sum() <= budget) | ~fits.any()
    return torch.where(keep_all, positive.to(scores.dtype), probs)


def finite_capped_vector(scores: torch.Tensor, budget: float) -> torch.Tensor | None:
    """:func:`capped_proportional_probs` of a float 1-D CPU vector with ``budget > 0``, or
    ``None`` if a score is not finite: the solve sums the scores anyway, so SampleW learns
    whether its gradient is finite without a check of its own.

    On the CPU a host sync is free: the few largest scores are walked in Python (the solution
    caps fewer than ``budget``, and usually a handful), so the whole solve is a handful of
    tensor ops."""
    tail = float(scores.sum(dtype=torch.float64))  # the sum below the n_capped largest
    if not math.isfinite(tail):
        return None
    ranks = min(scores.numel(), math.ceil(budget))
    # Usually only a handful of scores are capped: rank a few first, all ``ranks`` if needed.
    for k in sorted({min(ranks, _FEW_RANKS), ranks}):
        top = torch.topk(scores, k).values.tolist()
        if not top or top[-1] <= 0:  # at most budget positive scores: keep them all
            return (scores > 0).to(scores.dtype)
        n_capped, rest = _walk_capped(top, budget, tail)
        if n_capped < k - 1 or k == ranks:
            break
    tail = rest
    scale = (budget - n_capped) / max(tail, torch.finfo(torch.float64).tiny)
    # Bounded, or a rounded-away tail would overflow the scores' dtype and turn 0 * inf into NaN.
    return (scores * min(scale, torch.finfo(scores.dtype).max)).clamp_(max=1.0)


_FEW_RANKS = 32


def _walk_capped(top: list[float], budget: float, tail: float) -> tuple[int, float]:
    """The number of capped scores among the ``top`` ones (descending) and the sum below them:
    the first rank m whose score fits, ``(budget - m) * score <= tail[m]``."""
    n_capped = 0
    for n_capped, score in enumerate(top):
        if (budget - n_capped) * score <= tail:
            return n_capped, tail
        tail -= score
    return n_capped, tail


class BernoulliDraw:
    """Independent Bernoulli(p) keep decisions from ``generator`` (the samplers' draw)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def keeps(self, probs: torch.Tensor) -> torch.Tensor:
        """A boolean keep decision per item."""
        uniform = torch.rand(probs.shape, generator=self.generator, device=probs.device, dtype=probs.dtype)
        return uniform < probs


class ExpectedDraw:
    """Each keep decision replaced by its expectation, ``p`` itself.

    Backpropagation is linear in the incoming gradient, so with every keep mask replaced by its
    expectation (given the draws above) an unbiased sampler must reproduce the exact gradient,
    up to rounding: a deterministic test of the re-weighting of every sampler.
    """

    def keeps(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.clone()


Draw = BernoulliDraw | ExpectedDraw


def sampled_weights(probs: torch.Tensor, draw: Draw) -> torch.Tensor:
    """The unbiased weight of each item: ``keep / p`` (0 where dropped or ``p = 0``)."""
    keeps = draw.keeps(probs)
    if keeps.dtype == torch.bool:
        return torch.where(keeps, _inverse(probs), torch.zeros_like(probs))
    return torch.where(keeps > 0, keeps * _inverse(probs), torch.zeros_like(probs))


def sampled_rows(probs: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
    """The same draw as :func:`sampled_weights` for a vector of probabilities, returned as the
    kept indices and their weights: an op that gathers the kept rows needs no dense weight vector."""
    keeps = draw.keeps(probs)
    if keeps.dtype == torch.bool:
        kept = torch.nonzero(keeps).squeeze(1)
        return kept, _inverse(probs.index_select(0, kept))
    kept = torch.nonzero(keeps > 0).squeeze(1)
    return kept, keeps.index_select(0, kept) * _inverse(probs.index_select(0, kept))


def bernoulli_weights(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw independent Bernoulli(p) keeps and return the unbiased weights: ``keep / p`` (0 if dropped)."""
    return sampled_weights(probs, BernoulliDraw(generator))


def bernoulli_keep(probs: torch.Tensor, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bernoulli_weights`'s draw as the kept indices and their weights ``1/p``."""
    return sampled_rows(probs, BernoulliDraw(generator))


def _inverse(probs: torch.Tensor) -> torch.Tensor:
    return 1.0 / probs.clamp(min=torch.finfo(probs.dtype).tiny)


def sampling_variance(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Added variance ``sum (1/p - 1) x^2`` of Bernoulli sampling with re-weighting.

    Items with ``p = 0`` must have ``x = 0`` (they contribute nothing), as the capped-proportional
    rule guarantees. This is the analytic weight-gradient variance of SampleW (docs/method.md) when
    ``scores`` are the row scores ``||dY_r|| * ||X_r||``.
    """
    kept = probs > 0
    p = probs[kept].double()
    return ((1.0 / p - 1.0) * scores[kept].double() ** 2).sum()


class SortedScores:
    """Rows of scores sorted once (descending, zero-padded to a common length, float64), so the
    added variance of capped-proportional sampling can be evaluated at any budget without
    sorting again: the controller's bisections evaluate it many times on the same scores."""

    def __init__(self, rows: list[torch.Tensor]) -> None:
        width = max((r.numel() for r in rows), default=0)
        padded = torch.zeros(len(rows), width, dtype=torch.float64)
        for i, row in enumerate(rows):
            padded[i, :row.numel()] = row.detach().double().flatten()
        self.ordered, _ = torch.sort(padded, dim=1, descending=True)
        # tail[:, m] and tail_squares[:, m]: sums over the scores ranked below the m largest.
        self.tail = self.ordered.flip(1).cumsum(1).flip(1)
        self.tail_squares = self.ordered.pow(2).flip(1).cumsum(1).flip(1)
        self.positive = (self.ordered > 0).sum(1)

    @classmethod
    def stack(cls, parts: Sequence[SortedScores]) -> SortedScores:
        """The rows of several sorted sets in one, without sorting again (zero padding at the
        end of a descending row changes none of its sums)."""
        stacked = cls([])
        if not parts:
            return stacked
        width = max(part.ordered.shape[1] for part in parts)

        def padded(name: str) -> torch.Tensor:
            return torch.cat([F.pad(getattr(part, name), (0, width - part.ordered.shape[1]))
                              for part in parts])

        stacked.ordered, stacked.tail, stacked.tail_squares = (
            padded("ordered"), padded("tail"), padded("tail_squares"))
        stacked.positive = torch.cat([part.positive for part in parts])
        return stacked

    def variances(self, ratio: float | torch.Tensor) -> torch.Tensor:
        """Per row, :func:`sampling_variance` of :func:`capped_proportional_probs` at budget
        ``ratio * (number of positive scores)``, in closed form (``ratio``: one for every row, or
        a tensor of one per row).

        With the m largest scores capped and ``c = (k - m) / tail[m]``, every uncapped score adds
        ``(1/(c x) - 1) x^2``, which sums to ``tail[m]^2 / (k - m) - tail_squares[m]``."""
        if self.ordered.numel() == 0:
            return torch.zeros(self.ordered.shape[0], dtype=torch.float64)
        budget = (ratio * self.positive.double()).unsqueeze(1)
        # Fewer than ``budget`` scores are capped: only the first ceil(budget) ranks can fit.
        width = min(self.ordered.shape[1], math.ceil(float(budget.max())) + 1)
        ordered, tails = self.ordered[:, :width], self.tail[:, :width]
        m = torch.arange(width, dtype=torch.float64)
        fits = (budget - m) * ordered <= tails
        n_capped = fits.int().argmax(dim=1, keepdim=True)
        tail = tails.gather(1, n_capped)
        free = (budget - n_capped.double()).clamp(min=torch.finfo(torch.float64).tiny)
        variance = (tail.pow(2) / free - self.tail_squares.gather(1, n_capped)).clamp(min=0.0)
        keep_all = self.positive.unsqueeze(1).double() <= budget
        return torch.where(keep_all, torch.zeros_like(variance), variance).squeeze(1)


def norm_share_fraction(norms: torch.Tensor, share: float) -> float:
    """The smallest fraction ``n/N`` such that the ``n`` largest norms hold ``share`` of their sum.

    At least one item is always kept, so the result lies in ``[1/N, 1]``. All-zero norms give 1/N.
    """
    return _RankedNorms(norms).fraction(share)


class _RankedNorms:
    """One batch's norms sorted once, for :func:`norm_share_fraction` at many shares."""

    def __init__(self, norms: torch.Tensor) -> None:
        ordered, _ = torch.sort(norms.detach().double().flatten(), descending=True)
        self.n = ordered.numel()
        self.total = float(ordered.sum())
        self.cumulative = ordered.cumsum(0).tolist()

    def fraction(self, share: float) -> float:
        if self.n == 0:
            return 1.0
        if self.total <= 0:
            return 1.0 / self.n
        # The tolerance keeps share = 1 from demanding more than all of the items through rounding.
        needed = bisect.bisect_left(self.cumulative, share * self.total * (1 - 1e-12)) + 1
        return min(max(needed, 1), self.n) / self.n


def monotone_schedule(fractions: list[float]) -> list[float]:
    """Keep ratios ``rho_l = max_{j <= l} p_j`` (input side first), so ratios never grow going down."""
    schedule, running = [], 0.0
    for fraction in fractions:
        running = max(running, fraction)
        schedule.append(running)
    return schedule


def rounded_up_where_dense(ratios: Sequence[float], dense_above: Sequence[float]) -> list[float]:
    """Each block's keep ratio (input side first), or 1 where it is above ``dense_above`` for
    that block: there the block's backward runs its dense products (nearly every row is
    non-zero), so sampling would add variance and save next to nothing. A rounded block stays
    at or below every block above it, as the schedule requires: a block whose ratio equals the
    one above samples nothing, like a block at 1."""
    rounded = [1.0 if ratio > ceiling else ratio for ratio, ceiling in zip(ratios, dense_above, strict=True)]
    return list(itertools.accumulate(reversed(rounded), min))[::-1]  # the smallest from the output down


def share_schedule(block_norms: list[list[torch.Tensor | None]], share: float,
                   dense_above: Sequence[float] | None = None) -> list[float]:
    """rho(s): per block, the mean over calibration batches of :func:`norm_share_fraction`, made
    monotone with :func:`monotone_schedule`. ``block_norms[batch][block]`` holds per-sample norms;
    a block whose gradient was never seen (``None``) keeps everything, the conservative choice.
    With ``dense_above`` (one ratio per block), :func:`rounded_up_where_dense` of that."""
    return ShareSchedule(block_norms, dense_above)(share)


class ShareSchedule:
    """:func:`share_schedule` of fixed norms at many shares, sorting each batch's norms once
    (the adaptive controller's bisection evaluates a dozen shares per calibration).
    ``n_batches``: the number of batches of norms it was given."""

    def __init__(self, block_norms: list[list[torch.Tensor | None]],
                 dense_above: Sequence[float] | None = None) -> None:
        n_blocks = len(block_norms[0]) if block_norms else 0
        self.n_batches = len(block_norms)
        self.dense_above = dense_above
        self.blocks = [[_RankedNorms(norms) for norms in (batch[block] for batch in block_norms)
                        if norms is not None]
                       for block in range(n_blocks)]

    def __call__(self, share: float) -> list[float]:
        schedule = monotone_schedule([sum(r.fraction(share) for r in seen) / len(seen) if seen else 1.0
                                      for seen in self.blocks])
        return schedule if self.dense_above is None else rounded_up_where_dense(schedule, self.dense_above)
