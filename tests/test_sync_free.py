"""The sync-free path (VCASConfig(sync_free=True), the default on CUDA): a sampled training step
reads nothing back to the host, and stays unbiased, also where the reserved room overflows.

On the CPU a host sync cannot be observed, so the test runs the steps under a torch-function
mode that fails on every call that would sync with a GPU: ``.item()``, ``.tolist()``,
``bool(tensor)``, ``float(tensor)``, ``int(tensor)``, ``nonzero``, masked selections and the like.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import vcas
from models import TinyCNN, TinyTransformer, image_batch, token_batch
from stats import EXPECTATION_TOLERANCE, assert_unbiased, bias_statistics, expectation_error, sampled_gradients
from test_architectures import _batch, _loss, _model

pytestmark = pytest.mark.usefixtures("one_thread")

_SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
            torch.Tensor.__int__, torch.Tensor.__index__, torch.nonzero, torch.Tensor.nonzero,
            torch.masked_select, torch.Tensor.masked_select, torch.argwhere, torch.Tensor.argwhere,
            torch.unique, torch.Tensor.unique, torch.unique_consecutive, torch.Tensor.cpu,
            torch.Tensor.numpy}


class SyncError(AssertionError):
    pass


class FailOnSync(TorchFunctionMode):
    """Raises on any call that reads a tensor's data or a data-dependent size on the host."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            raise SyncError(f"host sync: {getattr(func, '__name__', func)}")
        if func is torch.where and len(args) + len(kwargs) == 1:
            raise SyncError("host sync: torch.where(condition)")
        if func is torch.repeat_interleave and "output_size" not in kwargs:
            raise SyncError("host sync: repeat_interleave without output_size")
        if func is torch.Tensor.__getitem__ and _has_bool_index(args[1] if len(args) > 1 else None):
            raise SyncError("host sync: boolean-mask indexing")
        return func(*args, **kwargs)


def _has_bool_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def test_the_guard_catches_syncs():
    x = torch.randn(4)
    for call in (lambda: x.sum().item(), lambda: bool(x[0] > 0), lambda: torch.nonzero(x),
                 lambda: x[x > 0], lambda: float(x[0]), lambda: x.tolist()):
        with pytest.raises(SyncError), FailOnSync():
            call()


CASES = {
    "transformer-compact": (lambda: TinyTransformer(depth=3, dropout=0.1), token_batch, dict(recompute_below=1.0)),
    "transformer-full": (lambda: TinyTransformer(depth=3), token_batch, dict(recompute_below=0.0, gather_below=1.0)),
    "cnn-frozen-batchnorm": (lambda: TinyCNN(depth=3).eval(), image_batch, dict(recompute_below=1.0)),
}


def _attached(name, controller="adaptive", **extra):
    build, batch_of, options = CASES[name]
    torch.manual_seed(0)
    model = build()
    config = vcas.VCASConfig(seed=0, sync_free=True, min_weight_numel=0, controller=controller, **options, **extra)
    return model, vcas.attach(model, config), batch_of


@pytest.mark.parametrize("name", CASES)
def test_a_sampled_training_step_reads_nothing_back_to_the_host(name):
    model, ctl, batch_of = _attached(name)
    ctl.set_ratios(act=0.4, weight=0.4)
    for seed in range(4):  # past compact recompute's verifying uses
        inputs, labels = batch_of(n=8, seed=seed)
        F.cross_entropy(model(inputs), labels).backward()
    assert not any(status == "unverified" for status in ctl.compact_status().values())
    inputs, labels = batch_of(n=8, seed=10)
    with FailOnSync():
        F.cross_entropy(model(inputs), labels).backward()
    assert ctl.stats()["sampling_bp_flops_reduction"] > 0  # read afterwards



