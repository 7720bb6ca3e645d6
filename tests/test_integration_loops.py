"""Training loops people already have, with ``vcas.attach(model, cfg, optimizer=opt)`` and nothing
else in the loop: gradient accumulation and a GradScaler that skips steps (plain torch), accelerate's
``accumulate`` and its wrapped optimizer, the FLOPs scope without a calibration loss, and the
resumable calibration stream the callbacks checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vcas
from models import TinyTransformer, token_batch
from vcas.integrations.common import CalibrationBatches, calibration_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration(model):
    loss_fn = lambda batch: F.cross_entropy(model(batch[0]), batch[1])
    return dict(loss_fn=loss_fn, calibration_data=[token_batch(seed=1000 + s) for s in range(4)])


def _adam_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many updates AdamW really applied (its own per-parameter step count)."""
    return int(next(iter(optimizer.state.values()))["step"])


def _poison_gradient(model) -> None:
    """An overflow as fp16 produces it: an inf in one gradient, found by the scaler's unscale."""
    model.head.weight.grad[0, 0] = float("inf")


# ------------------------------------------------------------------ plain loop
@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_plain_loop_with_accumulation_and_grad_scaler_counts_real_optimizer_steps(controller):
    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, update_every=2, controller=controller),
                      optimizer=optimizer, **_calibration(model))
    overflowing = {2, 5}  # these optimizer steps see an inf gradient: the scaler skips them
    scales = []
    for step in range(1, 7):
        for micro in range(2):
            tokens, labels = token_batch(seed=10 * step + micro)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(tokens), labels) / 2
            scaler.scale(loss).backward()
        if step in overflowing:
            _poison_gradient(model)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        scales.append(scaler.get_scale())
    # The scale halves exactly at the overflowing steps: the scaler skipped those.
    assert [later < earlier for earlier, later in zip([2.0**10] + scales, scales)] == \
        [step in overflowing for step in range(1, 7)]
    stats = ctl.stats()
    assert stats["steps"] == _adam_steps(optimizer) == 4  # 6 steps of 2 micro-batches, 2 skipped
    if controller == "paper":
        assert [entry["step"] for entry in ctl.history] == [2, 4]
    else:
        assert ctl.history[0]["step"] == 1 and stats["updates"] >= 2
    assert stats["flops_scope"] == "model"  # the loss and batches at attach measured the rest
    with pytest.raises(vcas.AttachError, match="counts optimizer steps itself"):
        ctl.maybe_calibrate()


def test_the_adaptive_controller_needs_no_loss_and_then_counts_the_sampled_layers_only():
    counted = {}
    for label, extra in (("without", {}), ("with", None)):
        torch.manual_seed(0)
        model = TinyTransformer(depth=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        ctl = vcas.attach(model, vcas.VCASConfig(seed=0, update_every=2), optimizer=optimizer,
                          **(extra if extra is not None else _calibration(model)))
        for step in range(6):
            tokens, labels = token_batch(seed=step)
            F.cross_entropy(model(tokens), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
        stats = ctl.stats()
        assert stats["steps"] == 6 and stats["updates"] >= 2
        counted[label] = (stats["flops_scope"], stats["exact_training_flops"])
    assert counted["without"][0] == "sampled_layers" and counted["with"][0] == "model"
    # The same training steps: the whole model costs more than its sampled layers alone.
    assert counted["with"][1] > counted["without"][1]


# ------------------------------------------------------------------ accelerate
@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons: start and leave them empty."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("controller", ["paper", "adaptive"])
def test_accelerate_accumulate_counts_optimizer_steps_not_micro_batches(fresh_accelerate_state, controller):
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=3)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, update_every=2, controller=controller),
                      optimizer=optimizer, **_calibration(model))
    stepped = []
    for micro in range(12):
        with accelerator.accumulate(model):
            tokens, labels = token_batch(seed=micro)
            accelerator.backward(F.cross_entropy(model(tokens), labels))
            optimizer.step()  # a no-op on the first two micro-batches of each three
            optimizer.zero_grad()
            stepped.append(accelerator.sync_gradients)
    assert sum(stepped) == 4 and len(stepped) == 12
    stats = ctl.stats()
    assert stats["steps"] == _adam_steps(optimizer.optimizer) == 4
    assert stats["updates"] == 2 if controller == "paper" else stats["updates"] >= 2


def test_accelerate_optimizer_with_a_grad_scaler_counts_only_the_steps_it_takes(fresh_accelerate_state):
    """The Trainer's fp16 path: it steps accelerate's optimizer, which steps through the scaler
    (on a GPU accelerate builds the scaler itself; here it is given one)."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    accelerate.Accelerator(cpu=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), scaler=scaler)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, update_every=2), optimizer=optimizer)
    skipped = []
    for step in range(6):
        tokens, labels = token_batch(seed=step)
        scaler.scale(F.cross_entropy(model(tokens), labels)).backward()
        if step in (1, 4):
            _poison_gradient(model)
        optimizer.step()
        optimizer.zero_grad()
        skipped.append(optimizer.step_was_skipped)
    assert skipped == [step in (1, 4) for step in range(6)]
    assert ctl.stats()["steps"] == _adam_steps(optimizer.optimizer) == 4


# ------------------------------------------------------------------ the resumable calibration stream
class _Numbers(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


class _NumberStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(torch.arange(10))


@pytest.mark.parametrize("dataset", [_Numbers(10), _NumberStream()], ids=["map-style", "iterable"])
def test_calibration_batches_continue_exactly_after_a_restore(dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    stream = calibration_batches(loader, batch_size=4, seed=0)
    first = [next(stream).tolist() for _ in range(5)]  # past the end of the first pass (3 batches)
    state = stream.state_dict()
    expected = [next(stream).tolist() for _ in range(6)]
    resumed = CalibrationBatches(loader, batch_size=4, seed=123)  # its own seed is overridden
    resumed.load_state_dict(state)
    assert [next(resumed).tolist() for _ in range(6)] == expected
    passes = [sorted(sum(first[:3], [])), sorted(sum(first[3:] + expected[:1], []))]
    assert passes == [list(range(10))] * 2  # every pass covers the dataset once
    if isinstance(dataset, _Numbers):
        assert first[:3] != [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # shuffled
        assert sum(first[:3], []) != sum(first[3:] + expected[:1], [])  # a new order each pass
    else:
        assert first[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_calibration_batches_leave_the_global_rng_alone_and_refuse_bad_input():
    loader = torch.utils.data.DataLoader(_Numbers(10), batch_size=2)
    before = torch.random.get_rng_state()
    stream = calibration_batches(loader, batch_size=2, seed=0)
    [next(stream) for _ in range(7)]
    assert torch.equal(torch.random.get_rng_state(), before)
    with pytest.raises(ValueError, match="yields no batch"):
        next(calibration_batches(torch.utils.data.DataLoader(_Numbers(0)), batch_size=2, seed=0))
    with pytest.raises(ValueError, match="positive int"):
        calibration_batches(loader, batch_size=0, seed=0)
    with pytest.raises(vcas.StateDictError, match="pass_start"):
        stream.load_state_dict({"position": 1})


def test_a_lightning_optimizer_wrapper_is_looked_through():
    pytest.importorskip("lightning")
    from lightning.pytorch.core.optimizer import LightningOptimizer

    torch.manual_seed(0)
    model = TinyTransformer(depth=2)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, update_every=2), optimizer=LightningOptimizer(inner))
    for step in range(3):
        tokens, labels = token_batch(seed=step)
        F.cross_entropy(model(tokens), labels).backward()
        inner.step()
        inner.zero_grad()
    assert ctl.stats()["steps"] == 3
