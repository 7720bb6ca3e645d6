"""The paper's update rules (docs/method.md, "The paper's controller") on hand-computed cases."""

import dataclasses
import math

import pytest
import torch

import vcas
from models import TinyTransformer
from vcas.control.paper import candidate_schedule, next_share, next_weight_ratios
from vcas.control.statistics import Measurement
from vcas.sampling import monotone_schedule, norm_share_fraction

CFG = vcas.VCASConfig()


def test_share_moves_by_alpha_against_the_variance_threshold_and_clips():
    assert next_share(0.9, var_act=0.03, var_sgd=1.0, config=CFG) == pytest.approx(0.91)
    assert next_share(0.9, var_act=0.02, var_sgd=1.0, config=CFG) == pytest.approx(0.89)
    assert next_share(0.9, var_act=0.025, var_sgd=1.0, config=CFG) == pytest.approx(0.89)  # not >
    assert next_share(1.0, var_act=5.0, var_sgd=1.0, config=CFG) == 1.0
    assert next_share(0.005, var_act=0.0, var_sgd=1.0, config=CFG) == 0.0


def test_weight_ratios_divide_or_multiply_by_beta_and_clip_to_one():
    ratios = next_weight_ratios([0.5, 0.5, 0.98, 1.0], var_weight=[0.1, 0.01, 1.0, 0.0],
                                var_sgd=[1.0, 1.0, 1.0, 1.0], config=CFG)
    assert ratios == pytest.approx([0.5 / 0.95, 0.5 * 0.95, 1.0, 0.95])


def _norms():
    # Two calibration batches, three blocks, four samples each.
    return [[torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0]),
             torch.tensor([9.0, 1.0, 0.0, 0.0])],
            [torch.tensor([1.0, 1.0, 1.0, 7.0]), torch.tensor([2.0, 2.0, 0.0, 0.0]),
             torch.tensor([1.0, 1.0, 1.0, 1.0])]]


def test_candidate_schedule_matches_a_hand_computation():
    # s = 0.7: block 0 -> batch 1 needs 4+3 = 7 of 10 (2/4), batch 2 needs 7 of 10 (1/4): 0.375.
    # block 1 -> 3/4 and 2/4: 0.625. block 2 -> 1/4 (9 >= 7) and 3/4: 0.5.
    schedule = candidate_schedule(_norms(), 0.7)
    assert schedule == pytest.approx([0.375, 0.625, 0.625])  # monotone: max over blocks below


def _measurement(ctl, sgd, act, weight, norms):
    """A paper calibration's measurement with one value per sampled linear (in plan order)."""
    names = ctl.linear_names
    return Measurement(dict(zip(names, sgd)), dict(zip(names, act)), dict(zip(names, weight)), norms)


def _apply(ctl, measurement):
    ctl.apply(ctl.policy.decide(measurement, ctl.mechanism))


def test_update_applies_the_schedule_of_the_new_share_not_the_old():
    model = TinyTransformer(depth=3)
    ctl = vcas.attach(model, vcas.VCASConfig(s_step=0.3, min_weight_numel=0, controller="paper"))
    n_linear = len(ctl.linear_names)
    measurement = _measurement(ctl, [1.0] * n_linear, [0.0] * n_linear,
                               [1.0] + [0.0] * (n_linear - 1), _norms())
    _apply(ctl, measurement)  # V_act <= tau * V_sgd: s goes down 1.0 -> 0.7
    stats = ctl.stats()
    assert stats["s"] == pytest.approx(0.7)
    assert stats["act_ratios"] == pytest.approx(candidate_schedule(_norms(), 0.7))
    assert stats["act_ratios"] != pytest.approx(candidate_schedule(_norms(), 1.0))
    # Layer 0 is over its budget: nu stays clipped at 1; the others shrink by beta.
    assert stats["weight_ratios"] == pytest.approx([1.0] + [0.95] * (n_linear - 1))
    # Now the activation variance is too high: s goes back up, ratios follow the new s.
    high = _measurement(ctl, [1.0] * n_linear, [1.0] * n_linear, [0.0] * n_linear, _norms())
    _apply(ctl, high)
    assert ctl.stats()["s"] == pytest.approx(1.0)
    assert ctl.stats()["act_ratios"] == pytest.approx(candidate_schedule(_norms(), 1.0))


def test_linears_below_min_weight_numel_keep_exact_weight_gradients():
    model = TinyTransformer(depth=3)  # linears of 16 x 48, 16 x 32 (>= 512 entries), 16 x 16, 16 x 3
    ctl = vcas.attach(model, vcas.VCASConfig(s_step=0.3, min_weight_numel=512, controller="paper"))
    n = len(ctl.linear_names)
    _apply(ctl, _measurement(ctl, [1.0] * n, [0.0] * n, [0.0] * n, _norms()))
    large = [site.weight.numel() >= 512 for site in ctl.plan.linears]
    assert ctl.weight_sampled_layers == [name for name, big in zip(ctl.linear_names, large) if big]
    assert any(large) and not all(large)
    assert ctl.stats()["weight_ratios"] == pytest.approx([0.95 if big else 1.0 for big in large])


def test_ratio_ema_smooths_the_schedule():
    model = TinyTransformer(depth=3)
    ctl = vcas.attach(model, vcas.VCASConfig(s_step=0.3, ratio_ema=0.6, controller="paper"))
    n = len(ctl.linear_names)
    _apply(ctl, _measurement(ctl, [1.0] * n, [0.0] * n, [0.0] * n, _norms()))
    expected = [0.6 * 1.0 + 0.4 * r for r in candidate_schedule(_norms(), 0.7)]
    assert ctl.stats()["act_ratios"] == pytest.approx(expected)


def test_non_finite_statistics_skip_the_update_and_say_so():
    model = TinyTransformer(depth=3)
    ctl = vcas.attach(model, vcas.VCASConfig(controller="paper"))
    n = len(ctl.linear_names)
    _apply(ctl, _measurement(ctl, [math.nan] * n, [0.0] * n, [0.0] * n, _norms()))
    stats = ctl.stats()
    assert stats["s"] == 1.0 and stats["skipped_updates"] == 1 and stats["updates"] == 0
    assert "non-finite" in stats["last_skip_reason"]


def test_monotone_pieces():
    assert norm_share_fraction(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.7) == 0.5
    assert monotone_schedule([0.375, 0.625, 0.5]) == [0.375, 0.625, 0.625]


@pytest.mark.parametrize("field, value", [
    ("tau_act", 0.0), ("tau_w", -1.0), ("mc_samples", 1), ("update_every", 0),
    ("s_step", 0.0), ("s_step", 1.0), ("nu_mult", 1.0), ("param_fraction", 0.0),
    ("param_fraction", 1.5), ("update_every", 2.5), ("ratio_ema", 1.0)])
def test_invalid_configs_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        vcas.VCASConfig(**{field: value})


def test_config_round_trips_and_is_frozen():
    cfg = vcas.VCASConfig(tau_act=0.05, seed=3)
    assert vcas.VCASConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tau_act = 0.1


@pytest.mark.parametrize("kwargs", [{"act": 0.0}, {"act": 1.5}, {"weight": -0.1},
                                    {"act": [0.5, 0.5]}, {"act": [0.9, 0.5, 0.5]},
                                    {"weight": [0.5]}, {"act": "half"}])
def test_set_ratios_rejects_invalid_values(kwargs):
    ctl = vcas.attach(TinyTransformer(depth=3))
    with pytest.raises(vcas.ConfigError):
        ctl.set_ratios(**kwargs)
    assert ctl.stats()["act_ratios"] == [1.0] * 3  # nothing half-changed
