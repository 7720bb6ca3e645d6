"""Deterministic expectation tests: every sampler at its expectation reproduces the exact gradient.

Backpropagation is linear in the incoming gradient, so replacing every random keep decision by
its expectation (given the decisions above it) turns an unbiased sampled backward into the exact
one, up to rounding (``stats.EXPECTATION_TOLERANCE``). Unlike a statistical test this needs no
draws and catches any mis-weighting: the negative controls over-weight the kept items by 5 %.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcas
from models import TinyCNN, TinyConv1dNet, TinyTransformer, image_batch, token_batch
from stats import EXPECTATION_TOLERANCE, ScaledDraws, expectation_error
from test_architectures import FAMILIES, _batch, _loss, _model

pytestmark = pytest.mark.usefixtures("one_thread")


def _attached(model, act, weight, **config):
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0, **config))
    ctl.set_ratios(act=act, weight=weight)
    return ctl


def _transformer():
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    tokens, labels = token_batch(n=8, t=6)
    return model, lambda m: F.cross_entropy(m(tokens), labels)


def _half_weighted_transformer():
    """A loss in which some samples weigh nothing: their gradient is zero, so they are dropped
    for certain (p = 0) and the compact re-run sees a strict subset of the batch."""
    torch.manual_seed(0)
    model = TinyTransformer(depth=3, dropout=0.2)
    tokens, labels = token_batch(n=8, t=6)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])

    def loss_of(m):
        torch.manual_seed(3)  # the same dropout masks in every pass
        return (F.cross_entropy(m(tokens), labels, reduction="none") * weights).mean()

    return model, loss_of


def _cnn():
    torch.manual_seed(0)
    model = TinyCNN(depth=3)
    images, labels = image_batch(n=8)
    return model, lambda m: F.cross_entropy(m(images), labels)


def _conv1d():
    torch.manual_seed(0)
    model = TinyConv1dNet()
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn(8, 1, 12, generator=g), torch.randint(0, 3, (8,), generator=g)
    return model, lambda m: F.cross_entropy(m(x), labels)


CASES = {
    # (case, act, weight, config): SampleA alone, SampleW alone, both; gathered and dense rows.
    "activations": (_transformer, 0.3, 1.0, {}),
    "weights": (_transformer, 1.0, 0.3, {}),
    "both-gathered": (_transformer, 0.4, 0.4, {"gather_below": 1.0, "recompute_below": 0.0}),
    "both-dense": (_transformer, 0.4, 0.4, {"gather_below": 0.0, "recompute_below": 0.0}),
    "cnn-batchnorm": (_cnn, 0.4, 0.4, {}),
    "conv1d-groupnorm": (_conv1d, 0.4, 1.0, {}),
}


@pytest.mark.parametrize("name", CASES)
def test_each_sampler_at_its_expectation_gives_the_exact_gradient(name):
    case, act, weight, config = CASES[name]
    model, loss_of = case()
    ctl = _attached(model, act, weight, **config)
    assert expectation_error(model, ctl, loss_of) < EXPECTATION_TOLERANCE


@pytest.mark.parametrize("name", ["activations", "weights", "cnn-batchnorm"])
def test_negative_control_a_five_percent_over_weighting_is_caught(name):
    case, act, weight, config = CASES[name]
    model, loss_of = case()
    ctl = _attached(model, act, weight, **config)
    error = expectation_error(model, ctl, loss_of, draws=ScaledDraws(1.05))
    # 5 % from one sampler, 10.25 % where SampleA's and SampleW's over-weightings compound.
    assert 0.049 < error < 0.11, error


def test_compact_recompute_at_its_expectation_gives_the_exact_gradient():
    model, loss_of = _half_weighted_transformer()
    ctl = _attached(model, 0.4, 0.4, recompute_below=1.0)
    for _ in range(3):  # past the verifying uses
        loss_of(model).backward()
    model.zero_grad()
    assert set(ctl.compact_status().values()) == {"compact"}
    before = ctl.stats()["compact_backwards"]
    assert expectation_error(model, ctl, loss_of) < EXPECTATION_TOLERANCE
    assert ctl.stats()["compact_backwards"] > before  # the compact path ran
    assert expectation_error(model, ctl, loss_of, draws=ScaledDraws(1.05)) > 100 * EXPECTATION_TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_every_transformer_family_at_its_expectation_gives_the_exact_gradient(family):
    model = _model(family)
    ctl = _attached(model, 0.4, 0.4)
    batch = _batch(family)
    assert expectation_error(model, ctl, lambda m: _loss(m, batch)) < EXPECTATION_TOLERANCE


def test_a_registered_linear_like_layer_at_its_expectation_gives_the_exact_gradient():
    model, x, labels = _scaled_linear_model()
    sites = vcas.DEFAULT_SITES.register(ScaledLinear, vcas.LinearKind(weight=lambda m: m.w, bias=lambda m: m.b))
    reference = copy.deepcopy(model)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0), sites=sites)
    assert ctl.linear_names == ["blocks.0.fc", "blocks.1.fc"]
    ctl.set_ratios(act=0.5, weight=0.5)
    loss_of = lambda m: F.cross_entropy(m(x), labels)
    assert expectation_error(model, ctl, loss_of) < EXPECTATION_TOLERANCE
    ctl.detach()
    torch.testing.assert_close(loss_of(model), loss_of(reference))


class ScaledLinear(nn.Module):
    """A linear layer of its own: ``x @ w.T + b`` with differently named parameters."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x @ self.w.t() + self.b


class _ResidualBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = ScaledLinear(dim)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class _Stack(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.blocks = nn.ModuleList([_ResidualBlock(dim) for _ in range(2)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def _scaled_linear_model():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return _Stack(), torch.randn(8, 5, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
