"""Independent checks of what the controllers claim: the variance bound, and the FLOPs.

The variance check, expensive, at the controller's current ratios:

Nothing of the controllers is used: no probes, no per-sample records, no analytic shortcut.
Batches are taken in pairs; for each batch, its exact gradient on every entry of the measured
weights, ``draws`` activation-sampling-only draws and ``draws`` weight-sampling-only draws. Per
pair, ``||g_1 - g_2||^2 / 2`` is an unbiased estimate of V_sgd (the variance of the minibatch
gradient, summed over entries), and the mean squared error of the draws against their batch's
exact gradient estimates V_act and V_w. The pairs are independent, so the standard error of
the ratio of sums (V_act / V_sgd, V_w / V_sgd) follows from their spread (the ratio
estimator's linearisation); pairs are added until both relative errors are at most the target.

The check leaves training untouched: ``.grad``, buffers, every RNG stream and the controller's
own sampling generators are restored, and its work is not counted in the FLOPs.

The FLOPs check (:class:`FlopCount`, ``Controller.check_flops``) counts, at the dispatcher, every
product a real training step runs (forward, sampled backward, compact re-runs, SampleW's kept
rows, calibration records), with ``torch.utils.flop_counter``'s formulas, and compares the total
with what the controller's tally says the same step spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..accounting import FlopTally
from .mechanism import LossFn, Mechanism, scalar_loss

TARGET_RELATIVE_ERROR = 0.25


def variance_check(mechanism: Mechanism, loss_fn: LossFn, batches: Iterable[Any], draws: int = 2, *,
                   min_pairs: int = 8, max_pairs: int | None = 32,
                   target_relative_error: float | None = TARGET_RELATIVE_ERROR) -> dict[str, Any]:
    """Estimate V_act / V_sgd and V_w / V_sgd with their standard errors.

    Args:
        mechanism: the controller's mechanism (its current ratios are checked).
        loss_fn: ``loss_fn(batch) -> scalar loss``.
        batches: at least ``2 * min_pairs`` batches (an iterator is consumed only as needed).
        draws: sampled draws of each kind per batch.
        min_pairs: pairs of batches always used. The standard error is estimated from the pairs:
            from 4 it is itself uncertain by about 40 %, and a heavy-tailed V_sgd is easily missed.
        max_pairs: the most pairs used (None: as many as ``batches`` holds).
        target_relative_error: stop adding pairs once both ratios' relative standard errors
            are at most this (None: use every batch given).
    Returns:
        ``act_ratio`` / ``weight_ratio`` with ``*_stderr`` and ``*_relative_error``, the three
        variances, ``pairs``, ``batches`` and ``draws``.
    """
    if draws < 1 or min_pairs < 2:
        raise ValueError("variance_check needs draws >= 1 and min_pairs >= 2")
    if max_pairs is not None and max_pairs < min_pairs:
        raise ValueError(f"variance_check: max_pairs={max_pairs} is below min_pairs={min_pairs}; "
                         "raise max_pairs or pass a smaller min_pairs")
    iterator = iter(batches)
    pairs: list[tuple[float, float, float]] = []  # (V_sgd, V_act, V_w) per pair
    runtime = mechanism.runtime
    generators = runtime.generators.state_dict()
    try:
        with mechanism.isolated(enabled=True, record_samples=False, record_norms=False,
                               record_row_scores=False), runtime.counting_into(FlopTally()):
            while max_pairs is None or len(pairs) < max_pairs:
                pair = _pair(mechanism, loss_fn, iterator, draws)
                if pair is None:
                    break
                pairs.append(pair)
                if len(pairs) >= min_pairs and target_relative_error is not None and \
                        _precise_enough(pairs, target_relative_error):
                    break
    finally:
        runtime.generators.load_state_dict(generators)
    if len(pairs) < min_pairs:
        raise ValueError(f"variance_check needs at least {2 * min_pairs} batches, got {2 * len(pairs)}")
    return summarize(pairs, draws)


def summarize(pairs: list[tuple[float, float, float]], draws: int) -> dict[str, Any]:
    sgd = [p[0] for p in pairs]
    result: dict[str, Any] = {"var_sgd": _mean(sgd), "pairs": len(pairs), "batches": 2 * len(pairs),
                              "draws": draws}
    for index, kind in ((1, "act"), (2, "weight")):
        values = [p[index] for p in pairs]
        ratio, stderr = ratio_of_sums(values, sgd)
        result[f"var_{kind}"] = _mean(values)
        result[f"{kind}_ratio"] = ratio
        result[f"{kind}_ratio_stderr"] = stderr
        result[f"{kind}_ratio_relative_error"] = stderr / ratio if ratio > 0 else (0.0 if stderr == 0 else math.inf)
    return result


def ratio_of_sums(numerators: list[float], denominators: list[float]) -> tuple[float, float]:
    """``sum(a) / sum(s)`` over independent pairs and its standard error (linearisation)."""
    k = len(numerators)
    total = sum(denominators)
    if total <= 0:
        return math.inf, math.inf
    ratio = sum(numerators) / total
    if k < 2:
        return ratio, math.inf
    mean_s = total / k
    residuals = [a - ratio * s for a, s in zip(numerators, denominators)]
    variance = sum(r * r for r in residuals) / (k * (k - 1))
    return ratio, math.sqrt(variance) / mean_s


def _precise_enough(pairs: list[tuple[float, float, float]], target: float) -> bool:
    summary = summarize(pairs, 1)
    errors = [summary["act_ratio_relative_error"]]
    if summary["var_weight"] > 0:
        errors.append(summary["weight_ratio_relative_error"])
    return all(error <= target for error in errors)


def _pair(mechanism: Mechanism, loss_fn: LossFn, batches: Iterator[Any],
          draws: int) -> tuple[float, float, float] | None:
    results = []
    for _ in range(2):
        try:
            batch = next(batches)
        except StopIteration:
            return None
        results.append(_batch(mechanism, loss_fn, batch, draws))
    (g1, act1, weight1), (g2, act2, weight2) = results
    var_sgd = sum(float((a - b).pow(2).sum()) for a, b in zip(g1, g2)) / 2
    return var_sgd, (act1 + act2) / 2, (weight1 + weight2) / 2


def _batch(mechanism: Mechanism, loss_fn: LossFn, batch: Any,
           draws: int) -> tuple[list[torch.Tensor], float, float]:
    """The exact gradient of one batch and the mean squared error of its act-only and
    weight-only draws."""
    runtime = mechanism.runtime
    params = list(mechanism.measured.values())
    with runtime.using(sample_acts=False, sample_weights=False):
        loss = scalar_loss(loss_fn, batch)
        exact = _gradients(loss, params, retain=True)
    errors = {True: 0.0, False: 0.0}
    for draw in range(2 * draws):
        act_only = draw < draws
        with runtime.using(sample_acts=act_only, sample_weights=not act_only):
            sampled = _gradients(loss, params, retain=draw < 2 * draws - 1)
        errors[act_only] += sum(float((s.double() - e.double()).pow(2).sum()) for s, e in zip(sampled, exact))
    return exact, errors[True] / draws, errors[False] / draws


def _gradients(loss: torch.Tensor, params: list[torch.nn.Parameter], retain: bool) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros(p.numel(), dtype=torch.float32) if g is None else g.detach().flatten().float().cpu()
            for g, p in zip(grads, params)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class FlopCount(TorchDispatchMode):
    """The FLOPs of every op run inside, by ``torch.utils.flop_counter``'s formulas.

    Unlike ``FlopCounterMode`` it tracks no modules (whose backward hooks cannot follow a
    forward re-run inside a backward), so compact recompute runs under it as in training.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += float(formula(*args, **kwargs, out_val=out))
        return out


def flop_check(mechanism: Mechanism, step: Callable[[], Any]) -> dict[str, float]:
    """Run ``step`` (a real training step) under :class:`FlopCount` and compare the count with
    the tally's spent FLOPs over the same step (``ratio`` = accounted / counted)."""
    tally = mechanism.runtime.tally
    before = tally.spent_flops()
    with FlopCount() as counter:
        step()
    accounted = tally.spent_flops() - before
    return {"counted": counter.total, "accounted": accounted,
            "ratio": accounted / counter.total if counter.total > 0 else math.nan,
            "scope": tally.scope}
