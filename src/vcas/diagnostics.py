"""An expensive, independent check of the variance bound: V_act / V_sgd and V_w / V_sgd measured
with many calibration batches and draws, on every weight entry (no subsampling, no analytic
shortcut), at the controller's current ratios. Not used by the controllers; leaves no trace."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .accounting import FlopTally
from .calibration import LossFn, preserved_training_state, sampling_mode, scalar_loss


# A check runs between training steps, possibly while a calibration step is armed: record nothing.
_NOT_RECORDING = {"record_samples": False, "record_norms": False, "record_row_scores": False}


def _full_grads(loss: torch.Tensor, params: list[torch.nn.Parameter], retain: bool) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.detach().flatten().double().cpu()
            for g, p in zip(grads, params)]


def _squared_error(draw: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    return float(sum((a - b).pow(2).sum() for a, b in zip(draw, exact)))


def variance_check(model: torch.nn.Module, state: Any, params: list[torch.nn.Parameter],
                   loss_fn: LossFn, batches: Sequence[Any], draws: int = 8) -> dict[str, float]:
    """V_sgd from the exact gradients of ``batches``; V_act from ``draws`` activation-only draws
    and V_w from ``draws`` weight-only draws per batch, each against that batch's exact gradient."""
    if len(batches) < 2 or draws < 1:
        raise ValueError("variance_check needs at least 2 batches and 1 draw")
    exact_all, act_sq, weight_sq = [], 0.0, 0.0
    saved_tally, state.tally = state.tally, FlopTally()  # a check, not training: not counted
    try:
        with preserved_training_state(model), sampling_mode(state, enabled=True, **_NOT_RECORDING):
            for batch in batches:
                with sampling_mode(state, sample_acts=False, sample_weights=False):
                    loss = scalar_loss(loss_fn, batch)
                    exact = _full_grads(loss, params, retain=True)
                exact_all.append(exact)
                for draw in range(2 * draws):
                    act_only = draw < draws
                    with sampling_mode(state, sample_acts=act_only, sample_weights=not act_only):
                        sampled = _full_grads(loss, params, retain=draw < 2 * draws - 1)
                    error = _squared_error(sampled, exact)
                    act_sq, weight_sq = (act_sq + error, weight_sq) if act_only else (act_sq, weight_sq + error)
    finally:
        state.tally = saved_tally
    var_sgd = float(sum(torch.stack([g[i] for g in exact_all]).var(dim=0, unbiased=True).sum()
                        for i in range(len(params))))
    n = len(batches) * draws
    var_act, var_weight = act_sq / n, weight_sq / n
    return {"var_sgd": var_sgd, "var_act": var_act, "var_weight": var_weight,
            "act_ratio": var_act / var_sgd if var_sgd > 0 else float("inf"),
            "weight_ratio": var_weight / var_sgd if var_sgd > 0 else float("inf"),
            "batches": len(batches), "draws": draws}
