"""Per-sample weight-gradient statistics, recorded during an exact backward for the adaptive
controller (:mod:`vcas.control.adaptive`).

Each sample's contribution ``c_i`` to a layer's weight gradient is seen through the layer's
*probe*, computed from the tensors the backward already has (the layer's input and its output
gradient). From the probed contributions of one batch the controller gets the SGD variance
(their spread) and, for any activation keep ratios, the variance activation sampling would add
(``sum_i (E[w_i^2] - 1) ||c_i||^2``), without extra passes.

- A linear's probe is a random sketch of one side of its weight (:class:`LinearSketch`), drawn
  afresh for every calibration: every entry of the weight takes part, so the estimates are
  unbiased for the whole layer. A fixed subset of rows or columns would not be: in a transformer
  a few hidden dimensions carry much of the gradient, so which of them a subset holds would
  decide a layer's estimates (by an order of magnitude on a small Llama).
- A convolution's probe is a random subset of its weight entries (:class:`FlatProbe`), scaled up.
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


# The fewest columns of a linear's sketch: a sample's ||c_i S||^2 has a relative standard error
# of at most sqrt(2 / columns) (a rank-one c_i; less for any other), and the per-sample errors
# are independent, so the batch's and the model's sums are much closer.
MIN_SKETCH_COLUMNS = 8


@dataclasses.dataclass(frozen=True)
class LinearSketch:
    """A random projection ``S`` (``size`` x ``columns``) of one side of an (out, in) linear
    weight: of its output side (``dim`` 0: a contribution ``c`` is seen as ``S^T c``, ``columns``
    x in) or its input side (1: ``c S``, out x ``columns``).

    The entries of ``S`` are independent +-1/sqrt(columns), so ``E[S S^T] = I``: ``||c S||^2`` is
    an unbiased estimate of ``||c||^2`` for every ``c``, and the spread of the projected
    contributions an unbiased estimate of their spread. A side no longer than the columns is
    not projected (``S`` is the identity): its estimates are exact."""

    dim: int
    matrix: torch.Tensor

    def scale(self, numel: int) -> float:
        """The factor from a probed squared norm to the whole weight's: 1, the sketch is unbiased."""
        return 1.0


@dataclasses.dataclass(frozen=True)
class FlatProbe:
    """Entries of a flattened weight (a convolution's)."""

    index: torch.Tensor

    def scale(self, numel: int) -> float:
        """The factor from the probed entries' squared norm to the whole weight's."""
        return numel / max(1, self.index.numel())


def linear_sketch(out_features: int, in_features: int, fraction: float,
                  generator: torch.Generator) -> LinearSketch:
    """A fresh sketch of the larger side of an (out, in) weight, with ``fraction`` of that side's
    size as columns (at least :data:`MIN_SKETCH_COLUMNS`)."""
    dim = 0 if out_features >= in_features else 1
    size = (out_features, in_features)[dim]
    columns = max(MIN_SKETCH_COLUMNS, math.ceil(fraction * size))
    if size <= columns:
        return LinearSketch(dim, torch.eye(size))
    return LinearSketch(dim, _random_signs(size, columns, generator))


def redrawn(sketch: LinearSketch, generator: torch.Generator) -> LinearSketch:
    """A new sketch of the same side and size, independent of ``sketch``."""
    size, columns = sketch.matrix.shape
    if size == columns:
        return sketch  # the identity: exact, nothing to draw
    return LinearSketch(sketch.dim, _random_signs(size, columns, generator))


def _random_signs(size: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A (size, columns) matrix of independent +-1/sqrt(columns): ``E[S S^T] = I``."""
    signs = torch.randint(0, 2, (size, columns), generator=generator, dtype=torch.float32)
    return (2 * signs - 1) / math.sqrt(columns)


def linear_contributions(grad_out: torch.Tensor, x: torch.Tensor, sketch: LinearSketch) -> torch.Tensor:
    """(samples, entries) per-sample contributions ``c_i = dY_i^T X_i`` to the weight gradient
    seen through the sketch (``S^T c_i`` or ``c_i S``): two thin products, no per-sample
    weight-sized tensor."""
    samples = x.shape[0] if x.dim() > 1 else 1
    gy = grad_out.reshape(samples, -1, grad_out.shape[-1]).float()
    xs = x.reshape(samples, -1, x.shape[-1]).float()
    matrix = sketch.matrix.to(gy.device)
    if sketch.dim == 0:
        gy = gy @ matrix
    else:
        xs = xs @ matrix
    return torch.bmm(gy.transpose(1, 2), xs).reshape(samples, -1)


def sketch_flops(rows: int, sketch: LinearSketch, entries: int) -> float:
    """FLOPs of :func:`linear_contributions`: projecting ``rows`` rows, then the per-sample products."""
    size, columns = sketch.matrix.shape
    projection = 0.0 if size == columns else 2.0 * rows * size * columns
    return projection + 2.0 * rows * entries


def contribution_moments(contributions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``||c_i||^2`` per sample and ``sum_i c_i``, float64, on the contributions' device (the
    recorder moves them to the CPU when the controller takes them, outside the step)."""
    c = contributions.double()
    return c.pow(2).sum(1), c.sum(0)
