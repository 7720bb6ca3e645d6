"""FLOPs accounting: what the sampled layers did, against stock PyTorch and against an exact
backward that skips exactly-zero rows, cross-checked with independent counts of what ran."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vcas
from models import TinyTransformer, token_batch
from test_architectures import V, _batch, _loss, _model

pytestmark = pytest.mark.usefixtures("one_thread")


class MLPBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def _linear_only_model():
    torch.manual_seed(0)
    return nn.Sequential(*[MLPBlock(8) for _ in range(3)])


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_sampled_layer_flops_match_the_flop_counter(ratio):
    model = _linear_only_model()
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=ratio, weight=ratio)
    x = torch.randn(6, 5, 8)
    with FlopCounterMode(display=False) as forward:
        out = model(x)
    with FlopCounterMode(display=False) as backward:
        out.pow(2).sum().backward()
    train = ctl.flops.train
    assert train.forward == forward.get_total_flops()
    assert train.backward_done == backward.get_total_flops()
    # Exact backward: input gradient (not for the first layer, whose input needs none) + weight.
    per_layer_fwd = [2 * 30 * 8 * 16] * 6
    assert train.backward_exact == 2 * sum(per_layer_fwd) - per_layer_fwd[0]
    if ratio < 1:
        assert train.backward_done < train.backward_exact
    else:
        assert train.backward_done == train.backward_exact


def test_whole_training_reduction_counts_calibration_and_the_rest_of_the_model():
    torch.manual_seed(0)
    model = TinyTransformer(depth=3)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, controller="paper"))
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    assert ctl.stats()["flops_scope"] == "sampled_layers"
    ctl.calibrate(loss_fn, [token_batch(seed=s) for s in (1, 2)])
    tally = ctl.flops
    assert tally.scope == "model" and tally.other.forward > 0
    assert tally.calibration.forward > 0 and tally.calibration.backward_done > 0
    ctl.set_ratios(act=0.5, weight=0.5)
    for step in range(5):
        loss_fn(token_batch(seed=step)).backward()
    stats = ctl.stats()
    assert 0 < stats["bp_flops_reduction"] < 1
    # Calibration is paid for: the whole-training figure is below what training steps alone save.
    assert stats["train_flops_reduction"] < 1 - (tally.train.forward + tally.train.backward_done) / (
        tally.train.forward + tally.train.backward_exact)
    expected = 1 - tally.spent_flops() / tally.exact_training_flops()
    assert stats["train_flops_reduction"] == pytest.approx(expected)


def test_zero_rows_are_skipped_at_ratio_one_and_not_credited_to_sampling():
    """A loss on the first token only (like a [CLS] classifier) leaves the other rows of the top
    block's gradient exactly zero: they are skipped, which saves FLOPs against stock PyTorch but
    nothing against exact training that skips them too."""
    model = _linear_only_model()
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    x = torch.randn(6, 5, 8, requires_grad=True)
    model(x)[:, 0].pow(2).sum().backward()
    train, stats = ctl.flops.train, ctl.stats()
    assert train.backward_done < train.backward_exact
    assert train.backward_nonzero == train.backward_done
    assert stats["bp_flops_reduction"] > 0.1 and stats["sampling_bp_flops_reduction"] == 0.0
    reference = x.grad.clone()
    x.grad = None
    with ctl.paused():
        model(x)[:, 0].pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference)


@pytest.mark.parametrize("recompute_below", [0.0, 1.0], ids=["full", "compact"])
def test_the_zero_row_reference_is_what_exact_training_with_skipping_does(recompute_below):
    """Per step, the sampled run's zero-row reference equals the FLOPs an exact-with-skipping
    run (ratio 1, the same machinery) really did on the same batch: the dropped samples'
    rows are counted at the density of the kept ones, which is exact for a [CLS] classifier."""
    family = "bert"
    sampled, skipping = _model(family).train(), _model(family).train()
    ctl = vcas.attach(sampled, vcas.VCASConfig(seed=0, recompute_below=recompute_below, min_weight_numel=0))
    ctl.set_ratios(act=0.4, weight=0.5)
    exact_skip = vcas.attach(skipping, vcas.VCASConfig(seed=0))
    exact_skip.set_ratios(act=1.0, weight=1.0)
    for seed in range(5):
        batch = _batch(family, seed=seed)
        before = ctl.flops.train.backward_nonzero
        done_before = exact_skip.flops.train.backward_done
        _loss(sampled, batch).backward()
        _loss(skipping, batch).backward()
        assert ctl.flops.train.backward_nonzero - before == pytest.approx(
            exact_skip.flops.train.backward_done - done_before, rel=1e-9)
    assert ctl.stats()["sampling_bp_flops_reduction"] < ctl.stats()["bp_flops_reduction"]
    assert exact_skip.stats()["sampling_bp_flops_reduction"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("family", ["bert", "vit", "gpt2"])
@pytest.mark.parametrize("act, recompute_below", [(1.0, 0.0), (0.3, 0.0), (0.3, 1.0)],
                         ids=["ratio-one", "sampled", "sampled-compact"])
def test_spent_flops_of_real_training_steps_match_an_independent_count(family, act, recompute_below):
    model = _model(family).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, recompute_below=recompute_below, min_weight_numel=0))
    ctl.measure_flops(lambda b: _loss(model, b), _batch(family, seed=99))
    ctl.set_ratios(act=act, weight=0.3)

    def step(seed):
        _loss(model, _batch(family, seed=seed)).backward()
        optimizer.step()
        optimizer.zero_grad()

    for seed in range(4):  # past compact recompute's verifying uses
        step(seed)
    if recompute_below:
        assert set(ctl.compact_status().values()) == {"compact"}
    for seed in range(10, 13):
        check = ctl.check_flops(functools.partial(step, seed))
        assert check["scope"] == "model" and check["counted"] > 0
        assert check["ratio"] == pytest.approx(1.0, abs=1e-9), check


def test_adaptive_calibration_steps_are_counted_exactly_too():
    family = "bert"
    model = _model(family).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = lambda b: _loss(model, b)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, min_weight_numel=0, update_every=4), optimizer=optimizer)
    ctl.measure_flops(loss_fn, _batch(family, seed=99))
    for seed in range(12):
        calibrating = ctl.calibrating
        batch = _batch(family, seed=seed)
        check = ctl.check_flops(lambda batch=batch: (loss_fn(batch).backward(), optimizer.step(),
                                                     optimizer.zero_grad()))
        assert check["ratio"] == pytest.approx(1.0, abs=1e-9), (seed, calibrating, check)
    assert ctl.stats()["updates"] >= 2


def test_a_compact_block_that_receives_no_gradient_counts_its_exact_equivalent_work():
    torch.manual_seed(0)
    compact, full = TinyTransformer(depth=2), TinyTransformer(depth=2)
    full.load_state_dict(compact.state_dict())
    tokens, labels = token_batch(n=8)
    controllers = []
    for model, recompute in ((compact, 1.0), (full, 0.0)):
        ctl = vcas.attach(model, vcas.VCASConfig(seed=0, recompute_below=recompute))
        ctl.set_ratios(act=0.5, weight=1.0)
        for seed in range(3):  # past the verifying uses
            F.cross_entropy(model(token_batch(n=8, seed=seed)[0]), labels).backward()
        controllers.append(ctl)
    before = [ctl.flops.train.backward_exact for ctl in controllers]
    for model in (compact, full):
        (model(tokens) * 0).sum().backward()  # every block receives an all-zero gradient
    added = [ctl.flops.train.backward_exact - b for ctl, b in zip(controllers, before)]
    assert added[0] > 0 and added[0] == pytest.approx(added[1], rel=1e-9)


def test_compact_blocks_count_their_attention_products_once():
    """Attention as plain matrix products (eager): the counter sees every product, and the
    accounting must charge a compact block's re-run attention instead of, not on top of, the
    exact one. The module tracker gives a block's attention backward to its query, key and value
    layers, so the block's share is derived from its forward."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, recompute_below=1.0, min_weight_numel=0))
    ctl.measure_flops(lambda b: _loss(model, b), _batch("bert", seed=99))
    ctl.set_ratios(act=0.3, weight=1.0)

    def step(seed):
        _loss(model, _batch("bert", seed=seed)).backward()
        optimizer.step()
        optimizer.zero_grad()

    for seed in range(4):
        step(seed)
    assert set(ctl.compact_status().values()) == {"compact"}
    checks = [ctl.check_flops(functools.partial(step, seed)) for seed in range(10, 13)]
    assert all(c["ratio"] == pytest.approx(1.0, abs=1e-9) for c in checks), checks
