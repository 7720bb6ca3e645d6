import math

import pytest
import torch

from vcas.sampling import (
    SortedScores,
    bernoulli_keep,
    bernoulli_weights,
    capped_proportional_probs,
    monotone_schedule,
    norm_share_fraction,
    sampling_variance,
)


def test_capped_proportional_meets_budget_and_optimality_conditions():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 0.5])
    for budget in [0.5, 1.0, 2.0, 3.0, 4.0]:
        p = capped_proportional_probs(scores, budget)
        assert float(p.sum()) == pytest.approx(budget, rel=1e-6)
        assert p[0] == 0 and bool((p <= 1).all())
        free = (p > 0) & (p < 1)
        ratio = p[free] / scores[free]
        # KKT: uncapped probabilities are proportional to the scores, capped ones score higher.
        assert torch.allclose(ratio, ratio[0].expand_as(ratio))
        if bool((p == 1).any()):
            assert float(scores[p == 1].min()) * float(ratio[0]) >= 1 - 1e-6


def test_capped_proportional_beats_random_feasible_alternatives():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(20, generator=g) ** 3
    budget = 6.0
    p = capped_proportional_probs(scores, budget)
    best = float(sampling_variance(p, scores))
    for _ in range(200):
        q = (p + 0.05 * torch.randn(20, generator=g)).clamp(1e-3, 1)
        q = q * budget / q.sum()
        if bool((q <= 1).all()):
            assert float(sampling_variance(q, scores)) >= best - 1e-9


def test_budget_above_positive_count_keeps_all_positive():
    p = capped_proportional_probs(torch.tensor([0.0, 2.0, 1.0]), 2.5)
    assert p.tolist() == [0.0, 1.0, 1.0]
    assert capped_proportional_probs(torch.zeros(4), 2.0).tolist() == [0.0] * 4


def _reference_probs(scores: list[float], budget: float) -> list[float]:
    """The capped-proportional solution by the definition, in Python floats: cap the m largest
    scores for the smallest m whose (m+1)-th largest score stays below 1 at c = (k - m) / tail."""
    ordered = sorted(scores, reverse=True)
    if sum(x > 0 for x in scores) <= budget:
        return [float(x > 0) for x in scores]
    for m in range(len(ordered)):
        scale = (budget - m) / math.fsum(ordered[m:])
        if ordered[m] * scale <= 1.0:
            return [min(1.0, x * scale) for x in scores]
    raise AssertionError("no solution")


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.3, 0.5, 0.8, 0.99])
def test_capped_proportional_equals_the_definition_on_heavy_tails(ratio):
    """Only the ceil(budget) largest scores are ranked; the result must still be the solution,
    for light and heavy tails, zeros, and rows solved together."""
    g = torch.Generator().manual_seed(3)
    for scores in (torch.rand(500, generator=g), torch.rand(500, generator=g) ** 8,
                   torch.exp(3 * torch.randn(500, generator=g)), torch.rand(3, 200, generator=g)):
        scores[..., ::7] = 0.0
        budget = ratio * scores.shape[-1]
        expected = torch.tensor([_reference_probs(row.tolist(), budget)
                                 for row in scores.reshape(-1, scores.shape[-1])])
        torch.testing.assert_close(capped_proportional_probs(scores, budget),
                                   expected.reshape(scores.shape).float(), rtol=1e-5, atol=1e-6)


def test_bernoulli_keep_is_the_same_draw_as_bernoulli_weights():
    probs = torch.rand(200, generator=torch.Generator().manual_seed(4)) * 0.5
    probs[::9] = 0.0
    dense = bernoulli_weights(probs, torch.Generator().manual_seed(8))
    kept, weights = bernoulli_keep(probs, torch.Generator().manual_seed(8))
    assert torch.equal(kept, torch.nonzero(dense).squeeze(1))
    torch.testing.assert_close(weights, dense[kept])


def test_stacked_sorted_scores_equal_sorting_all_rows_at_once():
    g = torch.Generator().manual_seed(5)
    rows = [torch.rand(n, generator=g, dtype=torch.float64) ** 3 for n in (30, 7, 52, 1)]
    together = SortedScores(rows)
    stacked = SortedScores.stack([SortedScores(rows[:2]), SortedScores(rows[2:3]), SortedScores(rows[3:])])
    for ratio in (0.05, 0.3, 0.9):
        torch.testing.assert_close(stacked.variances(ratio), together.variances(ratio))
    assert SortedScores.stack([]).variances(0.5).numel() == 0


