"""Statistical checks of unbiasedness with tolerances derived from the measured spread."""

from __future__ import annotations

import math

import torch

# Under unbiasedness one parameter's energy (below) is a weighted mean of chi-square(1)
# variables with mean 1, and all parameters share the same draws: in the worst case (one
# dominant direction, fully correlated) the mean energy is distributed as one chi-square(1),
# whose 1 % point is 6.63. A bias makes the energy grow with the number of draws.
ENERGY_BOUND = 7.0


def sampled_gradients(model, loss, draws: int) -> list[torch.Tensor]:
    """``draws`` sampled gradients of ``loss`` (one forward, a backward per draw), flattened per
    parameter and stacked: a list with one (draws, numel) tensor per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    samples = [[] for _ in params]
    for draw in range(draws):
        grads = torch.autograd.grad(loss, params, retain_graph=draw < draws - 1, allow_unused=True)
        for bucket, grad, param in zip(samples, grads, params):
            bucket.append(torch.zeros(param.numel()) if grad is None else grad.detach().flatten().double())
    return [torch.stack(bucket) for bucket in samples]


def bias_statistics(samples: list[torch.Tensor], exact: list[torch.Tensor]) -> dict[str, float]:
    """For each parameter: the squared error of the sample mean divided by its expected value
    under unbiasedness, trace(Cov) / K (about 1 if unbiased, large if biased), and the largest
    |z| of the error projected on a fixed random direction. Parameters the sampling does not
    reach must match exactly; ``deterministic_mismatches`` counts those that do not."""
    draws = samples[0].shape[0]
    energy, worst_z, mismatched = [], 0.0, 0
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
        projected = (sample - target) @ direction
        z = projected.mean() / (projected.std() / math.sqrt(draws))
        worst_z = max(worst_z, abs(float(z)))
    return {"mean_energy": sum(energy) / max(1, len(energy)), "max_energy": max(energy, default=0.0),
            "max_abs_z": worst_z, "parameters": len(energy), "deterministic_mismatches": mismatched}
