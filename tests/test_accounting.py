"""FLOPs accounting cross-checked against torch.utils.flop_counter."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vcas
from models import TinyTransformer, token_batch


class MLPBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def _linear_only_model():
    torch.manual_seed(0)
    return nn.Sequential(*[MLPBlock(8) for _ in range(3)])


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_sampled_layer_flops_match_the_flop_counter(ratio):
    model = _linear_only_model()
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=ratio, weight=ratio)
    x = torch.randn(6, 5, 8)
    with FlopCounterMode(display=False) as forward:
        out = model(x)
    with FlopCounterMode(display=False) as backward:
        out.pow(2).sum().backward()
    train = ctl.flops.train
    assert train.forward == forward.get_total_flops()
    assert train.backward_done == backward.get_total_flops()
    # Exact backward: input gradient (not for the first layer, whose input needs none) + weight.
    per_layer_fwd = [2 * 30 * 8 * 16] * 6
    assert train.backward_exact == 2 * sum(per_layer_fwd) - per_layer_fwd[0]
    if ratio < 1:
        assert train.backward_done < train.backward_exact
    else:
        assert train.backward_done == train.backward_exact


def test_whole_training_reduction_counts_calibration_and_the_rest_of_the_model():
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    assert ctl.stats()["flops_scope"] == "sampled_layers"
    ctl.calibrate(loss_fn, [token_batch(seed=s) for s in (1, 2)])
    tally = ctl.flops
    assert tally.scope == "model" and tally.other.forward > 0
    assert tally.calibration.forward > 0 and tally.calibration.backward_done > 0
    ctl.set_ratios(act=0.5, weight=0.5)
    for step in range(5):
        loss_fn(token_batch(seed=step)).backward()
    stats = ctl.stats()
    assert 0 < stats["bp_flops_reduction"] < 1
    # Calibration is paid for: the whole-training figure is below what training steps alone save.
    assert stats["train_flops_reduction"] < 1 - (tally.train.forward + tally.train.backward_done) / (
        tally.train.forward + tally.train.backward_exact)
    expected = 1 - tally.spent_flops() / tally.exact_training_flops()
    assert stats["train_flops_reduction"] == pytest.approx(expected)


def test_rows_with_a_zero_gradient_are_skipped_even_at_ratio_one():
    """A loss on the first token only (like a [CLS] classifier) leaves the other rows of the top
    block's gradient exactly zero: they are gathered out and not counted as done."""
    model = _linear_only_model()
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    x = torch.randn(6, 5, 8, requires_grad=True)
    model(x)[:, 0].pow(2).sum().backward()
    train = ctl.flops.train
    assert train.backward_done < train.backward_exact
    reference = x.grad.clone()
    x.grad = None
    with ctl.paused():
        model(x)[:, 0].pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference)
