"""The variance bound, checked independently where it is claimed: at the library's tau, with
weight sampling active on every linear, at several points of a training run, for both
controllers. The checks have standard errors of their own (vcas.control.diagnostics); the
bounds below allow two of them."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import vcas
from models import TinyTransformer

TAU = vcas.VCASConfig().tau_act  # the library's default


def _batch(seed, n=32):  # class c draws its tokens from [16 c, 16 c + 16), plus noise tokens
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    tokens = labels[:, None] * 16 + torch.randint(0, 16, (n, 8), generator=g)
    noise = torch.rand(n, 8, generator=g) < 0.3
    return torch.where(noise, torch.randint(0, 48, (n, 8), generator=g), tokens), labels


def _run(controller):
    torch.manual_seed(0)
    model = TinyTransformer(vocab=48, dim=32, depth=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    config = vcas.VCASConfig(controller=controller, update_every=10, min_weight_numel=0, seed=0)
    ctl = vcas.attach(model, config)
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    calibration = itertools.cycle([_batch(10_000 + i) for i in range(40)])
    checks = []
    for step in range(1, 61):
        loss_fn(_batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        ctl.maybe_calibrate(loss_fn, calibration)
        if step % 20 == 0:
            batches = (_batch(20_000 + 100 * step + i) for i in itertools.count())
            checks.append(ctl.check_variance(loss_fn, batches, draws=2))
    return ctl, checks


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_measured_variance_stays_within_the_bound(controller):
    ctl, checks = _run(controller)
    stats = ctl.stats()
    assert stats["sampling_bp_flops_reduction"] > 0.05  # sampling is really active ...
    assert min(stats["weight_ratios"]) < 1.0  # ... on the weights too
    for check in checks:  # precise to 25 %, unless the check ran out of pairs (then it says so)
        precise = check["act_ratio_relative_error"] <= 0.25 and check["weight_ratio_relative_error"] <= 0.25
        assert precise or check["pairs"] == 32, check
    for kind in ("act", "weight"):
        ratios = [c[f"{kind}_ratio"] for c in checks]
        errors = [c[f"{kind}_ratio_stderr"] for c in checks]
        # Every check within 2 tau, and their mean within 1.25 tau, up to two standard errors.
        assert all(r - 2 * e <= 2 * TAU for r, e in zip(ratios, errors)), (kind, checks)
        mean_error = sum(e * e for e in errors) ** 0.5 / len(errors)
        assert sum(ratios) / len(ratios) - 2 * mean_error <= 1.25 * TAU, (kind, checks)


def test_a_check_refuses_a_pair_limit_below_its_minimum_before_it_runs():
    model = TinyTransformer(vocab=48, dim=32, depth=2)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    batches = iter([_batch(i) for i in range(4)])
    with pytest.raises(ValueError, match="max_pairs=2 is below min_pairs=8"):
        ctl.check_variance(lambda batch: F.cross_entropy(model(batch[0]), batch[1]), batches, max_pairs=2)
    assert len(list(batches)) == 4  # nothing consumed
