"""Exact mode equals plain PyTorch; attaching keeps what the user owns; detach leaves no trace."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcas
from models import Block, TinyCNN, TinyTransformer, token_batch


def _grads(model, tokens, labels):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(tokens), labels).backward()
    return [p.grad.clone() for p in model.parameters()]


def _module_fingerprint(model):
    """Everything attach could leave behind: instance attributes, hooks and classes."""
    return [(name, type(m), sorted(m.__dict__.keys()), len(m._forward_hooks),
             len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()]


@pytest.fixture
def pair():
    torch.manual_seed(0)
    model = TinyTransformer()
    return model, copy.deepcopy(model), token_batch()


def test_ratios_of_one_give_plain_pytorch_gradients(pair):
    model, reference, (tokens, labels) = pair
    ctl = vcas.attach(model)
    expected = _grads(reference, tokens, labels)
    for got, want in zip(_grads(model, tokens, labels), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ctl.set_ratios(act=1.0, weight=1.0)
    for got, want in zip(_grads(model, tokens, labels), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_paused_gives_exact_gradients(pair):
    model, reference, (tokens, labels) = pair
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=0.3, weight=0.3)
    with ctl.paused():
        got = _grads(model, tokens, labels)
    assert all(torch.equal(a, b) for a, b in zip(got, _grads(reference, tokens, labels)))


def test_attach_keeps_parameters_state_dict_and_classes(pair):
    model, _, (tokens, labels) = pair
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict().keys())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before attaching
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=0.5, weight=0.5)
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict().keys()) == keys_before
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(tokens), labels).backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_detach_restores_bit_for_bit_and_leaves_no_trace(pair):
    model, reference, (tokens, labels) = pair
    fingerprint = _module_fingerprint(model)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=0.4, weight=0.4)
    _grads(model, tokens, labels)
    ctl.detach()
    assert _module_fingerprint(model) == fingerprint
    got, want = _grads(model, tokens, labels), _grads(reference, tokens, labels)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(vcas.AttachError):
        ctl.set_ratios(act=0.5)
    vcas.attach(model).detach()  # attaching again after detach works


def test_attaching_twice_is_refused_and_leaves_model_untouched(pair):
    model, _, _ = pair
    vcas.attach(model)
    fingerprint = _module_fingerprint(model)
    with pytest.raises(vcas.AttachError, match="already"):
        vcas.attach(model)
    assert _module_fingerprint(model) == fingerprint


def test_two_models_in_one_process_do_not_interfere():
    torch.manual_seed(0)
    sampled, exact = TinyTransformer(), TinyTransformer()
    reference = copy.deepcopy(exact)
    tokens, labels = token_batch()
    ctl_a = vcas.attach(sampled, vcas.VCASConfig(seed=0))
    ctl_b = vcas.attach(exact, vcas.VCASConfig(seed=0))
    ctl_a.set_ratios(act=0.3, weight=0.3)
    _grads(sampled, tokens, labels)
    got = _grads(exact, tokens, labels)
    for a, b in zip(got, _grads(reference, tokens, labels)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ctl_b.stats()["act_ratios"] == [1.0, 1.0, 1.0]
    assert ctl_a.flops.train.backward_done < ctl_a.flops.train.backward_exact
    assert ctl_b.flops.train.backward_done == ctl_b.flops.train.backward_exact


def test_block_detection_and_explicit_blocks():
    model = TinyTransformer(depth=4)
    assert vcas.attach(model).block_names == [f"blocks.{i}" for i in range(4)]
    model = TinyTransformer(depth=4)
    ctl = vcas.attach(model, blocks=Block)
    assert len(ctl.block_names) == 4 and len(ctl.linear_names) == 16
    ctl.detach()
    ctl = vcas.attach(model, blocks=["blocks.3", "blocks.1"])
    assert ctl.block_names == ["blocks.1", "blocks.3"]  # input side first
    ctl.detach()
    assert vcas.attach(TinyCNN(depth=2)).block_names == ["blocks.0", "blocks.1"]


def test_models_without_blocks_get_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(vcas.BlockDetectionError, match="blocks="):
        vcas.attach(model)
    with pytest.raises(ValueError, match="not modules"):
        vcas.attach(TinyTransformer(), blocks=["blocks.9"])
    with pytest.raises(vcas.BlockDetectionError):
        vcas.attach(TinyTransformer(), blocks=42)
    assert "forward" not in model[0].__dict__


def test_frozen_and_eval_paths_stay_exact(pair):
    model, reference, (tokens, _) = pair
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=0.2, weight=0.2)
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))
