"""Compact recompute (vcas.ops.recompute): the same gradients as the full sampled backward,
unbiased, honest FLOPs, and a clean fallback for blocks it cannot recompute."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcas
from models import TinyCNN, TinyTransformer, image_batch, token_batch
from stats import EXPECTATION_TOLERANCE, assert_unbiased, bias_statistics, biased, expectation_error, sampled_gradients

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(model, act=0.5, weight=0.5, recompute_below=1.0, **attach_kwargs):
    """The model with the full sampled backward and a copy that recomputes compactly."""
    full, compact = model, copy.deepcopy(model)
    ctl_full = vcas.attach(full, vcas.VCASConfig(seed=0), **attach_kwargs)
    ctl_compact = vcas.attach(compact, vcas.VCASConfig(seed=0, recompute_below=recompute_below),
                              **attach_kwargs)
    for ctl in (ctl_full, ctl_compact):
        ctl.set_ratios(act=act, weight=weight)
    return (full, ctl_full), (compact, ctl_compact)


def _status(ctl):
    return set(ctl.compact_status().values())


def _grads(model, loss_of, seed=1):
    torch.manual_seed(seed)  # the same dropout masks in both models
    model.zero_grad(set_to_none=True)
    loss_of(model).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b, rtol=1e-4):
    assert a.keys() == b.keys()
    floor = max(float(g.abs().max()) for g in a.values()) * 1e-6  # gradients that are 0 in exact math
    for name in a:
        scale = float(a[name].abs().max())
        assert float((a[name] - b[name]).abs().max()) <= rtol * scale + floor, name


def _transformer_pair(dropout):
    """A 3-block transformer in both variants of :func:`_pair`, and its loss on one batch."""
    torch.manual_seed(0)
    model = TinyTransformer(depth=3, dropout=dropout).train()
    tokens, labels = token_batch(n=8, t=6)
    return _pair(model), lambda m: F.cross_entropy(m(tokens), labels)


def test_same_gradients_as_the_full_sampled_backward_with_dropout():
    ((full, ctl_full), (compact, ctl_compact)), loss_of = _transformer_pair(dropout=0.2)
    for _ in range(2):  # verifying uses: the full backward, and the checks beside it
        _assert_same_grads(_grads(full, loss_of), _grads(compact, loss_of), rtol=0)
    assert _status(ctl_compact) == {"compact"}
    for _ in range(3):  # the sampler draws in the same order in both: the same gradients
        _assert_same_grads(_grads(full, loss_of), _grads(compact, loss_of))
    assert ctl_compact.stats()["compact_backwards"] == 3 * 3
    # The same FLOPs in the sampled layers: the re-run reuses the linear outputs of the forward
    # (the verifying uses' checks count as calibration work).
    f, c = ctl_full.flops.train, ctl_compact.flops.train
    assert (c.forward, c.backward_exact, c.backward_done) == pytest.approx(
        (f.forward, f.backward_exact, f.backward_done))


@pytest.mark.parametrize("p", [0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recorded_dropout_is_f_dropout_bit_for_bit_and_replays_on_a_subset(dtype, p):
    """The compact forward's dropout draws the numbers and computes the values of F.dropout (a
    lockstep run against exact training sees the same activations and random state after), and
    the replay on the kept samples applies the same mask to them."""
    from vcas.ops.recompute import _dropout_with_mask, _replay_dropout

    x = torch.randn(6, 5, 7).to(dtype).transpose(1, 2)  # non-contiguous, as attention scores can be
    torch.manual_seed(11)
    expected = F.dropout(x, p, training=True)
    after_expected = torch.rand(3)
    torch.manual_seed(11)
    output, mask = _dropout_with_mask(x, p)
    assert torch.equal(torch.rand(3), after_expected)  # the same draws consumed
    assert torch.equal(output, expected)
    kept = torch.tensor([0, 3, 4])
    assert torch.equal(_replay_dropout(x[kept], mask[kept], p), expected[kept])


def test_hf_bert_with_dropout_and_attention_mask():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, num_labels=3,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).train()
    ids = torch.randint(1, 100, (6, 10))
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[:3, 7:] = 0  # padding
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    (full, _), (compact, ctl) = _pair(model, act=0.5, weight=0.5)
    loss_of = lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss
    for _ in range(4):
        _assert_same_grads(_grads(full, loss_of), _grads(compact, loss_of))
    assert _status(ctl) == {"compact"} and ctl.stats()["compact_backwards"] > 0


def test_a_block_seen_drawing_no_random_numbers_runs_without_the_mode_until_it_draws_some():
    ((full, _), (compact, ctl)), loss_of = _transformer_pair(dropout=0.0)
    for _ in range(4):
        _assert_same_grads(_grads(full, loss_of), _grads(compact, loss_of))
    blocks = ctl.mechanism.installation.compact_blocks.values()
    assert all(b.status == "compact" and not b.intercept for b in blocks)
    for m in list(full.modules()) + list(compact.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.3  # from now on the blocks draw dropout masks the re-run must replay
    for _ in range(2):
        _assert_same_grads(_grads(full, loss_of), _grads(compact, loss_of))
    assert all(b.status == "compact" and b.intercept for b in blocks)


def test_compact_recompute_is_unbiased():
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    tokens, labels = token_batch(n=8, t=6)
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    exact = [g.detach() for g in torch.autograd.grad(F.cross_entropy(reference(tokens), labels), params)]
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, recompute_below=1.0))
    ctl.set_ratios(act=0.25, weight=0.5)
    for seed in range(6):  # past the verifying uses
        F.cross_entropy(model(token_batch(n=8, t=6, seed=seed)[0]), labels).backward()
    model.zero_grad()
    assert _status(ctl) == {"compact"}
    samples = sampled_gradients(model, F.cross_entropy(model(tokens), labels), 300)
    assert_unbiased(bias_statistics(samples, exact))


def test_above_the_threshold_the_block_runs_as_usual():
    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, recompute_below=0.3))
    ctl.set_ratios(act=0.5, weight=1.0)
    tokens, labels = token_batch(n=8, t=6)
    F.cross_entropy(model(tokens), labels).backward()
    assert _status(ctl) == {"unverified"} and ctl.stats()["compact_backwards"] == 0


class _DropPath(nn.Module):
    """Stochastic depth with torch.rand: randomness a re-run cannot replay."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        keep = (torch.rand(x.shape[0], 1, 1) > 0.2).to(x.dtype)
        return x + self.fc(x) * keep


