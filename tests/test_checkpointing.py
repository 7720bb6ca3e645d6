"""Activation checkpointing with vcas attached.

transformers' ``gradient_checkpointing_enable`` (torch's reentrant and non-reentrant checkpoint)
on a tiny Llama and a tiny BERT: at a fixed seed and fixed ratios the sampled gradients equal
those without checkpointing, at ratio 1, above ``recompute_below`` (blocks backpropagate in full
through the checkpoint's re-run) and below it (blocks recompute compactly: they keep only their
inputs, as checkpointing does, and re-run only the kept samples). vcas's own passes
(calibration, FLOPs measurement, variance checks) take ``autograd.grad``, which the reentrant
checkpoint refuses: they run with checkpointing switched off. ``torch.utils.checkpoint`` around
whole block calls works too: compact recompute steps aside there.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import vcas
import vcas.ops.recompute
from models import TinyTransformer, tiny_bert, tiny_llama, token_batch
from vcas.plan.checkpointing import checkpoint_free_forward, checkpointing_suspended

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")
V, N, T = 64, 8, 12
STEPS = 4  # two verifying uses, then compact backwards at low ratios


def _bert():
    # Eager attention draws its dropout with F.dropout, which compact recompute replays (SDPA's
    # dropout it cannot): both dropouts are on, so the checkpoint's re-run must draw the same masks.
    return tiny_bert(V, dropout=0.1, attn_implementation="eager")


FAMILIES = {"llama": lambda: tiny_llama(V), "bert": _bert}


def _model(family: str, checkpointing: bool | None) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    model.train()
    if checkpointing is not None:
        with warnings.catch_warnings():  # transformers renames the method; the old name still works
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    return model


def _batch(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (N, T), generator=g)
    labels = tokens if family == "llama" else torch.randint(0, 3, (N,), generator=g)
    return {"input_ids": tokens, "labels": labels}


def _training_grads(family: str, checkpointing: bool | None, act: float, seed: int = 3):
    """``.grad`` of every step of a short run at fixed ratios (no optimizer: the same weights)."""
    model = _model(family, checkpointing)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=seed, min_weight_numel=0))
    ctl.set_ratios(act=act, weight=0.5)
    grads = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # the dropout masks of this step
        model(**_batch(family, step)).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    return grads, ctl


def _max_difference(first, second) -> float:
    assert [sorted(step) for step in first] == [sorted(step) for step in second]
    return max(float((a[name] - b[name]).abs().max()) for a, b in zip(first, second) for name in a)


@pytest.mark.parametrize("act", [1.0, 0.6, 0.3], ids=["exact", "full-backward", "compact"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_gradients_with_checkpointing_equal_those_without(family, reentrant, act):
    reference, plain_ctl = _training_grads(family, None, act)
    checkpointed, ctl = _training_grads(family, reentrant, act)
    assert _max_difference(reference, checkpointed) < 1e-6
    if act <= ctl.config.recompute_below:
        # The compact path really ran, with and without checkpointing.
        assert set(ctl.compact_status().values()) == {"compact"}, ctl.compact_status()
        assert ctl.stats()["compact_backwards"] > 0 and plain_ctl.stats()["compact_backwards"] > 0
    if act < 1.0:  # negative control: another sampling seed gives other gradients
        other, _ = _training_grads(family, reentrant, act, seed=4)
        assert _max_difference(checkpointed, other) > 1e-4


def _saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd saves for the backward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    return sum(storages.values())


def _compact_saved_bytes(checkpointing: bool | None) -> tuple[int, int]:
    """What a model with compact blocks saves, and the bytes of its blocks' keyword tensor
    inputs (position embeddings: a checkpoint holds them outside saved-tensor hooks)."""
    model = _model("llama", checkpointing)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0))
    ctl.set_ratios(act=0.3)
    for step in range(3):  # the verifying uses
        model(**_batch("llama", step)).loss.backward()
    assert set(ctl.compact_status().values()) == {"compact"}
    keywords: dict[int, int] = {}

    def note_keywords(module, args, kwargs):
        for value in kwargs.values():
            if isinstance(value, torch.Tensor):
                keywords[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
            elif isinstance(value, tuple):
                note_keywords(module, args, dict(enumerate(value)))

    handles = [layer.register_forward_pre_hook(note_keywords, with_kwargs=True) for layer in model.model.layers]
    saved = _saved_bytes(model, _batch("llama"))
    for handle in handles:
        handle.remove()
    return saved, sum(keywords.values())


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_compact_blocks_under_checkpointing_keep_only_their_inputs(reentrant, monkeypatch):
    plain = _saved_bytes(_model("llama", reentrant), _batch("llama"))
    saved, keyword_inputs = _compact_saved_bytes(reentrant)
    assert saved <= plain + keyword_inputs
    # Negative control: compact blocks that keep their layers' outputs (as they do without
    # checkpointing) save more.
    monkeypatch.setattr(vcas.ops.recompute, "checkpoints", lambda module: False)
    saved, keyword_inputs = _compact_saved_bytes(reentrant)
    assert saved > plain + keyword_inputs


@pytest.mark.parametrize("controller", ["adaptive", "paper"])
def test_calibration_passes_run_under_reentrant_checkpointing(controller):
    model = _model("llama", True)

    def loss_fn(batch):
        return model(**batch).loss

    # Negative control: torch refuses autograd.grad through its reentrant checkpoint.
    with pytest.raises(RuntimeError, match="use_reentrant=True"):
        torch.autograd.grad(loss_fn(_batch("llama")), [p for p in model.parameters() if p.requires_grad])
    calibration = itertools.cycle([_batch("llama", seed) for seed in (50, 51)])
    ctl = vcas.attach(model, vcas.VCASConfig(seed=0, controller=controller, update_every=2, tau_act=10.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(4):
        loss_fn(_batch("llama", step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        ctl.maybe_calibrate(loss_fn, calibration)
    ctl.calibrate(loss_fn, [next(calibration), next(calibration)])
    check = ctl.check_variance(loss_fn, calibration, min_pairs=2, max_pairs=2)
    assert ctl.stats()["updates"] >= 2 and ctl.flops.other is not None and check["act_ratio"] >= 0
    # The model still checkpoints afterwards.
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


def test_suspending_checkpointing_restores_every_flag_as_it_was():
    model = _model("llama", False)
    layer = model.model.layers[0]
    del layer.gradient_checkpointing  # back to the class attribute (False) for this one
    layer_class_flag = type(layer).gradient_checkpointing
    with checkpointing_suspended(model):
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert "gradient_checkpointing" not in layer.__dict__ and layer.gradient_checkpointing is layer_class_flag
    assert model.model.layers[1].gradient_checkpointing is True


def test_only_transformers_checkpointing_wrappers_are_looked_through():
    model = _model("llama", False)
    inner = checkpoint_free_forward(model.model.layers[0])
    assert inner is not None and inner.__func__ is type(model.model.layers[0]).forward.__wrapped__
    assert checkpoint_free_forward(model.model.layers[0].mlp) is None  # a plain module
    assert checkpoint_free_forward(TinyTransformer().blocks[0]) is None


# --------------------------------------------------------------------------- user checkpoints
class _CheckpointedBlocks(TinyTransformer):
    """Checkpoints every whole block call (hooks and vcas's forward inside the checkpoint)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__(dim=16, depth=3, dropout=0.1)
        self.reentrant = reentrant

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            if self.reentrant is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(self.norm(x).mean(dim=1))


def _user_checkpoint_grads(reentrant: bool | None, recompute_below: float):
    torch.manual_seed(0)
    model = _CheckpointedBlocks(reentrant)
    ctl = vcas.attach(model, vcas.VCASConfig(seed=3, min_weight_numel=0, recompute_below=recompute_below))
    ctl.set_ratios(act=0.3, weight=0.5)
    grads = []
    for step in range(STEPS):
        tokens, labels = token_batch(n=N, seed=step)
        torch.manual_seed(100 + step)
        F.cross_entropy(model(tokens), labels).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    return grads, ctl


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_compact_recompute_steps_aside_inside_a_user_checkpoint(reentrant):
    # Without checkpointing and without compact recompute: the full backward's draws.
    reference, _ = _user_checkpoint_grads(None, recompute_below=0.0)
    checkpointed, ctl = _user_checkpoint_grads(reentrant, recompute_below=0.5)
    assert set(ctl.compact_status().values()) == {"unverified"} and ctl.stats()["compact_backwards"] == 0
    assert _max_difference(reference, checkpointed) < 1e-6


def test_without_stepping_aside_a_user_checkpoint_breaks(monkeypatch):
    """Negative control: compact recompute inside a non-reentrant checkpoint changes what the
    checkpoint's re-run saves (the block's status moves on between the forward and the re-run)."""
    monkeypatch.setattr(vcas.ops.recompute, "inside_checkpoint", lambda: False)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        _user_checkpoint_grads(False, recompute_below=0.5)
