"""The variance bound held honestly: an independent large-sample check at several points of a
training run, for both controllers (issue 7)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import vcas
from models import TinyTransformer

TAU = 0.1


def _batch(seed, n=32):  # class c draws its tokens from [16 c, 16 c + 16), plus noise tokens
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    tokens = labels[:, None] * 16 + torch.randint(0, 16, (n, 8), generator=g)
    noise = torch.rand(n, 8, generator=g) < 0.3
    return torch.where(noise, torch.randint(0, 48, (n, 8), generator=g), tokens), labels


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_measured_variance_stays_near_tau(controller):
    torch.manual_seed(0)
    model = TinyTransformer(vocab=48, dim=32, depth=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    config = vcas.VCASConfig(controller=controller, tau_act=TAU, tau_w=TAU, update_every=10,
                             s_step=0.05, param_fraction=0.25, seed=0)
    ctl = vcas.attach(model, config)
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
    calibration = itertools.cycle([_batch(10_000 + i) for i in range(40)])
    checks = []
    for step in range(1, 61):
        loss_fn(_batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        ctl.maybe_calibrate(loss_fn, calibration)
        if step % 20 == 0:
            checks.append(ctl.check_variance(loss_fn, [_batch(20_000 + step + i) for i in range(8)],
                                             draws=4))
    act = sum(c["act_ratio"] for c in checks) / len(checks)
    weight = sum(c["weight_ratio"] for c in checks) / len(checks)
    assert ctl.stats()["bp_flops_reduction"] > 0.05  # sampling is really active
    print(controller, [round(c["act_ratio"], 4) for c in checks], [round(c["weight_ratio"], 4) for c in checks])
    assert act < 3 * TAU and weight < 3 * TAU, (act, weight, checks)
