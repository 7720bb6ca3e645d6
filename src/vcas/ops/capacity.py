"""Fixed-capacity selection: data-dependent subsets with sizes known on the host.

On a GPU, reading how many rows or samples are non-zero (``nonzero``, ``.item()``) stalls the
host until the device catches up. The sync-free path (``VCASConfig.sync_free``, on by default on
CUDA) never reads such a size: it reserves room for a Bernoulli count that the host can bound
from the keep ratio, the mean plus three standard deviations (:func:`capacity`), and selects that
many items, the marked ones first (:func:`select`).

When more items are marked than fit, :func:`select` keeps a uniformly random subset of them and
returns the weight ``marked / capacity`` for the chosen ones: each marked item is chosen with
probability ``capacity / marked``, so the re-weighted result stays unbiased (it only adds
variance, in the rare steps that overflow). On a CPU, where reading a size costs nothing, the
exact-size path gathers exactly the non-zero rows instead; the capacity costs computation on the
reserved but unused rows there.
"""

from __future__ import annotations

import math

import torch

# Standard deviations of the kept count reserved above its mean.
MARGIN = 3.0


def capacity(expected: float, n: int) -> int:
    """Items to reserve for a sum of independent Bernoulli keeps with mean ``expected`` out of
    ``n``: its variance is at most ``expected * (1 - expected / n)``, whatever the probabilities."""
    if expected >= n:
        return n
    variance = max(0.0, expected * (1.0 - expected / n))
    return min(n, math.ceil(expected + MARGIN * math.sqrt(variance) + 1))


def select(marked: torch.Tensor, size: int, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` distinct indices into ``marked`` (a boolean vector), the marked items first, and
    the weight their values must be multiplied by: ``max(1, marked.sum() / size)``.

    Marked items get random priorities, so that when more are marked than fit, the chosen ones
    are a uniformly random subset (see the module docstring); unmarked items fill the rest.
    Nothing is read back to the host."""
    uniform = torch.rand(marked.shape, generator=generator, device=marked.device)
    keys = marked.to(uniform.dtype) * (1.0 + uniform)
    indices = torch.topk(keys, size, sorted=False).indices
    factor = (marked.sum().to(torch.float32) / size).clamp(min=1.0)
    return indices, factor
