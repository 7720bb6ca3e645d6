"""Data-parallel ranks: what a controller needs to keep every rank's ratios identical.

Each rank samples its own local batch (its sampling generator is offset by its rank), but every
rank must hold the same s, rho and nu, or the ranks would skip different work and disagree about
the variance bound. So before each update the ranks exchange their calibration statistics; each
statistics type merges itself (``Measurement.merge``, ``CalibrationStats.merge``), and every
rank computes the same update from the same numbers.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

T = TypeVar("T")


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return torch.distributed.get_rank() if world_size() > 1 else 0


def world_size() -> int:
    """Number of ranks of the default process group (1 when not distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(local: T) -> list[T]:
    """``local`` of every rank, in rank order (``[local]`` when not distributed)."""
    if world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def merge(local: Any) -> Any:
    """The statistics of every rank merged into one, identical on all ranks. Every rank must
    call this at the same calibration (the controllers count steps identically when every rank
    steps its controller once per optimizer step)."""
    return type(local).merge(gather(local))