def test_sorted_scores_variance_equals_solving_and_summing():
    g = torch.Generator().manual_seed(2)
    rows = [torch.rand(n, generator=g, dtype=torch.float64) ** 4 for n in (40, 300, 1)]
    rows[0][::3] = 0.0  # zero scores are never kept and do not count toward the budget
    rows[1][:3] *= 100  # a few dominant scores get capped at probability 1
    rows.append(torch.zeros(5))
    sorted_rows = SortedScores(rows)
    for ratio in [0.01, 0.05, 0.3, 0.7, 0.99, 1.0]:
        expected = [float(sampling_variance(capped_proportional_probs(r, ratio * int((r > 0).sum())), r))
                    for r in rows]
        assert sorted_rows.variances(ratio).tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_bernoulli_weights_are_unbiased_and_match_the_analytic_variance():
    g = torch.Generator().manual_seed(1)
    scores = torch.tensor([0.2, 1.0, 3.0, 0.0, 5.0])
    probs = capped_proportional_probs(scores, 2.0)
    draws = torch.stack([bernoulli_weights(probs, g) for _ in range(20000)])
    estimate = (draws * scores).sum(dim=1)  # unbiased estimate of scores.sum()
    n = draws.shape[0]
    z = (estimate.mean() - scores.sum()) / (estimate.std() / math.sqrt(n))
    assert abs(float(z)) < 4.5
    analytic = float(sampling_variance(probs, scores))
    empirical = float(estimate.var())
    # The sample variance of n draws has relative standard error about sqrt(kurtosis / n).
    assert empirical == pytest.approx(analytic, rel=0.1)
    assert bool((draws[:, 3] == 0).all())


def test_norm_share_fraction_and_monotone_schedule():
    assert norm_share_fraction(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 0.5
    assert norm_share_fraction(torch.tensor([10.0, 1.0, 1.0, 1.0]), 0.7) == 0.25
    assert norm_share_fraction(torch.tensor([10.0, 1.0, 1.0, 1.0]), 1.0) == 1.0
    assert norm_share_fraction(torch.tensor([1.0, 2.0]), 0.0) == 0.5  # at least one kept
    assert norm_share_fraction(torch.zeros(4), 0.9) == 0.25
    assert monotone_schedule([0.5, 0.25, 0.75, 0.5]) == [0.5, 0.5, 0.75, 0.75]


def test_finite_capped_vector_is_the_solution_or_none_for_non_finite_scores():
    from vcas.sampling import finite_capped_vector
    generator = torch.Generator().manual_seed(3)
    for n, budget in [(50, 5.0), (50, 12.5), (7, 7.0), (7, 3.0)]:
        scores = torch.rand(n, generator=generator) ** 4
        scores[::5] = 0.0
        torch.testing.assert_close(finite_capped_vector(scores, budget), capped_proportional_probs(scores, budget))
    # Exactly as many positive scores as the budget: all kept, the zeros never (no 0 * inf).
    assert finite_capped_vector(torch.tensor([3.0, 1e-30, 2.0, 0.0]), 3.0).tolist() == [1.0, 1.0, 1.0, 0.0]
    for bad in (float("nan"), float("inf")):
        assert finite_capped_vector(torch.tensor([1.0, bad, 2.0]), 1.5) is None


def test_probabilities_solved_on_the_device_match_the_definition():
    """The sync-free solve (a budget held on the device, a width bound from the host) gives the
    same probabilities as the host solve wherever the scores' tail is within float64's
    resolution (summing to the budget, or keeping every positive score), and valid
    probabilities everywhere (in [0, 1], positive where the score is)."""
    from vcas.sampling import capped_probs_on_device

    g = torch.Generator().manual_seed(0)
    compared = 0
    for _ in range(1500):
        n = int(torch.randint(1, 300, (1,), generator=g))
        scores = torch.rand(n, generator=g) ** float(torch.randint(1, 12, (1,), generator=g))
        scores[torch.rand(n, generator=g) < 0.3] = 0
        budget = float(torch.rand(1, generator=g)) * n
        if budget <= 0:
            continue
        width = math.ceil(budget) + int(torch.randint(0, 5, (1,), generator=g))
        got = capped_probs_on_device(scores, torch.tensor(budget, dtype=torch.float64), width)
        positive = scores > 0
        # Positive wherever the score is (but for scores below float32's range relative to the
        # rest, whose contribution is below any sum's resolution anyway).
        resolvable = scores > 1e-30 * float(scores.sum())
        assert torch.all(got[resolvable] > 0) and torch.all(got[~positive] == 0) and torch.all(got <= 1)
        if positive.any() and float(scores[positive].min()) > 1e-6 * float(scores.max()):
            assert float(got.sum()) <= budget * (1 + 1e-4) or torch.equal(got, positive.float())
            torch.testing.assert_close(got, capped_proportional_probs(scores, budget), rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared > 300


def test_a_fixed_size_selection_thins_an_overflow_unbiasedly():
    from vcas.ops.capacity import capacity, select

    assert capacity(3.2, 8) == 8 and capacity(16, 64) < 40 and capacity(0.0, 10) == 1
    g = torch.Generator().manual_seed(1)
    marked = torch.tensor([True, False, True, True, False, True, True, True])  # 6 marked
    counts = torch.zeros(8)
    draws = 6000
    for _ in range(draws):
        indices, factor = select(marked, 4, g)
        assert indices.numel() == 4 and len(set(indices.tolist())) == 4
        assert float(factor) == pytest.approx(6 / 4)
        counts[indices] += float(factor) * marked[indices].float()
    # Each marked item is chosen with probability 4/6 and weighted 6/4: 1 in expectation.
    expected = marked.float()
    assert torch.all((counts / draws - expected).abs() < 5 * math.sqrt(0.5 / draws) + 1e-9)
    indices, factor = select(marked, 7, g)  # room for every marked item: all of them, weight 1
    assert set(torch.nonzero(marked).flatten().tolist()) <= set(indices.tolist()) and float(factor) == 1.0
