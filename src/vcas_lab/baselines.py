"""The classic baselines VCAS is compared with, as per-sample loss weights.

Both pick samples from the forward pass and weight each sample's loss; the backward of the
dropped samples is then all-zero, and the sampled layers skip it the same way they skip samples
dropped by VCAS, so every method runs on the same machinery and the same FLOPs accounting.

- SB, selective backprop (Jiang et al. 2019): keep the highest-loss ``keep`` share of the batch.
  Deterministic and biased by design.
- UB, upper-bound importance sampling (Katharopoulos & Fleuret 2018): score each sample by the
  norm of its loss gradient with respect to the model output (an upper bound, up to a constant,
  of its parameter-gradient norm), draw ``keep * N`` samples with replacement with probabilities
  proportional to the score, and weight each draw by ``1 / (N p)``: unbiased for the mean loss.
"""

from __future__ import annotations

import math

import torch

from vcas.errors import ConfigError


def _check_keep(keep: float) -> None:
    if not 0 < keep <= 1:
        raise ConfigError(f"baseline keep ratio {keep!r} is invalid: it must be in (0, 1]")


def _kept_count(n: int, keep: float) -> int:
    return max(1, min(n, math.ceil(keep * n - 1e-9)))


def selective_backprop_weights(per_sample_loss: torch.Tensor, keep: float = 1 / 3) -> torch.Tensor:
    """Weights ``1/k`` on the ``k = ceil(keep N)`` highest losses, 0 elsewhere."""
    _check_keep(keep)
    losses = per_sample_loss.detach()
    k = _kept_count(losses.numel(), keep)
    weights = torch.zeros_like(losses)
    weights[torch.topk(losses, k).indices] = 1.0 / k
    return weights


def output_gradient_norms(per_sample_loss: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||d loss_i / d output_i||``: the UB importance score (needs ``outputs``' graph)."""
    (grad,) = torch.autograd.grad(per_sample_loss.sum(), outputs, retain_graph=True)
    return torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1, dtype=torch.float32)


def upper_bound_weights(per_sample_loss: torch.Tensor, outputs: torch.Tensor, keep: float = 1 / 3,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance weights ``count_i / (k N p_i)`` of ``k = ceil(keep N)`` draws with replacement,
    ``p`` proportional to the output-gradient norm (uniform if every norm is zero)."""
    _check_keep(keep)
    n = per_sample_loss.numel()
    k = _kept_count(n, keep)
    scores = output_gradient_norms(per_sample_loss, outputs).cpu()
    if not bool(torch.isfinite(scores).all()) or float(scores.sum()) <= 0:
        scores = torch.ones(n)
    probs = scores / scores.sum()
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)
    counts = torch.bincount(draws, minlength=n).to(torch.float32)
    weights = torch.where(counts > 0, counts / (k * n * probs.clamp(min=1e-30)), torch.zeros(n))
    return weights.to(per_sample_loss.device, per_sample_loss.dtype)
