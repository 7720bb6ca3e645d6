"""Keeping the controllers of all data-parallel ranks identical (DDP by hand, accelerate, the
Hugging Face Trainer, Lightning).

Each rank samples its own local batch (its sampling generator is offset by its rank), but every
rank must hold the same s, rho and nu, or the ranks would skip different work and disagree about
the variance bound. So before each update the ranks exchange their calibration measurements:
variance statistics are averaged, per-batch records pooled, and every rank applies the same update.

Why averaging is the right statistic: the gradient DDP applies is the mean of W local gradients,
so its SGD variance and its sampling variance are both the local ones divided by W; the ratio the
controller compares is the same whether it is taken per rank or for the global batch, and the
average over ranks is simply a W times larger sample of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
from torch import nn

from .adaptive import CalibrationStats
from .calibration import Measurement
from .errors import AttachError

__all__ = ["unwrap_model", "ddp_wrapper", "no_sync", "rank", "world_size", "merge_measurements",
           "merge_stats"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel and ``torch.compile`` wrappers.

    vcas attaches to the inner module so that block names, ``state_dict`` keys and checkpoints are
    the same with and without the wrappers.

    Raises:
        AttachError: the model is wrapped in ``nn.DataParallel`` or FSDP, which vcas cannot follow.
    """
    while True:
        if isinstance(model, nn.DataParallel):
            raise AttachError(
                "nn.DataParallel copies the module onto each GPU on every forward, which vcas "
                "cannot follow; use DistributedDataParallel (torchrun, accelerate launch) instead")
        if type(model).__name__ == "FullyShardedDataParallel":
            raise AttachError(
                "FSDP shards the weights that vcas samples; it is not supported. Use "
                "DistributedDataParallel, or attach vcas to a model that is not sharded")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def ddp_wrapper(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The outermost DistributedDataParallel in ``model``'s wrappers, or ``None``."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        if not _is_compiled(model):
            return None
        model = model._orig_mod


def _is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module)


@contextlib.contextmanager
def no_sync(wrapper: nn.parallel.DistributedDataParallel | None) -> Iterator[None]:
    """DDP's ``no_sync`` around calibration passes (when vcas knows the wrapper).

    Calibration takes gradients with ``torch.autograd.grad``, which never fires DDP's gradient
    all-reduce; ``no_sync`` additionally stops a forward through the wrapper from preparing the
    reducer for a backward that does not come (with ``find_unused_parameters=True`` that
    preparation would all-reduce the buckets of unused parameters).
    """
    with (wrapper.no_sync() if wrapper is not None else contextlib.nullcontext()):
        yield


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return torch.distributed.get_rank() if world_size() > 1 else 0


def world_size() -> int:
    """Number of ranks of the default process group (1 when not distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def merge_measurements(local: Measurement) -> Measurement:
    """The measurement of every rank merged into one, identical on all ranks.

    Variance estimates are averaged over ranks; the per-batch records (per-block sample norms,
    per-linear row scores) are concatenated in rank order, so the candidate schedule averages the
    per-block norm-share fractions over every rank's calibration batches. Every rank then computes
    its update from the same numbers, in the same order, on the CPU, and gets bit-identical ratios.
    A non-finite estimate on any rank makes the merged one non-finite, so all ranks skip alike.

    Every rank must call this at the same calibration (the controllers count steps identically
    when every rank calls ``maybe_calibrate`` once per optimizer step).
    """
    if world_size() == 1:
        return local
    gathered: list[Measurement | None] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, local)
    ranks = [m for m in gathered if m is not None]
    return dataclasses.replace(
        ranks[0],
        var_sgd_layers=_mean_lists([m.var_sgd_layers for m in ranks]),
        var_act_layers=_mean_lists([m.var_act_layers for m in ranks]),
        var_weight_layers=_mean_lists([m.var_weight_layers for m in ranks]),
        block_norms=[batch for m in ranks for batch in m.block_norms],
        row_scores=[[s for m in ranks for s in m.row_scores[site]] for site in range(len(ranks[0].row_scores))])


def merge_stats(local: CalibrationStats) -> CalibrationStats:
    """The adaptive controller's records of every rank pooled, identical on all ranks.

    Each rank's passes are kept as passes of one step, in rank order: the pooled SGD variance
    and the predicted sampling variances are then both W times those of the averaged gradient,
    so their ratio, which the controller compares, is that of the global batch."""
    if world_size() == 1:
        return local
    gathered: list[CalibrationStats | None] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, local)
    ranks = [stats for stats in gathered if stats is not None]
    return CalibrationStats(
        layers=[[r for stats in ranks for r in stats.layers[i]] for i in range(len(local.layers))],
        scales=list(local.scales),
        row_scores=[[sc for stats in ranks for sc in stats.row_scores[i]]
                    for i in range(len(local.row_scores))],
        n_blocks=local.n_blocks)


def _mean_lists(lists: list[list[float]]) -> list[float]:
    return [sum(values) / len(values) for values in zip(*lists)]
