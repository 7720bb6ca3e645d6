"""Batches of one, padding, zero and non-finite gradients, and resuming from a state_dict."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vcas
from models import TinyTransformer, token_batch
from stats import EXPECTATION_TOLERANCE, assert_unbiased, bias_statistics, expectation_error, sampled_gradients


def _attached(act=0.5, weight=0.5, **model_kwargs):
    torch.manual_seed(0)
    model = TinyTransformer(**model_kwargs)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=act, weight=weight)
    return model, ctl


def test_batch_of_one_is_sampled_without_crash_and_stays_unbiased():
    model, ctl = _attached()
    torch.manual_seed(0)
    reference = TinyTransformer()  # the same initial weights (an attached model cannot be copied)
    tokens, labels = token_batch(n=1)
    loss_of = lambda m: F.cross_entropy(m(tokens), labels)
    exact = [g.detach() for g in torch.autograd.grad(loss_of(reference), list(reference.parameters()))]
    samples = sampled_gradients(model, loss_of(model), 400)
    kept = int((samples[1].abs().sum(1) > 0).sum())
    assert 0 < kept < 400  # the single sample is sometimes dropped, sometimes kept
    assert all(torch.isfinite(s).all() for s in samples)
    assert_unbiased(bias_statistics(samples, exact))
    assert expectation_error(model, ctl, loss_of) < EXPECTATION_TOLERANCE


class _RecordingDraws:
    """The controller's Bernoulli draws, with every (probabilities, keeps) pair recorded."""

    def __init__(self, generators):
        self.generators, self.seen = generators, []

    def draw(self, device):
        inner, seen = self.generators.draw(device), self.seen

        class _Recorded:
            def keeps(self, probs):
                keeps = inner.keeps(probs)
                seen.append((probs.clone(), keeps.clone()))
                return keeps

        return _Recorded()


def test_padding_rows_of_zeros_are_never_sampled_and_do_not_crash():
    """Rows whose input is all zeros (padding) have a SampleW score of zero: probability 0,
    never kept, over many draws; the gradient stays finite."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 3))
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0), blocks=["0"])
    ctl.set_ratios(act=1.0, weight=0.5)
    draws = ctl.mechanism.runtime.draws = _RecordingDraws(ctl.mechanism.runtime.generators)
    x = torch.randn(4, 5, 6)
    x[:, 3:] = 0.0  # padded positions carry all-zero inputs
    padded = torch.zeros(4, 5, dtype=torch.bool)
    padded[:, 3:] = True
    for _ in range(50):
        model.zero_grad()
        (model(x) * torch.randn(4, 5, 3)).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert len(draws.seen) == 50
    for probs, keeps in draws.seen:  # one probability per row of the linear "0"
        assert probs.shape == (20,)
        assert torch.all(probs[padded.flatten()] == 0) and not keeps[padded.flatten()].any()
        assert torch.all(probs[~padded.flatten()] > 0)


def test_block_with_zero_gradient_and_empty_kept_sets():
    model, _ctl = _attached(act=0.1, weight=0.1)
    tokens, _ = token_batch()
    (0.0 * model(tokens).sum()).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


def test_nan_gradients_do_not_crash_and_skip_the_controller_update():
    model, ctl = _attached()
    tokens, _labels = token_batch()
    (model(tokens).sum() * float("nan")).backward()
    assert ctl.stats()["nonfinite_gradients"] > 0
    nan_loss = lambda batch: model(batch[0]).sum() * float("nan")
    ctl.calibrate(nan_loss, [token_batch(seed=s) for s in (1, 2)])
    stats = ctl.stats()
    assert stats["skipped_updates"] == 1 and stats["updates"] == 0
    assert "finite" in stats["last_skip_reason"]  # non-finite statistics / no finite samples
    assert stats["act_ratios"] == [0.5, 0.5, 0.5]


def _train(model, ctl, steps, start=0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    for step in range(start, start + steps):
        loss_fn(token_batch(seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        ctl.maybe_calibrate(loss_fn, [token_batch(seed=1000 + step), token_batch(seed=2000 + step)])


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_state_dict_resumes_exactly(controller):
    torch.manual_seed(0)
    model = TinyTransformer()
    config = vcas.VCASConfig(update_every=2, s_step=0.2, tau_act=1.0, seed=0, controller=controller)
    ctl = vcas.attach(model, config)
    _train(model, ctl, 4)
    saved_model, saved_ctl = copy.deepcopy(model.state_dict()), copy.deepcopy(ctl.state_dict())
    _train(model, ctl, 4, start=4)

    torch.manual_seed(1)
    resumed = TinyTransformer()
    resumed.load_state_dict(saved_model)
    ctl2 = vcas.attach(resumed, dataclasses.replace(config, seed=99))
    ctl2.load_state_dict(saved_ctl)
    _train(resumed, ctl2, 4, start=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert ctl.stats() == ctl2.stats()
    assert ctl.compact_status() == ctl2.compact_status()  # what the first uses established
    if controller == "adaptive":  # its ratios fall below recompute_below here
        assert "compact" in ctl.compact_status().values()


def test_state_dict_for_another_model_is_rejected():
    ctl = vcas.attach(TinyTransformer(depth=2))
    other = vcas.attach(TinyTransformer(depth=3))
    try:
        other.load_state_dict(ctl.state_dict())
    except vcas.StateDictError as error:
        assert "block_names" in str(error)
    else:
        raise AssertionError("a mismatched state_dict was accepted")


def test_a_non_finite_gradient_at_a_weight_sampled_linear_is_counted_and_passes_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 4))
    reference = copy.deepcopy(model)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0), blocks=["0"])
    ctl.set_ratios(act=1.0, weight=0.5)
    x, scale = torch.randn(5, 6), torch.tensor([1.0, float("inf"), 1.0, 1.0])
    for m in (model, reference):
        (m(x) * scale).sum().backward()
    assert ctl.stats()["nonfinite_gradients"] >= 1
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, expected.grad, equal_nan=True)


def test_linears_reading_the_same_input_share_its_row_norms_until_it_changes():
    from vcas.runtime.ratios import RatioTable
    from vcas.runtime.recorder import Recorder
    from vcas.runtime.rng import SamplingGenerators
    from vcas.runtime.runtime import Runtime
    runtime = Runtime(RatioTable.ones([], []), SamplingGenerators(0), Recorder({}))
    x = torch.randn(3, 4, 5)
    first = runtime.input_row_norms(x)
    assert runtime.input_row_norms(x) is first
    torch.testing.assert_close(first, torch.linalg.vector_norm(x.reshape(-1, 5), dim=1))
    x.mul_(2.0)  # an in-place change bumps the version: recomputed
    doubled = runtime.input_row_norms(x)
    torch.testing.assert_close(doubled, 2 * first)
    runtime.forget_inputs()  # after a forward: the next input's norms are taken afresh
    assert runtime.input_row_norms(x) is not doubled
