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
        scores: 1-D tensor of non-negative, finite scores (e.g. per-sample gradient norms).
        budget: expected number of kept items, ``k = ratio * n``.
    """
    scores = scores.detach().float()
    positive = scores > 0
    n_positive = int(positive.sum())
    if n_positive == 0 or budget <= 0:
        return torch.zeros_like(scores)
    if budget >= n_positive:
        return positive.float()
    ordered, _ = torch.sort(scores, descending=True)
    # tail[m] = sum of all scores ranked below the m largest (m capped items).
    tail = ordered.flip(0).cumsum(0).flip(0)
    m = torch.arange(ordered.numel(), device=scores.device, dtype=scores.dtype)
    # The smallest m for which the (m+1)-th largest score is not capped by c = (k - m) / tail[m].
    fits = (budget - m) * ordered <= tail
    n_capped = int(torch.nonzero(fits)[0])
    scale = (budget - n_capped) / float(tail[n_capped])
    return (scores * scale).clamp_(max=1.0)


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
