"""Traps a user adopting vcas could walk into: each one is refused with the fix, or bounded and
said out loud, and a failed attach leaves the model as it was."""

import copy
import io
import itertools
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcas
from models import NormBlocksOnly, TinyCNN, TinyTransformer, image_batch, token_batch


def _snapshot(model):
    """Everything attach could change: module attributes, hooks, parameters and buffers."""
    return ({name: sorted(m.__dict__) for name, m in model.named_modules()},
            {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for name, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


def _same(before, after):
    assert before[0] == after[0] and before[1] == after[1]
    assert before[2].keys() == after[2].keys()
    assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])


# ------------------------------------------------------------------ never stepping the controller
def test_never_calling_maybe_calibrate_keeps_memory_bounded_and_says_what_to_call():
    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))  # adaptive: the first step records
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    recorder = ctl.mechanism.runtime.recorder
    sizes = {}
    with pytest.warns(UserWarning, match="maybe_calibrate") as caught:
        for step in range(1, 300):
            F.cross_entropy(model(token_batch(seed=step)[0]), token_batch(seed=step)[1]).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step in (100, 299):
                sizes[step] = recorder.passes
    assert sizes[100] == sizes[299] == recorder.max_passes  # only the last passes are kept
    messages = [str(w.message) for w in caught]
    assert sum("backward passes recorded" in m for m in messages) == 1  # said once
    assert sum("training forwards without a controller step" in m for m in messages) == 1
    assert any("optimizer=" in m for m in messages)
    assert ctl.stats()["steps"] == 0


# ------------------------------------------------------------------ saving and copying
@pytest.mark.parametrize("action", ["torch.save", "pickle", "deepcopy"])
def test_saving_or_copying_an_attached_model_is_refused_with_the_fix(action):
    model = TinyTransformer(depth=2)
    ctl = vcas.attach(model)

    def act(m):
        if action == "torch.save":
            torch.save(m, io.BytesIO())
        elif action == "pickle":
            pickle.dumps(m)
        else:
            return copy.deepcopy(m)

    with pytest.raises(vcas.AttachError, match=r"detach\(\)") as error:
        act(model)
    assert "state_dict" in str(error.value)
    torch.save(model.state_dict(), io.BytesIO())  # the supported way works while attached
    ctl.detach()
    copied = act(model)  # a plain model again: saved and copied as usual
    if copied is not None:
        assert not vcas.install.installation.is_attached(copied)


# ------------------------------------------------------------------ the paper controller's batches
def test_the_paper_controller_without_batches_fails_at_the_first_step_with_the_fix():
    model = TinyCNN(depth=2)  # BatchNorm in training mode: auto chooses the paper controller
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    assert ctl.config.controller == "paper"
    F.cross_entropy(model(image_batch()[0]), image_batch()[1]).backward()
    with pytest.raises(vcas.ConfigError, match=r"maybe_calibrate\(loss_fn, batches\).*calibration_data"):
        ctl.maybe_calibrate()
    # With the batches (here at attach) it calibrates at update_every.
    model2 = TinyCNN(depth=2)
    loss_fn = lambda batch: F.cross_entropy(model2(batch[0]), batch[1])
    ctl2 = vcas.attach(model2, vcas.VCASConfig(seed=0, update_every=2), loss_fn=loss_fn,
                       calibration_data=[image_batch(seed=s) for s in range(4)])
    assert [ctl2.maybe_calibrate() for _ in range(4)] == [False, True, False, True]


def test_the_paper_controller_hooked_to_the_optimizer_needs_its_batches_at_attach():
    model = TinyCNN(depth=2)
    before = _snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(vcas.ConfigError, match="calibration_data"):
        vcas.attach(model, vcas.VCASConfig(seed=0), optimizer=optimizer)
    _same(before, _snapshot(model))


# ------------------------------------------------------------------ failed attaches change nothing
class _ShardedLikeFSDP1(nn.Module):
    """Stands in for FSDP1's wrapper (the check looks at the class name along the MRO)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


_ShardedLikeFSDP1.__name__ = "FullyShardedDataParallel"


def _failing_attaches():
    yield "adaptive without sampled layers", NormBlocksOnly(), dict(
        config=vcas.VCASConfig(controller="adaptive"), blocks=["blocks.0", "blocks.1"]), vcas.AttachError
    yield ("a config error", TinyTransformer(depth=2), dict(config=vcas.VCASConfig(min_update_every=30)),
           vcas.ConfigError)
    yield "a pattern that matches nothing", TinyTransformer(depth=2), dict(include="nothing*"), vcas.ConfigError
    yield "an unknown block", TinyTransformer(depth=2), dict(blocks=["blocks.9"]), vcas.BlockDetectionError
    yield "FSDP1 inside", nn.Sequential(_ShardedLikeFSDP1(TinyTransformer(depth=2))), {}, vcas.AttachError


@pytest.mark.parametrize("case", list(_failing_attaches()), ids=lambda case: case[0])
def test_a_failed_attach_leaves_the_model_untouched(case):
    _, model, options, error = case
    before = _snapshot(model)
    with pytest.raises(error):
        vcas.attach(model, **options)
    _same(before, _snapshot(model))


def test_attaching_twice_is_refused_and_the_first_attachment_stays():
    model = TinyTransformer(depth=2)
    ctl = vcas.attach(model)
    attached = _snapshot(model)
    with pytest.raises(vcas.AttachError, match="already has vcas attached"):
        vcas.attach(model)
    _same(attached, _snapshot(model))
    ctl.detach()


def test_optimizer_hook_counts_steps_without_maybe_calibrate():
    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, update_every=4), optimizer=optimizer)
    for step in itertools.count():
        if step == 10:
            break
        F.cross_entropy(model(token_batch(seed=step)[0]), token_batch(seed=step)[1]).backward()
        optimizer.step()
        optimizer.zero_grad()
    stats = ctl.stats()
    assert stats["steps"] == 10 and stats["updates"] >= 2
    with pytest.raises(vcas.AttachError, match="counts optimizer steps itself"):
        ctl.maybe_calibrate()
    ctl.detach()
    optimizer.step()  # the hook is gone with the controller
    assert ctl.stats()["steps"] == 10
