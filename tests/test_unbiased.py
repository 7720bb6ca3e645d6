"""Unbiasedness at fixed keep ratios, statistically, against the exact gradient, with negative
controls: a sampler without the 1/p re-weighting, one that over-weights by 5 %, and a linear that
skips rows BatchNorm made non-zero. The statistics and their bounds are derived in tests/stats.py.

Power: 400 draws detect a 5 % over-weighting at the ratios of the 5 % controls below (z of the
error along the gradient of 5 to 250); at low activation ratios (0.25 with 8 samples) the draws'
variance hides it, and the deterministic expectation tests (tests/test_expectation.py) carry
the check there.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import vcas
import vcas.ops.linear
from models import TinyCNN, TinyTransformer, image_batch, token_batch
from stats import ScaledBernoulli, assert_unbiased, bias_statistics, biased, sampled_gradients

DRAWS = 400


def _exact_grads(model, loss_of):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.detach() for g in torch.autograd.grad(loss_of(model), params)]


def _check(model, loss_of, act=0.5, weight=0.5, bias=None):
    reference = copy.deepcopy(model)
    exact = _exact_grads(reference, loss_of)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=act, weight=weight)
    if bias is not None:
        ctl.mechanism.runtime.draws = ScaledBernoulli(ctl.mechanism.runtime.generators, bias)
    samples = sampled_gradients(model, loss_of(model), DRAWS)
    ctl.detach()
    return bias_statistics(samples, exact)


def _transformer_case():
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    tokens, labels = token_batch(n=8, t=6)
    return model, lambda m: F.cross_entropy(m(tokens), labels)


def _cnn_case():
    torch.manual_seed(0)
    model = TinyCNN(depth=3)
    images, labels = image_batch(n=8)
    return model, lambda m: F.cross_entropy(m(images), labels)


@pytest.mark.parametrize("case", [_transformer_case, _cnn_case], ids=["transformer", "cnn-batchnorm"])
# act 0.9 is above the default gather_below: dense products with the dropped samples' zero rows.
@pytest.mark.parametrize("act, weight", [(0.5, 0.5), (0.25, 1.0), (1.0, 0.3), (0.9, 0.5)])
def test_sampled_gradient_is_unbiased(case, act, weight):
    assert_unbiased(_check(*case(), act=act, weight=weight))


@pytest.mark.parametrize("case", [_transformer_case, _cnn_case], ids=["transformer", "cnn-batchnorm"])
@pytest.mark.parametrize("act, weight", [(0.5, 0.5), (1.0, 0.3), (0.9, 0.5)])
def test_negative_control_a_five_percent_over_weighting_is_caught(case, act, weight):
    assert biased(_check(*case(), act=act, weight=weight, bias=1.05))


def test_dense_and_gathered_products_give_the_same_gradient():
    """gather_below only chooses how the zero rows are skipped: same draws, same gradient.
    (With weight sampling the draws differ in number; the unbiasedness test covers that.)"""
    model, loss_of = _transformer_case()
    grads, flops = [], []
    for gather_below in (0.0, 1.0):
        torch.manual_seed(0)
        copy_ = copy.deepcopy(model)
        ctl = vcas.attach(copy_, vcas.VCASConfig(seed=0, gather_below=gather_below, recompute_below=0.0))
        ctl.set_ratios(act=0.5, weight=1.0)
        loss_of(copy_).backward()
        grads.append([p.grad for p in copy_.parameters()])
        flops.append(ctl.flops.train.backward_done)
    for dense, gathered in zip(*grads):
        torch.testing.assert_close(dense, gathered)
    assert flops[1] < flops[0]  # only gathering skips the zero rows' products


class _WithoutReweighting:
    """Keeps drawn as usual, weighted 1 instead of 1/p."""

    def __init__(self, generators):
        self.generators = generators

    def draw(self, device):
        generator = self.generators.for_device(device)

        class _Unweighted:
            def keeps(self, probs):
                uniform = torch.rand(probs.shape, generator=generator, dtype=probs.dtype)
                return (uniform < probs).to(probs.dtype) * probs  # weight p / p = 1 when kept

        return _Unweighted()


def test_negative_control_a_sampler_without_reweighting_is_caught():
    model, loss_of = _transformer_case()
    reference = copy.deepcopy(model)
    exact = _exact_grads(reference, loss_of)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=0.5, weight=0.5)
    ctl.mechanism.runtime.draws = _WithoutReweighting(ctl.mechanism.runtime.generators)
    stats = bias_statistics(sampled_gradients(model, loss_of(model), DRAWS), exact)
    assert stats["mean_energy"] > 10.0, stats


def test_negative_control_skipping_rows_after_batchnorm_is_caught(monkeypatch):
    """A linear backward that trusted the sampler's kept set instead of the arriving gradient
    would skip rows that BatchNorm made non-zero again: that bias must be detected."""
    original = vcas.ops.linear._input_grad
    kept_rows = {}

    def input_grad_assuming_zero_rows(g_rows, weight, rows, n_rows):
        if rows is not None:
            return original(g_rows, weight, rows, n_rows)
        if n_rows not in kept_rows:
            kept_rows[n_rows] = torch.arange(0, n_rows, 2)  # pretend half the rows were dropped
        kept = kept_rows[n_rows]
        return original(g_rows.index_select(0, kept), weight, kept, n_rows)

    monkeypatch.setattr(vcas.ops.linear, "_input_grad", input_grad_assuming_zero_rows)
    stats = _check(*_cnn_case(), act=1.0, weight=1.0)
    assert stats["deterministic_mismatches"] > 0, stats
