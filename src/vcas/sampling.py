"""The sampling mathematics of VCAS as pure functions on tensors (METHOD.md sections 3-5).

Nothing here holds state: randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

import torch


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
    positive = rows > 0
    if budget <= 0:
        return torch.zeros_like(scores)
    low_budget = budget <= 0.5 * rows.shape[1]
    probs = _water_filling(rows, budget) if rows.device.type == "cpu" and low_budget else None
    if probs is None:
        probs = _sorted_solution(rows, budget)
    keep_all = positive.sum(1, keepdim=True) <= budget
    probs = torch.where(keep_all, positive.to(rows.dtype), probs)
    return probs.reshape(scores.shape)


# Water-filling passes tried before sorting: a pass is a few element-wise ops, and budgets of at
# most half the scores (where sampling pays) cap few scores and converge in one to three passes.
_WATER_FILLING_PASSES = 3


def _water_filling(rows: torch.Tensor, budget: float) -> torch.Tensor | None:
    """The same solution without sorting, for the CPU, where the host sync of the convergence
    test costs nothing: cap every score that ``c * x > 1`` pushes over 1, recompute ``c`` on the
    rest, repeat until no new score is capped (``c`` only grows, so the capped set grows to the
    solution's). ``None`` if that takes more than a few passes."""
    tiny = torch.finfo(rows.dtype).tiny
    capped = torch.zeros_like(rows, dtype=torch.bool)
    for _ in range(_WATER_FILLING_PASSES):
        free_sum = torch.where(capped, 0.0, rows).sum(1, keepdim=True)
        scale = (budget - capped.sum(1, keepdim=True).to(rows.dtype)) / free_sum.clamp(min=tiny)
        grown = capped | (rows * scale > 1.0)
        if torch.equal(grown, capped):
            return torch.where(capped, 1.0, rows * scale)
        capped = grown
    return None


def _sorted_solution(rows: torch.Tensor, budget: float) -> torch.Tensor:
    ordered, _ = torch.sort(rows, dim=1, descending=True)
    # tail[:, m] = sum of the scores ranked below the m largest (m capped items).
    tail = ordered.flip(1).cumsum(1).flip(1)
    m = torch.arange(rows.shape[1], device=rows.device, dtype=rows.dtype)
    # The smallest m for which the (m+1)-th largest score is not capped by c = (k - m) / tail[m]
    # (it exists whenever the budget is below the number of positive scores).
    fits = (budget - m) * ordered <= tail
    n_capped = fits.int().argmax(dim=1, keepdim=True)
    free_tail = tail.gather(1, n_capped)
    scale = (budget - n_capped.to(rows.dtype)) / free_tail.clamp(min=torch.finfo(rows.dtype).tiny)
    return (rows * scale).clamp_(max=1.0)


def bernoulli_weights(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw independent Bernoulli(p) keeps and return the unbiased weights: ``keep / p`` (0 if dropped)."""
    uniform = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    kept = uniform < probs
    return torch.where(kept, 1.0 / probs.clamp(min=torch.finfo(probs.dtype).tiny), torch.zeros_like(probs))


def sampling_variance(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Added variance ``sum (1/p - 1) x^2`` of Bernoulli sampling with re-weighting.

    Items with ``p = 0`` must have ``x = 0`` (they contribute nothing), as the capped-proportional
    rule guarantees. This is the analytic weight-gradient variance of METHOD.md section 4 when
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

    def variances(self, ratio: float) -> torch.Tensor:
        """Per row, :func:`sampling_variance` of :func:`capped_proportional_probs` at budget
        ``ratio * (number of positive scores)``, in closed form.

        With the m largest scores capped and ``c = (k - m) / tail[m]``, every uncapped score adds
        ``(1/(c x) - 1) x^2``, which sums to ``tail[m]^2 / (k - m) - tail_squares[m]``."""
        if self.ordered.numel() == 0:
            return torch.zeros(self.ordered.shape[0], dtype=torch.float64)
        budget = (ratio * self.positive.double()).unsqueeze(1)
        m = torch.arange(self.ordered.shape[1], dtype=torch.float64)
        fits = (budget - m) * self.ordered <= self.tail
        n_capped = fits.int().argmax(dim=1, keepdim=True)
        tail = self.tail.gather(1, n_capped)
        free = (budget - n_capped.double()).clamp(min=torch.finfo(torch.float64).tiny)
        variance = (tail.pow(2) / free - self.tail_squares.gather(1, n_capped)).clamp(min=0.0)
        keep_all = self.positive.unsqueeze(1).double() <= budget
        return torch.where(keep_all, torch.zeros_like(variance), variance).squeeze(1)


def norm_share_fraction(norms: torch.Tensor, share: float) -> float:
    """The smallest fraction ``n/N`` such that the ``n`` largest norms hold ``share`` of their sum.

    At least one item is always kept, so the result lies in ``[1/N, 1]``. All-zero norms give 1/N.
    """
    n = norms.numel()
    if n == 0:
        return 1.0
    ordered, _ = torch.sort(norms.detach().double().flatten(), descending=True)
    total = float(ordered.sum())
    if total <= 0:
        return 1.0 / n
    cumulative = ordered.cumsum(0)
    # The tolerance keeps share = 1 from demanding more than all of the items through rounding.
    needed = int((cumulative < share * total * (1 - 1e-12)).sum()) + 1
    return min(max(needed, 1), n) / n


def monotone_schedule(fractions: list[float]) -> list[float]:
    """Keep ratios ``rho_l = max_{j <= l} p_j`` (input side first), so ratios never grow going down."""
    schedule, running = [], 0.0
    for fraction in fractions:
        running = max(running, fraction)
        schedule.append(running)
    return schedule


def share_schedule(block_norms: list[list[torch.Tensor | None]], share: float) -> list[float]:
    """rho(s): per block, the mean over calibration batches of :func:`norm_share_fraction`, made
    monotone with :func:`monotone_schedule`. ``block_norms[batch][block]`` holds per-sample norms;
    a block whose gradient was never seen (``None``) keeps everything, the conservative choice."""
    n_blocks = len(block_norms[0]) if block_norms else 0
    fractions = []
    for block in range(n_blocks):
        seen = [batch[block] for batch in block_norms if batch[block] is not None]
        fractions.append(sum(norm_share_fraction(n, share) for n in seen) / len(seen) if seen else 1.0)
    return monotone_schedule(fractions)
