"""Per-sample weight-gradient statistics, recorded during an exact backward for the adaptive
controller (:mod:`vcas.control.adaptive`).

For a random subset of a layer's weight entries (its *probe*: whole rows or columns of a linear
weight, single entries of a convolution's), each sample's contribution ``c_i`` to the weight
gradient is computed from the tensors the backward already has (the layer's input and its output
gradient). From the contributions of one batch the controller gets the SGD variance (their
spread) and, for any activation keep ratios, the variance activation sampling would add
(``sum_i (E[w_i^2] - 1) ||c_i||^2``), without extra passes.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(eq=False)
class SampleRecord:
    """One layer's per-sample statistics from one backward pass.

    Attributes:
        block: name of the block whose activation sampler the gradient passed last before
            reaching the layer (its samples carry that sampler's weights), or ``None`` above
            every sampler.
        squared_norms: ``||c_i||^2`` per sample on the probe, float64 (CPU once taken).
        total: ``sum_i c_i`` on the probe, float64 (CPU once taken).
        pass_norms: the per-sample gradient norms every sampler recorded in the same pass (one
            dict, block name -> norms, shared by the pass's records), from which the samplers
            are simulated.
    """

    block: str | None
    squared_norms: torch.Tensor
    total: torch.Tensor
    pass_norms: dict[str, torch.Tensor]

    @property
    def finite(self) -> bool:
        """False for a pass whose gradient overflowed (e.g. a step the fp16 GradScaler skips)."""
        return bool(torch.isfinite(self.squared_norms).all()) and bool(torch.isfinite(self.total).all())


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """Whole rows (``dim`` 0) or columns (1) of an (out, in) linear weight."""

    dim: int
    index: torch.Tensor


@dataclasses.dataclass(frozen=True)
class FlatProbe:
    """Entries of a flattened weight (a convolution's)."""

    index: torch.Tensor


def linear_probe(out_features: int, in_features: int, fraction: float,
                 generator: torch.Generator) -> LinearProbe:
    """A random ``fraction`` of the rows or columns of an (out, in) weight, along the larger
    dimension: at least ``fraction`` of the entries, gathered as whole slices so that per-sample
    contributions are batched matrix products rather than gathers."""
    dim = 0 if out_features >= in_features else 1
    size = (out_features, in_features)[dim]
    count = max(1, math.ceil(fraction * size))
    return LinearProbe(dim, torch.randperm(size, generator=generator)[:count].sort().values)


def linear_contributions(grad_out: torch.Tensor, x: torch.Tensor, probe: LinearProbe) -> torch.Tensor:
    """(samples, entries) per-sample contributions ``c_i = dY_i^T X_i`` of each sample to the
    probed weight slices."""
    samples = x.shape[0] if x.dim() > 1 else 1
    gy = grad_out.reshape(samples, -1, grad_out.shape[-1]).float()
    xs = x.reshape(samples, -1, x.shape[-1]).float()
    index = probe.index.to(gy.device)
    if probe.dim == 0:
        gy = gy.index_select(2, index)
    else:
        xs = xs.index_select(2, index)
    return torch.bmm(gy.transpose(1, 2), xs).reshape(samples, -1)


def contribution_moments(contributions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``||c_i||^2`` per sample and ``sum_i c_i``, float64, on the contributions' device (the
    recorder moves them to the CPU when the controller takes them, outside the step)."""
    c = contributions.double()
    return c.pow(2).sum(1), c.sum(0)
