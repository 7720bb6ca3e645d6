"""Calibration leaves training untouched and its Monte-Carlo draws really differ."""

import copy
import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vcas
import vcas.control.paper
from models import TinyCNN, TinyTransformer, image_batch, token_batch


def _cnn_setup():
    torch.manual_seed(0)
    model = TinyCNN(depth=3)
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    return model, loss_fn, [image_batch(seed=s) for s in range(10, 13)]


def test_calibration_leaves_grads_optimizer_buffers_and_rng_untouched():
    model, loss_fn, calib = _cnn_setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    loss_fn(image_batch(seed=1)).backward()
    optimizer.step()
    # Gradient accumulation: two micro-batches accumulated, the step not taken yet.
    loss_fn(image_batch(seed=2)).backward()
    loss_fn(image_batch(seed=3)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = copy.deepcopy(optimizer.state_dict())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    ctl.calibrate(loss_fn, calib[:2])

    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    after = optimizer.state_dict()
    for key, value in opt_state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(after["state"][key][name]))
    assert torch.equal(rng[0], torch.get_rng_state())
    assert rng[1] == random.getstate()
    assert np.array_equal(rng[2], np.random.get_state()[1])
    assert ctl.stats()["updates"] == 1


def test_training_after_calibration_sees_the_same_dropout_as_without():
    torch.manual_seed(0)
    model = TinyTransformer(dropout=0.5)
    twin = copy.deepcopy(model)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    tokens, _ = token_batch()
    torch.manual_seed(5)
    ctl.calibrate(loss_fn, [token_batch(seed=s) for s in (7, 8)])
    with ctl.paused():
        out = model(tokens)
    torch.manual_seed(5)
    assert torch.equal(out, twin(tokens))


def test_sampled_draws_differ_and_share_the_dropout_masks(monkeypatch):
    torch.manual_seed(0)
    model = TinyTransformer(dropout=0.3)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, param_fraction=1.0, controller="paper"))
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    seen = []
    original = vcas.control.paper.subset_gradients

    def recording(loss, params, subsets, retain):
        grads = original(loss, params, subsets, retain)
        seen.append(torch.cat(list(grads.values())))
        return grads

    monkeypatch.setattr(vcas.control.paper, "subset_gradients", recording)
    ctl.set_ratios(act=0.4, weight=1.0)
    ctl.calibrate(loss_fn, [token_batch(n=16, seed=s) for s in (1, 2, 3)])
    # Per batch: one exact pass then M = 3 sampled passes, all pairwise different.
    assert len(seen) == 3 * 4
    for batch in range(3):
        draws = seen[batch * 4 + 1: batch * 4 + 4]
        assert not any(torch.equal(a, b) for a, b in itertools.combinations(draws, 2))
    # With ratios of 1 the sampled passes equal the exact one: same dropout masks.
    seen.clear()
    ctl.set_ratios(act=1.0, weight=1.0)
    ctl.policy.s = 1.0
    ctl.calibrate(loss_fn, [token_batch(seed=s) for s in (1, 2)])
    assert ctl.stats()["var_act"] == 0.0
    assert all(torch.equal(seen[0], g) for g in seen[1:3])


def test_maybe_calibrate_runs_every_update_every_optimizer_steps():
    model, loss_fn, calib = _cnn_setup()
    ctl = vcas.attach(model, vcas.VCASConfig(update_every=3, mc_samples=2, seed=0))
    source = iter([image_batch(seed=s) for s in range(100, 110)])
    ran = [ctl.maybe_calibrate(loss_fn, source) for _ in range(7)]
    assert ran == [False, False, True, False, False, True, False]
    assert len(list(source)) == 10 - 4  # exactly M batches drawn per calibration
    assert ctl.stats()["steps"] == 7 and ctl.stats()["updates"] == 2
    # An iterable (list, DataLoader) is cycled; set_ratios turns adaptation off.
    ctl.set_ratios(act=0.5)
    assert not any(ctl.maybe_calibrate(loss_fn, calib) for _ in range(6))
    ctl.calibrate(loss_fn, calib[:2])
    assert ctl.stats()["adapting"]
    with pytest.raises(ValueError, match="exhausted"):
        for _ in range(6):
            ctl.maybe_calibrate(loss_fn, iter([]))


def test_calibrate_rejects_bad_input():
    model, loss_fn, calib = _cnn_setup()
    ctl = vcas.attach(model)
    with pytest.raises(ValueError, match="at least 2"):
        ctl.calibrate(loss_fn, calib[:1])
    with pytest.raises(ValueError, match="scalar"):
        ctl.calibrate(lambda b: model(b[0]), calib[:2])


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_controller_adapts_and_trains_a_real_loop(controller):
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A large tau lets s fall quickly, so sampling is really exercised while training.
    ctl = vcas.attach(model, vcas.VCASConfig(update_every=5, s_step=0.1, tau_act=0.5, seed=0,
                                             controller=controller))
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])

    def batch(seed):  # class c draws its tokens from [16 c, 16 c + 16)
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 3, (32,), generator=g)
        return labels[:, None] * 16 + torch.randint(0, 16, (32, 6), generator=g), labels
    calib = itertools.cycle([batch(s) for s in range(1000, 1010)])
    losses = []
    for step in range(60):
        loss = loss_fn(batch(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ctl.maybe_calibrate(loss_fn, calib)
        losses.append(loss.item())
    stats = ctl.stats()
    # The paper's controller every 5 steps; the adaptive one from step 1, at most 5 apart.
    assert stats["updates"] == 12 if controller == "paper" else stats["updates"] >= 12
    assert stats["s"] < 1.0 and min(stats["act_ratios"]) < 1.0
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert ctl.flops.train.backward_done < ctl.flops.train.backward_exact
    assert stats["var_sgd"] > 0 and stats["var_act"] >= 0
    assert len(ctl.history) == stats["updates"]