@pytest.mark.parametrize("name", ["transformer-compact", "cnn-frozen-batchnorm"])
def test_blocks_at_low_ratios_are_verified_and_recompute_compactly(name):
    """Inside a compact re-run every sample is a kept one: the sampled layers there reserve room
    for all of them. Room for only the block's keep ratio of them would thin the rows at random,
    and the verification would then read the block as mixing samples and refuse it."""
    model, ctl, batch_of = _attached(name)
    ctl.set_ratios(act=0.4, weight=0.4)
    for seed in range(4):  # the verifying uses, on batches large enough to keep about 26 samples
        inputs, labels = batch_of(n=64, seed=seed)
        F.cross_entropy(model(inputs), labels).backward()
    assert set(ctl.compact_status().values()) == {"compact"}

def test_an_adaptive_calibration_step_reads_nothing_back_to_the_host_either():
    model, ctl, batch_of = _attached("transformer-full")
    assert ctl.calibrating  # the first step records
    inputs, labels = batch_of(n=8, seed=0)
    with FailOnSync():
        F.cross_entropy(model(inputs), labels).backward()
    assert ctl.maybe_calibrate() and ctl.stats()["updates"] == 1  # the records are taken here


@pytest.mark.parametrize("name", CASES)
def test_at_ratio_one_the_sync_free_path_gives_the_exact_gradient(name):
    model, ctl, batch_of = _attached(name)
    ctl.set_ratios(act=1.0, weight=1.0)
    inputs, labels = batch_of(n=8, seed=3)

    def loss_of(m):
        torch.manual_seed(5)  # the same dropout masks
        return F.cross_entropy(m(inputs), labels)

    params = list(model.parameters())
    got = torch.autograd.grad(loss_of(model), params, allow_unused=True)
    with ctl.paused():
        want = torch.autograd.grad(loss_of(model), params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-5, atol=1e-7))


@pytest.mark.parametrize("name", CASES)
def test_the_sync_free_path_at_its_expectation_gives_the_exact_gradient(name):
    model, ctl, batch_of = _attached(name)
    ctl.set_ratios(act=0.4, weight=0.4)
    inputs, labels = batch_of(n=8, seed=3)
    for seed in range(4):
        F.cross_entropy(model(batch_of(n=8, seed=seed)[0]), batch_of(n=8, seed=seed)[1]).backward()

    def loss_of(m):
        torch.manual_seed(5)  # the same dropout masks
        return F.cross_entropy(m(inputs), labels)

    assert expectation_error(model, ctl, loss_of) < EXPECTATION_TOLERANCE


def test_overflowing_the_reserved_room_stays_unbiased():
    """After a BatchNorm in training mode the rows are dense again: far more rows are non-zero
    than the room reserved from a keep ratio of 0.3, so the sync-free path thins them at random
    and re-weights; the estimate stays unbiased."""
    torch.manual_seed(0)
    model = TinyCNN(depth=3)  # BatchNorm in training mode
    images, labels = image_batch(n=8)
    loss_of = lambda m: F.cross_entropy(m(images), labels)
    reference = copy.deepcopy(model)
    exact = [g.detach() for g in torch.autograd.grad(loss_of(reference), list(reference.parameters()))]
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, sync_free=True, controller="paper", recompute_below=0.0,
                                             gather_below=1.0))
    ctl.set_ratios(act=0.3, weight=1.0)
    assert_unbiased(bias_statistics(sampled_gradients(model, loss_of(model), 600), exact))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_transformers_families_on_the_sync_free_path(family):
    model = _model(family).train()
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, sync_free=True, min_weight_numel=0, recompute_below=1.0))
    ctl.set_ratios(act=0.4, weight=0.4)
    for seed in range(4):
        _loss(model, _batch(family, seed=seed)).backward()
    batch = _batch(family, seed=9)
    with FailOnSync():
        _loss(model, batch).backward()
    assert expectation_error(model, ctl, lambda m: _loss(m, batch)) < EXPECTATION_TOLERANCE
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    check = ctl.check_flops(lambda: (_loss(model, batch).backward(), optimizer.step(), optimizer.zero_grad()))
    assert (check["counted"] > 0 and check["ratio"] == pytest.approx(1.0, abs=1e-9)) or check["scope"] != "model"
