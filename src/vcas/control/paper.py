"""The paper's controller (``VCASConfig(controller="paper")``): its calibration and update rules.

Every ``update_every`` optimizer steps it calibrates on ``mc_samples`` = M batches of its own:
each batch gets one forward whose graph is backpropagated M + 1 times, once exactly, then M
times with activation sampling (each a different draw from the controller's generator, all with
the same dropout masks since the forward is shared). Gradients are taken with
``torch.autograd.grad``, so the user's ``.grad`` is never touched. Then:

    s    <- s + alpha  if V_act > tau_act * V_sgd  else s - alpha      (clipped to [0, 1])
    rho  <- the schedule of the new s                (optionally smoothed: ratio_ema)
    nu_l <- nu_l / beta  if V_w,l > tau_w * V_sgd,l  else nu_l * beta   (clipped to (0, 1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ..config import VCASConfig
from ..errors import ConfigError
from ..runtime.mode import CALIBRATION
from ..sampling import SortedScores, share_schedule
from .mechanism import LossFn, Mechanism, scalar_loss
from .policy import CalibrationSource, Decision, Merge, Outcome, Skip
from .statistics import Measurement


class PaperPolicy:
    """The paper's update rules on the paper's calibration (see the module docstring)."""

    name: ClassVar[str] = "paper"
    needs_batches: ClassVar[bool] = True

    def __init__(self, config: VCASConfig) -> None:
        self.config = config
        self.s = 1.0

    def start(self, mechanism: Mechanism) -> None:
        return None

    def pause(self, mechanism: Mechanism) -> None:
        return None

    def on_step(self, step: int, mechanism: Mechanism, source: CalibrationSource,
                merge: Merge) -> Outcome | None:
        every = cast(int, self.config.update_every)  # resolved by attach (VCASConfig.resolve)
        if step % every != 0:
            return None
        source.require("the paper's controller calibrates on batches of its own")
        return self.calibrate(step, mechanism, source, source.take(self.config.mc_samples), merge)

    def calibrate(self, step: int, mechanism: Mechanism, source: CalibrationSource,
                  batches: Sequence[Any], merge: Merge) -> Outcome:
        if len(batches) < 2:
            raise ConfigError(
                f"calibrate needs at least 2 batches to estimate the SGD variance, got {len(batches)}")
        assert source.loss_fn is not None
        with mechanism.isolated(enabled=True):
            measurement = measure(mechanism, source.loss_fn, batches)
        return self.decide(merge(measurement), mechanism)

    def decide(self, measurement: Measurement, mechanism: Mechanism) -> Outcome:
        """Apply the rules to one (merged) measurement."""
        values = [measurement.var_sgd, measurement.var_act, measurement.var_weight]
        if not all(math.isfinite(v) for v in values):
            return Skip(f"non-finite variance statistics (var_sgd={values[0]}, var_act={values[1]}, "
                        f"var_weight={values[2]})", measurement)
        self.s = next_share(self.s, measurement.var_act, measurement.var_sgd, self.config)
        schedule = candidate_schedule(measurement.block_norms, self.s)
        decay = self.config.ratio_ema
        act = [decay * old + (1 - decay) * new for old, new in zip(mechanism.ratios.act_list, schedule)]
        linears = mechanism.linear_names
        sgd = [measurement.var_sgd_layers.get(name, 0.0) for name in linears]
        solved = next_weight_ratios(mechanism.ratios.weight_list,
                                    [measurement.var_weight_layers[name] for name in linears], sgd, self.config)
        weight = {name: nu if mechanism.weight_sampled(name) else 1.0 for name, nu in zip(linears, solved)}
        bound = measurement.var_act / measurement.var_sgd if measurement.var_sgd > 0 else None
        return Decision(self.s, act, weight, measurement, bound)

    def state_dict(self) -> dict[str, Any]:
        return {"s": self.s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.s = float(state["s"])


def measure(mechanism: Mechanism, loss_fn: LossFn, batches: Sequence[Any]) -> Measurement:
    """Run the paper's calibration passes and estimate the variances (scaled up from the
    subsets): M activation-sampling draws per batch at the current ratios, M x M in all."""
    runtime, recorder = mechanism.runtime, mechanism.runtime.recorder
    params = mechanism.measured
    draws = len(batches)
    trial = mechanism.ratios.act_list
    exact: list[dict[str, torch.Tensor]] = []
    act_sq = dict.fromkeys(params, 0.0)
    block_norms: list[list[torch.Tensor | None]] = []
    row_scores: dict[str, list[torch.Tensor]] = {name: [] for name in mechanism.linear_names}
    recorder.clear()
    for batch in batches:
        with runtime.using(phase=CALIBRATION, sample_acts=False, sample_weights=False, record_norms=True):
            loss = scalar_loss(loss_fn, batch)
            exact_grads = subset_gradients(loss, params, mechanism.subsets, retain=True)
        exact.append(exact_grads)
        norms = recorder.take().block_norms
        block_norms.append([norms[name][-1] if norms.get(name) else None for name in mechanism.block_names])
        for draw in range(draws):
            with runtime.using(phase=CALIBRATION, sample_acts=True, sample_weights=False,
                               record_row_scores=True):
                sampled = subset_gradients(loss, params, mechanism.subsets, retain=draw < draws - 1)
            for name in params:
                act_sq[name] += float((sampled[name] - exact_grads[name]).pow(2).sum())
        for name, scores in recorder.take().row_scores.items():
            row_scores[name].extend(scores)
    scale = {name: p.numel() / max(1, mechanism.subsets[name].numel()) for name, p in params.items()}
    var_sgd = {name: float(torch.stack([g[name] for g in exact]).var(dim=0, unbiased=True).sum()) * scale[name]
               for name in params}
    var_act = {name: sq / (draws * len(batches)) * scale[name] for name, sq in act_sq.items()}
    # SampleW's analytic variance at each layer's current ratio, averaged over the passes.
    ratios = mechanism.ratios.weight
    var_weight = {name: float(SortedScores(scores).variances(ratios[name]).mean()) if scores else 0.0
                  for name, scores in row_scores.items()}
    return Measurement(var_sgd, var_act, var_weight, block_norms, row_scores, trial)


def subset_gradients(loss: torch.Tensor, params: dict[str, nn.Parameter], subsets: dict[str, torch.Tensor],
                  retain: bool) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=retain, allow_unused=True)
    out = {}
    for (name, param), grad in zip(params.items(), grads):
        flat = torch.zeros(param.numel(), device=param.device) if grad is None else grad.reshape(-1)
        out[name] = flat[subsets[name].to(flat.device)].double()
    return out


# --------------------------------------------------------------------- the paper's update rules
def next_share(s: float, var_act: float, var_sgd: float, config: VCASConfig) -> float:
    """s + alpha if the activation variance exceeds tau_act * V_sgd, else s - alpha; clipped to [0, 1]."""
    step = config.s_step if var_act > config.tau_act * var_sgd else -config.s_step
    return min(1.0, max(0.0, s + step))


def next_weight_ratios(ratios: Sequence[float], var_weight: Sequence[float],
                       var_sgd: Sequence[float], config: VCASConfig) -> list[float]:
    """nu / beta where V_w,l > tau_w * V_sgd,l, else nu * beta; clipped to (0, 1]."""
    beta = config.nu_mult
    return [min(1.0, nu / beta) if vw > config.tau_w * vs else nu * beta
            for nu, vw, vs in zip(ratios, var_weight, var_sgd)]


def candidate_schedule(block_norms: list[list[torch.Tensor | None]], s: float) -> list[float]:
    """rho_l(s) = max over blocks j <= l of p_j(s), p_j averaged over the calibration batches."""
    return share_schedule(block_norms, s)
