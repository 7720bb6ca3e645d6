"""The adaptive controller's decision rule on synthetic variance sequences."""

import math

import pytest
import torch

import vcas
from vcas import adaptive
from vcas.calibration import Measurement
from vcas.sampling import share_schedule
from models import TinyTransformer

TAU = 0.025
TRUE_GAIN = 3.0  # V_act = TRUE_GAIN * proxy: what the synthetic "model" does


def _norms(seed: int, batches: int = 2, blocks: int = 3, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.exp(1.5 * torch.randn(n, generator=g)) for _ in range(blocks)] for _ in range(batches)]


def _measurement(ctl, norms, noise: float, g: torch.Generator) -> Measurement:
    """What a calibration would measure: V_act at the draws' schedule with multiplicative noise."""
    n_linear = len(ctl.linear_names)
    trial = ctl._draw_settings()["act_ratios"]
    jitter = lambda: math.exp(noise * float(torch.randn(1, generator=g)))  # noqa: E731
    var_act = TRUE_GAIN * adaptive.proxy_act_variance(norms, trial) * jitter()
    scores = [[torch.rand(64, generator=g) for _ in range(2)] for _ in range(n_linear)]
    return Measurement([1.0 * jitter() / n_linear] * n_linear, [var_act / n_linear] * n_linear,
                       [0.0] * n_linear, norms, scores, trial)


def _true_ratio(norms, s):
    return TRUE_GAIN * adaptive.proxy_act_variance(norms, share_schedule(norms, s)) / 1.0


def _controller(start_s=1.0):
    ctl = vcas.attach(TinyTransformer(depth=3), vcas.VCASConfig(controller="adaptive", tau_act=TAU,
                                                                update_every=8, seed=0))
    if start_s < 1.0:
        ctl._s = start_s
        ctl._state.act_ratios = share_schedule(_norms(0), start_s)
    return ctl


@pytest.mark.parametrize("start_s", [1.0, 0.2], ids=["from-exact", "from-too-aggressive"])
def test_converges_to_the_variance_threshold(start_s):
    ctl = _controller(start_s)
    norms, g = _norms(0), torch.Generator().manual_seed(1)
    for _ in range(12):
        ctl._apply(_measurement(ctl, norms, noise=0.0, g=g))
    s = ctl.stats()["s"]
    assert _true_ratio(norms, s) <= TAU * 1.0001
    # The smallest s within the budget: a little less sampling would exceed it.
    assert _true_ratio(norms, s - 0.02) > TAU or s < 0.02


def test_does_not_oscillate_on_noisy_estimates():
    ctl = _controller()
    norms, g = _norms(0), torch.Generator().manual_seed(2)
    shares = []
    for _ in range(40):
        # Heavy noise: single estimates vary by a factor of about 3 either way.
        ctl._apply(_measurement(ctl, norms, noise=1.0, g=g))
        shares.append(ctl.stats()["s"])
    tail = shares[-20:]
    assert max(tail) - min(tail) < 0.15
    mean_ratio = sum(_true_ratio(norms, s) for s in tail) / len(tail)
    assert 0.3 * TAU < mean_ratio < 3 * TAU  # near tau on average


def test_ratios_stay_in_range_and_weight_ratios_meet_their_budget():
    ctl = _controller()
    norms, g = _norms(3), torch.Generator().manual_seed(3)
    for _ in range(5):
        ctl._apply(_measurement(ctl, norms, noise=0.5, g=g))
        stats = ctl.stats()
        assert all(0 < r <= 1 for r in stats["act_ratios"] + stats["weight_ratios"])
    scores = [torch.rand(64, generator=g) for _ in range(2)]
    nu = adaptive.solve_weight_ratio(scores, budget=0.5, floor=0.05)
    assert adaptive.weight_variance(scores, nu) <= 0.5
    assert adaptive.weight_variance(scores, nu - 0.01) > 0.5 or nu <= 0.05


def test_calibration_interval_grows_while_stable_and_state_round_trips():
    ctl = _controller()
    norms, g = _norms(0), torch.Generator().manual_seed(4)
    for _ in range(6):
        ctl._apply(_measurement(ctl, norms, noise=0.0, g=g))
    memory = ctl._adaptive_state
    assert memory.interval == 8  # doubled from 1 up to update_every
    other = _controller()
    other.load_state_dict(ctl.state_dict())
    assert other._adaptive_state == memory and other.stats()["s"] == ctl.stats()["s"]


def test_adaptive_first_calibration_is_at_the_first_step():
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    ctl = vcas.attach(model, vcas.VCASConfig(controller="adaptive", update_every=20, seed=0))
    loss_fn = lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    from models import token_batch
    source = iter([token_batch(n=16, seed=s) for s in range(100)])
    ran = [ctl.maybe_calibrate(loss_fn, source) for _ in range(10)]
    assert ran[0] and ctl.stats()["updates"] >= 1


def test_a_collapse_of_the_sgd_variance_is_followed_at_once():
    """Late in fine-tuning V_sgd can fall by orders of magnitude between calibrations: the
    budget must follow at once (not through the smoothing) and calibrations come quickly again."""
    ctl = _controller()
    norms, g = _norms(0), torch.Generator().manual_seed(5)
    for _ in range(8):
        ctl._apply(_measurement(ctl, norms, noise=0.0, g=g))
    assert ctl._adaptive_state.interval == 8
    s_before = ctl.stats()["s"]
    collapsed = _measurement(ctl, norms, noise=0.0, g=g)
    collapsed.var_sgd_layers = [v / 100 for v in collapsed.var_sgd_layers]
    ctl._apply(collapsed)
    memory = ctl._adaptive_state
    assert memory.var_sgd_layers == collapsed.var_sgd_layers  # adopted, not averaged
    assert memory.interval == 1 and ctl.stats()["s"] > s_before  # less sampling, checked soon