class _TwoOutputs(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.fc(x)
        return y, y.mean()  # a second differentiable output


class _Stack(nn.Module):
    def __init__(self, block, dim=8, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList([block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        extra = 0.0
        for block in self.blocks:
            out = block(x)
            x, extra = (out[0], extra + out[1]) if isinstance(out, tuple) else (out, extra)
        return self.head(x.mean(1)) + extra


@pytest.mark.parametrize("block, reason", [(_DropPath, "random numbers with rand"),
                                           (_TwoOutputs, "second floating-point")])
def test_blocks_it_cannot_recompute_fall_back_with_a_warning(block, reason, caplog):
    torch.manual_seed(0)
    model = _Stack(block)
    x, labels = torch.randn(6, 5, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    (full, _), (compact, ctl) = _pair(model, act=0.5, weight=1.0)
    loss_of = lambda m: F.cross_entropy(m(x), labels)
    with caplog.at_level(logging.WARNING, logger="vcas"):
        _assert_same_grads(_grads(full, loss_of), _grads(compact, loss_of))
    assert reason in caplog.text
    assert all(status.startswith("full") for status in _status(ctl))


def test_batchnorm_in_training_mode_falls_back_and_frozen_batchnorm_recomputes():
    torch.manual_seed(0)
    model = TinyCNN(depth=2)
    images, labels = image_batch(n=6)
    loss_of = lambda m: F.cross_entropy(m(images), labels)
    (full, _), (compact, ctl) = _pair(copy.deepcopy(model).train(), act=0.5, weight=1.0)
    _assert_same_grads(_grads(full, loss_of), _grads(compact, loss_of))
    assert all("BatchNorm in training mode" in status for status in _status(ctl))

    (full, _), (compact, ctl) = _pair(copy.deepcopy(model).eval(), act=0.5, weight=1.0)
    for _ in range(4):
        _assert_same_grads(_grads(full, loss_of), _grads(compact, loss_of))
    assert _status(ctl) == {"compact"}


def test_bf16_autocast_matches_the_full_backward():
    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    tokens, labels = token_batch(n=8, t=6)
    (full, _), (compact, ctl) = _pair(model)

    def loss_of(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(m(tokens), labels)
    for _ in range(4):
        _assert_same_grads(_grads(full, loss_of), _grads(compact, loss_of), rtol=2e-2)
    assert _status(ctl) == {"compact"} and ctl.stats()["compact_backwards"] > 0  # the compact path ran


def test_nothing_kept_and_detach_restores_the_blocks():
    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    tokens, _labels = token_batch(n=1, t=4)
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, recompute_below=1.0))
    ctl.set_ratios(act=0.5, weight=0.5)
    # A loss that does not depend on the blocks' output: every block receives a zero gradient.
    (model(tokens).sum() * 0).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.blocks.parameters())
    ctl.detach()
    assert {name: dict(m.__dict__).keys() for name, m in model.named_modules()} == \
        {name: d.keys() for name, d in before.items()}


def test_flop_counter_mode_over_the_forward_turns_recompute_off_and_over_the_backward_only_fails_clearly():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, recompute_below=1.0))
    ctl.set_ratios(act=0.5, weight=0.5)
    tokens, labels = token_batch(n=8, t=6)
    with FlopCounterMode(display=False):
        F.cross_entropy(model(tokens), labels).backward()
    assert _status(ctl) == {"unverified"}
    for _ in range(3):
        F.cross_entropy(model(tokens), labels).backward()
    assert _status(ctl) == {"compact"}
    loss = F.cross_entropy(model(tokens), labels)
    with pytest.raises(RuntimeError, match="enter FlopCounterMode before the forward"), \
            FlopCounterMode(display=False):
        loss.backward()


# ------------------------------------------------------------------ blocks that mix samples
class _Residual(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)


class _MeanCentering(_Residual):
    """Subtracts the batch mean before a linear: the replayed linear output hides it."""

    def forward(self, x):
        return x + self.fc(x - x.mean(0))


class _BatchStatistics(_Residual):
    """Normalisation by batch statistics without a BatchNorm module."""

    def forward(self, x):
        centred = x - x.mean((0, 1), keepdim=True)
        return x + self.fc(centred / centred.pow(2).mean((0, 1), keepdim=True).add(1e-5).sqrt())


class _Cumulative(_Residual):
    """A running sum over the batch."""

    def forward(self, x):
        steps = torch.arange(1, x.shape[0] + 1, dtype=x.dtype).view(-1, 1, 1)
        return x + self.fc(torch.cumsum(x, 0) / steps)


class _AttentionAcrossTheBatch(_Residual):
    """Every sample attends to every other sample."""

    def forward(self, x):
        flat = x.reshape(x.shape[0], -1)
        weights = torch.softmax(flat @ flat.t() / flat.shape[1] ** 0.5, dim=1)
        return x + self.fc((weights @ flat).view_as(x))


class _GradientOnlyMixing(_Residual):
    """Per-sample in the forward (the added term is zero), mixing samples in the backward only."""

    def forward(self, x):
        return x + self.fc(x) + (x - x.detach()).mean(0, keepdim=True)


class _CapacityMoE(nn.Module):
    """Top-1 routing to two experts with a capacity over the whole batch's tokens; tokens over
    an expert's capacity pass through."""

    def __init__(self, dim=8):
        super().__init__()
        self.router = nn.Linear(dim, 2)
        self.experts = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        choice = self.router(tokens).argmax(-1)
        capacity = max(1, int(0.3 * tokens.shape[0]))
        out = tokens.clone()
        for e, expert in enumerate(self.experts):
            routed = torch.nonzero(choice == e).squeeze(1)[:capacity]
            out = out.index_add(0, routed, expert(tokens.index_select(0, routed)))
        return out.view_as(x)


MIXING = {"mean-centering": _MeanCentering, "batch-statistics": _BatchStatistics,
          "cumulative": _Cumulative, "attention-across-the-batch": _AttentionAcrossTheBatch,
          "gradient-only": _GradientOnlyMixing, "moe-capacity": _CapacityMoE}


class _MixingStack(nn.Module):
    """One block that mixes samples (the top block: its kept sets are the sampler's, so each
    use shows whether the compact re-run is right) between two linears: its input gradient
    reaches a parameter below it."""

    def __init__(self, block, dim=8, depth=1):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([block(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def _mixing_case(block):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = _MixingStack(block)
    x, labels = torch.randn(8, 4, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    return model, lambda m: F.cross_entropy(m(x), labels)


def _warmed_up(block, caplog):
    model, loss_of = _mixing_case(block)
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    exact = [torch.zeros_like(p) if g is None else g.detach()
             for g, p in zip(torch.autograd.grad(loss_of(reference), params, allow_unused=True), params)]
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, recompute_below=1.0), blocks=["blocks.0"])
    ctl.set_ratios(act=0.5, weight=1.0)
    with caplog.at_level(logging.WARNING, logger="vcas"):
        for _ in range(4):
            loss_of(model).backward()
    model.zero_grad()
    return model, loss_of, ctl, exact


@pytest.mark.parametrize("name", MIXING)
def test_blocks_that_mix_samples_fall_back_once_with_a_warning_and_stay_unbiased(name, caplog):
    model, loss_of, ctl, exact = _warmed_up(MIXING[name], caplog)
    assert all(status.startswith("full") for status in _status(ctl)), ctl.compact_status()
    assert caplog.text.count("backpropagated in full") == len(ctl.compact_status())  # once per block
    before = ctl.stats()["compact_backwards"]
    assert_unbiased(bias_statistics(sampled_gradients(model, loss_of(model), 400), exact))
    assert ctl.stats()["compact_backwards"] == before  # the full sampled backward ran


def _force_compact(ctl):
    for block in ctl.mechanism.installation.compact_blocks.values():
        block.status, block.reason = "compact", None


@pytest.mark.parametrize("name", ["mean-centering", "batch-statistics", "cumulative"])
def test_negative_control_forced_compact_recompute_of_a_mixing_block_is_caught(name, caplog):
    """The statistical check fails when such a block is made to recompute compactly anyway."""
    model, loss_of, ctl, exact = _warmed_up(MIXING[name], caplog)
    _force_compact(ctl)
    stats = bias_statistics(sampled_gradients(model, loss_of(model), 400), exact)
    assert ctl.stats()["compact_backwards"] > 0
    assert biased(stats), stats


@pytest.mark.parametrize("name", [n for n in MIXING if n != "moe-capacity"])
def test_negative_control_forced_compact_recompute_misses_the_expectation(name, caplog):
    """Deterministically, for every mixing block: with some samples' loss weighted 0 (dropped
    for certain) and the other keep decisions at their expectation, the full backward the
    fallback runs gives the exact gradient and a forced compact re-run does not. (The
    capacity-routed block cannot be forced: its experts see other numbers of tokens in a re-run,
    and the re-run fails loudly.)"""
    model, _, ctl, _ = _warmed_up(MIXING[name], caplog)
    g = torch.Generator().manual_seed(2)
    x, labels = torch.randn(8, 4, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])

    def loss_of(m):
        return (F.cross_entropy(m(x), labels, reduction="none") * weights).mean()

    assert expectation_error(model, ctl, loss_of) < EXPECTATION_TOLERANCE
    _force_compact(ctl)
    assert expectation_error(model, ctl, loss_of) > 1e-2


def test_the_transformer_families_recompute_compactly():
    from test_architectures import _batch, _loss, _model

    expected_full = {"t5": {"encoder.block.0", "decoder.block.0"}}  # they return their position bias
    for family in ("bert", "gpt2", "llama", "t5", "vit"):
        model = _model(family).train()
        ctl = vcas.attach(model, vcas.VCASConfig(seed=0, recompute_below=1.0, min_weight_numel=0))
        ctl.set_ratios(act=0.5, weight=0.5)
        for step in range(4):
            model.zero_grad()
            _loss(model, _batch(family, seed=step)).backward()
        status = ctl.compact_status()
        full = {name for name, value in status.items() if value.startswith("full")}
        assert full == expected_full.get(family, set()), (family, status)
        assert all(status[name] == "compact" for name in status if name not in full)
        assert ctl.stats()["compact_backwards"] > 0
