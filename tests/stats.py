"""Statistical and deterministic checks of unbiasedness, with bounds derived from the draws.

Statistical checks, per parameter tensor, from K independent sampled gradients ``g_k`` of one
forward graph against the exact gradient ``g``:

- energy: ``||mean_k g_k - g||^2 / (trace(Cov) / K)``. Its expectation is 1 under
  unbiasedness; in the worst case (one dominant direction) it is distributed as one
  chi-square(1), whose 1 % point is 6.63 (``ENERGY_BOUND`` for the mean over parameters) and
  whose 1e-5 point is 19.5 (``MAX_ENERGY_BOUND`` for the largest, a union bound over a few dozen
  parameters). A bias ``b`` adds ``K ||b||^2 / trace(Cov)``, which grows with K.
- z-scores of the error projected on the exact gradient's direction (where a re-weighting
  error shows, as ``b`` is then parallel to ``g``) and on a fixed random direction: standard
  normal under unbiasedness; ``Z_BOUND`` = 4.5 fails by chance with probability 7e-6 per score,
  below 1e-3 for the ~80 scores of a test.

Deterministic check (:func:`expectation_error`): with every keep decision replaced by its
expectation (:class:`vcas.runtime.rng.ExpectedDraws`), backpropagation being linear in the
incoming gradient, an unbiased sampler reproduces the exact gradient up to rounding.
"""

from __future__ import annotations

import math

import torch

from vcas.runtime.rng import ExpectedDraws
from vcas.sampling import ExpectedDraw

ENERGY_BOUND = 7.0
MAX_ENERGY_BOUND = 20.0
Z_BOUND = 4.5
# fp32 rounding of a backward with re-weighted rows (p * (1 / p) is 1 within an ulp or two).
EXPECTATION_TOLERANCE = 1e-4


def sampled_gradients(model, loss, draws: int) -> list[torch.Tensor]:
    """``draws`` sampled gradients of ``loss`` (one forward, a backward per draw), flattened per
    parameter and stacked: a list with one (draws, numel) tensor per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    samples = [[] for _ in params]
    for draw in range(draws):
        grads = torch.autograd.grad(loss, params, retain_graph=draw < draws - 1, allow_unused=True)
        for bucket, grad, param in zip(samples, grads, params):
            bucket.append(torch.zeros(param.numel(), dtype=torch.float64) if grad is None
                          else grad.detach().flatten().double())
    return [torch.stack(bucket) for bucket in samples]


def bias_statistics(samples: list[torch.Tensor], exact: list[torch.Tensor]) -> dict[str, float]:
    """The energies and z-scores of the module docstring. Parameters the sampling does not
    reach must match exactly; ``deterministic_mismatches`` counts those that do not."""
    draws = samples[0].shape[0]
    energy, worst_z, worst_z_gradient, mismatched = [], 0.0, 0.0, 0
    g = torch.Generator().manual_seed(123)
    for sample, target in zip(samples, exact):
        target = target.flatten().double()
        error = sample.mean(0) - target
        spread = sample.var(0, unbiased=True).sum() / draws
        if float(sample.std(0).max()) < 1e-6:
            # No randomness reached this parameter (beyond rounding): the estimate must be exact.
            mismatched += not torch.allclose(sample.mean(0), target, atol=1e-5, rtol=1e-4)
            continue
        energy.append(float(error.pow(2).sum() / spread))
        direction = torch.randn(target.numel(), generator=g, dtype=torch.float64)
        worst_z = max(worst_z, abs(_z(sample - target, direction)))
        if float(target.norm()) > 0:
            worst_z_gradient = max(worst_z_gradient, abs(_z(sample - target, target)))
    return {"mean_energy": sum(energy) / max(1, len(energy)), "max_energy": max(energy, default=0.0),
            "max_abs_z": worst_z, "max_abs_z_gradient": worst_z_gradient,
            "parameters": len(energy), "deterministic_mismatches": mismatched}


def _z(errors: torch.Tensor, direction: torch.Tensor) -> float:
    projected = errors @ (direction / direction.norm())
    spread = float(projected.std())
    return float(projected.mean()) / (spread / math.sqrt(projected.numel())) if spread > 0 else 0.0


def assert_unbiased(stats: dict[str, float]) -> None:
    assert stats["deterministic_mismatches"] == 0, stats
    assert stats["mean_energy"] < ENERGY_BOUND, stats
    assert stats["max_energy"] < MAX_ENERGY_BOUND, stats
    assert stats["max_abs_z"] < Z_BOUND, stats
    assert stats["max_abs_z_gradient"] < Z_BOUND, stats


def biased(stats: dict[str, float]) -> bool:
    """Whether any of the checks of :func:`assert_unbiased` fails."""
    return (stats["deterministic_mismatches"] > 0 or stats["mean_energy"] >= ENERGY_BOUND
            or stats["max_energy"] >= MAX_ENERGY_BOUND or stats["max_abs_z"] >= Z_BOUND
            or stats["max_abs_z_gradient"] >= Z_BOUND)


class ScaledDraws:
    """Negative control: expected keeps times ``factor`` (a sampler that over-weights by it)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def draw(self, device):
        factor = self.factor

        class _Scaled(ExpectedDraw):
            def keeps(self, probs):
                return probs * factor

        return _Scaled()


class ScaledBernoulli:
    """Negative control: Bernoulli keeps whose weights are ``factor / p`` instead of ``1 / p``."""

    def __init__(self, generators, factor: float) -> None:
        self.generators, self.factor = generators, factor

    def draw(self, device):
        generator, factor = self.generators.for_device(device), self.factor

        class _Scaled(ExpectedDraw):
            def keeps(self, probs):
                uniform = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
                return (uniform < probs).to(probs.dtype) * factor

        return _Scaled()


def expectation_error(model, controller, loss_of, draws=None) -> float:
    """The largest relative difference, over parameters, between the gradient with every keep
    decision at its expectation (or ``draws``) and the exact gradient of the same model."""
    runtime = controller.mechanism.runtime
    params = [p for p in model.parameters() if p.requires_grad]
    with controller.paused():
        exact = torch.autograd.grad(loss_of(model), params, allow_unused=True)
    previous, runtime.draws = runtime.draws, draws if draws is not None else ExpectedDraws()
    try:
        expected = torch.autograd.grad(loss_of(model), params, allow_unused=True)
    finally:
        runtime.draws = previous
    pairs = [(torch.zeros_like(b) if a is None else a, torch.zeros_like(a) if b is None else b)
             for a, b in zip(expected, exact) if not (a is None and b is None)]
    # Gradients that are zero in exact arithmetic (an attention key's bias) are rounding noise:
    # their error counts against a floor of the largest gradient.
    floor = 1e-3 * max(float(b.norm()) for _, b in pairs)
    return max(float((a - b).norm()) / max(float(b.norm()), floor) for a, b in pairs)
