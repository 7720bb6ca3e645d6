"""Unbiasedness at fixed keep ratios, against the exact gradient, with a negative control.

For an unbiased estimator the squared error of the mean of K draws has expectation
trace(Cov) / K; the ratio ("energy") is about 1. A bias b adds ||b||^2 K / trace(Cov), which grows
with K. The projected z-scores are standard normal under unbiasedness: with about 40 parameters a
bound of 4.5 fails by chance with probability below 1e-3.
The mean energy is checked against ``stats.ENERGY_BOUND`` (derived there); the negative controls
below give energies far above it.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import vcas
import vcas.ops.activation
import vcas.ops.linear
from models import TinyCNN, TinyTransformer, image_batch, token_batch
from stats import ENERGY_BOUND, bias_statistics, sampled_gradients

DRAWS = 400


def _exact_grads(model, loss_of):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.detach() for g in torch.autograd.grad(loss_of(model), params)]


def _check(model, loss_of, act=0.5, weight=0.5):
    reference = copy.deepcopy(model)
    exact = _exact_grads(reference, loss_of)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=act, weight=weight)
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
    stats = _check(*case(), act=act, weight=weight)
    assert stats["deterministic_mismatches"] == 0, stats
    assert stats["mean_energy"] < ENERGY_BOUND, stats
    assert stats["max_abs_z"] < 4.5, stats


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


def test_negative_control_a_biased_sampler_is_caught(monkeypatch):
    """Keeping samples without the 1/p re-weighting is biased: the same check must fail."""

    def keep_without_reweighting(probs, generator=None):
        uniform = torch.rand(probs.shape, generator=generator, dtype=probs.dtype)
        return (uniform < probs).to(probs.dtype)

    def keep_rows_without_reweighting(probs, generator=None):
        kept = torch.nonzero(keep_without_reweighting(probs, generator)).squeeze(1)
        return kept, torch.ones(kept.numel(), dtype=probs.dtype)

    monkeypatch.setattr(vcas.ops.activation, "bernoulli_weights", keep_without_reweighting)
    monkeypatch.setattr(vcas.ops.linear, "bernoulli_keep", keep_rows_without_reweighting)
    stats = _check(*_transformer_case(), act=0.5, weight=0.5)
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
