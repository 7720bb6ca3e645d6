"""Mixed precision and torch.compile with vcas attached.

- bf16 autocast (CPU): at ratio 1 the gradient is bit-identical to autocast without vcas; sampled,
  it is unbiased with respect to that autocast gradient (statistical check as in test_unbiased).
- fp16 with GradScaler (CPU here; the same code runs on CUDA): steps the scaler skips for inf/NaN
  are not counted, and calibration measures the unscaled loss.
- torch.compile works (pinned here with the fast ``aot_eager`` backend; inductor gives the same
  gradients): vcas's sampled ops run eagerly between compiled regions (graph breaks).
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import vcas
from models import TinyTransformer, token_batch
from stats import assert_unbiased, bias_statistics, sampled_gradients


def _autocast_loss(model, batch, dtype):
    with torch.autocast("cpu", dtype=dtype):
        return F.cross_entropy(model(batch[0]).float(), batch[1])


def test_bf16_autocast_at_ratio_one_is_bit_identical_to_autocast_without_vcas():
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    reference = copy.deepcopy(model)
    batch = token_batch(n=8, t=6)
    vcas.attach(model, vcas.VCASConfig(seed=0))
    grads = torch.autograd.grad(_autocast_loss(model, batch, torch.bfloat16), list(model.parameters()))
    exact = torch.autograd.grad(_autocast_loss(reference, batch, torch.bfloat16), list(reference.parameters()))
    assert all(torch.equal(g, e) for g, e in zip(grads, exact))


def test_bf16_sampled_gradient_is_unbiased():
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    reference = copy.deepcopy(model)
    batch = token_batch(n=8, t=6)
    exact = torch.autograd.grad(_autocast_loss(reference, batch, torch.bfloat16), list(reference.parameters()))
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=0.5, weight=0.5)
    samples = sampled_gradients(model, _autocast_loss(model, batch, torch.bfloat16), draws=40)
    stats = bias_statistics(samples, [e.detach() for e in exact])
    assert all(math.isfinite(float(s.sum())) for s in samples)
    assert_unbiased(stats)


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_fp16_grad_scaler_skipped_steps_do_not_feed_the_controller(controller):
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, update_every=2, controller=controller))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A scale far too large: the first steps overflow in fp16 and the scaler skips them.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    loss_fn = lambda batch: _autocast_loss(model, batch, torch.float16)
    calibration_batches = (token_batch(n=16, seed=1000 + i) for i in itertools.count())
    skipped = 0
    for step in range(16):
        scaler.scale(loss_fn(token_batch(n=16, seed=step))).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        if scaler.get_scale() < scale:  # the step was skipped: not an optimizer step
            skipped += 1
            continue
        ctl.maybe_calibrate(loss_fn, calibration_batches)
    stats = ctl.stats()
    assert 0 < skipped < 16 and stats["steps"] == 16 - skipped
    if controller == "paper":
        assert stats["updates"] == stats["steps"] // 2
    else:  # the overflowed steps' records are dropped: the first calibration decides at once
        assert stats["updates"] >= 1 and ctl.history[0]["step"] == 1
    assert stats["skipped_updates"] == 0
    # Calibration measured the unscaled loss: the same variance as in fp32 (not 2**k times it).
    batches = [token_batch(n=16, seed=s) for s in (50, 51)]
    ctl.detach()
    fp32 = copy.deepcopy(model)
    fp16_ctl = vcas.attach(model, vcas.VCASConfig(seed=0, controller=controller))
    fp32_ctl = vcas.attach(fp32, vcas.VCASConfig(seed=0, controller=controller))
    fp16_ctl.calibrate(loss_fn, batches)
    fp32_ctl.calibrate(lambda b: F.cross_entropy(fp32(b[0]), b[1]), batches)
    assert fp16_ctl.stats()["var_sgd"] == pytest.approx(fp32_ctl.stats()["var_sgd"], rel=0.1)


def test_torch_compile_works_with_vcas_attached():
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    try:
        ctl = vcas.attach(compiled, vcas.VCASConfig(seed=0, update_every=1))
        assert ctl.block_names == ["blocks.0", "blocks.1", "blocks.2"]  # the wrapper is looked through
        eager = vcas.attach(twin, vcas.VCASConfig(seed=0))
        for controller in (ctl, eager):
            controller.set_ratios(act=0.3, weight=0.3)
        x, y = token_batch(n=16)
        F.cross_entropy(compiled(x), y).backward()
        F.cross_entropy(twin(x), y).backward()
        # Eager blocks recompute compactly (tracing keeps the full backward): equal up to rounding.
        assert all(torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)
                   for a, b in zip(model.parameters(), twin.parameters()))
        assert ctl.stats()["bp_flops_reduction"] == eager.stats()["bp_flops_reduction"] > 0
        ctl.calibrate(lambda b: F.cross_entropy(compiled(b[0]), b[1]),
                      [token_batch(n=16, seed=s) for s in (1, 2)])
        assert ctl.stats()["updates"] == 1
    finally:
        torch._dynamo.reset()
