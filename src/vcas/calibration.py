"""Measuring V_sgd, V_act and V_w on calibration batches without leaving a trace (METHOD.md s. 6).

Each calibration batch gets one forward pass whose graph is backpropagated M + 1 times: once
exactly, then M times with activation sampling (each a different draw from the controller's
generator, all with the same dropout masks since the forward is shared). Gradients are taken
with ``torch.autograd.grad``, so the user's ``.grad`` is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .accounting import CALIBRATION, FlopTally
from .ops import BlockSampler, LinearSite
from .sampling import SortedScores
from .state import SamplingState

LossFn = Callable[[Any], torch.Tensor]


@dataclasses.dataclass
class Measurement:
    """Variance estimates of one calibration, per measured layer and per sampled linear."""

    var_sgd_layers: list[float]
    var_act_layers: list[float]
    var_weight_layers: list[float]
    block_norms: list[list[torch.Tensor]]  # per batch, per block: per-sample gradient norms
    row_scores: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)
    act_ratios: list[float] = dataclasses.field(default_factory=list)  # schedule the draws used

    @property
    def var_sgd(self) -> float:
        return float(sum(self.var_sgd_layers))

    @property
    def var_act(self) -> float:
        return float(sum(self.var_act_layers))

    @property
    def var_weight(self) -> float:
        return float(sum(self.var_weight_layers))


@contextlib.contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Restore every RNG stream (torch CPU and CUDA, numpy, python) and all buffers on exit."""
    rng = _capture_rng()
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        _restore_rng(rng)


def _capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")  # only if the user's program imported it
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        sys.modules["numpy"].random.set_state(state["numpy"])


@contextlib.contextmanager
def sampling_mode(state: SamplingState, **flags: Any) -> Iterator[None]:
    """Set SamplingState flags (``sample_acts=...``, ``phase=...``) and restore them on exit."""
    previous = {name: getattr(state, name) for name in flags}
    for name, value in flags.items():
        setattr(state, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(state, name, value)


def scalar_loss(loss_fn: LossFn, batch: Any) -> torch.Tensor:
    loss = loss_fn(batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            "loss_fn(batch) must return a scalar tensor that requires grad (the training loss "
            f"of that batch); got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    return loss


def measure(loss_fn: LossFn, batches: Sequence[Any], state: SamplingState,
            samplers: list[BlockSampler], sites: list[LinearSite],
            params: list[nn.Parameter], subsets: list[torch.Tensor]) -> Measurement:
    """Run the paper's calibration passes and estimate the variances (scaled up from the
    subsets): M activation-sampling draws per batch at the current ratios, M x M in all."""
    draws = len(batches)
    trial = list(state.act_ratios)
    exact: list[list[torch.Tensor]] = []
    act_sq = [0.0] * len(params)
    block_norms: list[list[torch.Tensor]] = []
    for site in sites:
        site.recorded_scores.clear()
    for batch in batches:
        for sampler in samplers:
            sampler.recorded_norms.clear()
        with sampling_mode(state, phase=CALIBRATION, sample_acts=False, sample_weights=False,
                           record_norms=True):
            loss = scalar_loss(loss_fn, batch)
            exact_grads = _subset_grads(loss, params, subsets, retain=True)
        exact.append(exact_grads)
        block_norms.append([_last_or_none(sampler.recorded_norms) for sampler in samplers])
        for draw in range(draws):
            with sampling_mode(state, phase=CALIBRATION, sample_acts=True, sample_weights=False,
                               record_row_scores=True, act_ratios=trial):
                sampled = _subset_grads(loss, params, subsets, retain=draw < draws - 1)
            for layer, (g_a, g_s) in enumerate(zip(sampled, exact_grads)):
                act_sq[layer] += float((g_a - g_s).pow(2).sum())
    scale = [p.numel() / max(1, idx.numel()) for p, idx in zip(params, subsets)]
    var_sgd = [float(torch.stack([g[layer] for g in exact]).var(dim=0, unbiased=True).sum()) * scale[layer]
               for layer in range(len(params))]
    var_act = [sq / (draws * len(batches)) * scale[layer] for layer, sq in enumerate(act_sq)]
    # SampleW's analytic variance at each layer's current ratio, averaged over the passes.
    var_weight = [float(SortedScores(site.recorded_scores).variances(state.weight_ratios[site.index]).mean())
                  if site.recorded_scores else 0.0 for site in sites]
    scores = [list(site.recorded_scores) for site in sites]
    return Measurement(var_sgd, var_act, var_weight, block_norms, scores, trial)


def _subset_grads(loss: torch.Tensor, params: list[nn.Parameter], subsets: list[torch.Tensor],
                  retain: bool) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    out = []
    for grad, param, idx in zip(grads, params, subsets):
        flat = torch.zeros(param.numel(), device=param.device) if grad is None else grad.reshape(-1)
        out.append(flat[idx.to(flat.device)].double())
    return out


def _last_or_none(values: list[torch.Tensor]) -> torch.Tensor | None:
    return values[-1] if values else None


def measure_model_flops(loss_fn: LossFn, batch: Any, state: SamplingState,
                        params: list[nn.Parameter]) -> tuple[float, float]:
    """Model FLOPs outside the sampled layers per sampled-layer FLOP, forward and backward.

    Runs one exact forward and full backward under ``torch.utils.flop_counter.FlopCounterMode``.
    This one-off measurement is not a training cost and is not added to the tally.
    """
    scratch = FlopTally()
    saved_tally = state.tally
    state.tally = scratch
    try:
        with sampling_mode(state, sample_acts=False, sample_weights=False, record_samples=False,
                           record_row_scores=False):
            with FlopCounterMode(display=False) as forward_counter:
                loss = scalar_loss(loss_fn, batch)
            with FlopCounterMode(display=False) as backward_counter:
                torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        state.tally = saved_tally
    linear = scratch.train
    if linear.forward <= 0 or linear.backward_exact <= 0:
        return 0.0, 0.0
    other_forward = max(0.0, forward_counter.get_total_flops() - linear.forward)
    other_backward = max(0.0, backward_counter.get_total_flops() - linear.backward_done)
    return other_forward / linear.forward, other_backward / linear.backward_exact
