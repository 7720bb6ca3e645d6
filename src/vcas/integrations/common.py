"""Framework-free pieces the callbacks share: where calibration batches come from, and what is logged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler

from ..control.controller import Controller


def calibration_batches(loader: DataLoader, batch_size: int, seed: int) -> Iterator[Any]:
    """An endless stream of shuffled batches from ``loader``'s dataset and ``collate_fn``.

    It is a separate DataLoader with its own ``torch.Generator`` (no workers), so drawing from it
    neither consumes the training iterator nor the global RNG that the training sampler seeds
    its next epoch from: the training batch order stays exactly what it is without vcas.
    An iterable-style dataset is iterated again from its start, unshuffled.

    Raises:
        ValueError: the dataset yields no batch.
    """
    dataset = loader.dataset
    generator = torch.Generator().manual_seed(seed)
    sampler = None if isinstance(dataset, torch.utils.data.IterableDataset) else \
        RandomSampler(dataset, generator=generator)
    own = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                     generator=generator, num_workers=0)
    while True:
        empty = True
        for batch in own:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training dataset yields no batch to calibrate on")


def loader_batch_size(loader: DataLoader) -> int | None:
    """The per-device batch size of a DataLoader (also when it was built from a batch sampler)."""
    if loader.batch_size is not None:
        return loader.batch_size
    return getattr(getattr(loader, "batch_sampler", None), "batch_size", None)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts, lists and tuples are followed)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({key: to_device(value, device) for key, value in batch.items()})
    if isinstance(batch, (list, tuple)):
        moved = [to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def metrics(controller: Controller) -> dict[str, float]:
    """The controller's state as flat scalars for a metrics logger (keys prefixed ``vcas/``).

    s, the mean activation keep ratio (rho) and weight keep ratio (nu), the last measured
    V_act / V_sgd and V_w / V_sgd (absent before the first calibration), and the BP and
    whole-training FLOPs reductions so far (calibration included in the latter).
    """
    stats = controller.stats()
    values = {"vcas/s": stats["s"], "vcas/mean_act_ratio": _mean(stats["act_ratios"])}
    if stats["weight_ratios"]:
        values["vcas/mean_weight_ratio"] = _mean(stats["weight_ratios"])
    var_sgd = stats["var_sgd"]
    if var_sgd:  # None before the first calibration; 0 would make the ratios meaningless
        values["vcas/var_act_over_sgd"] = stats["var_act"] / var_sgd
        values["vcas/var_weight_over_sgd"] = stats["var_weight"] / var_sgd
    values["vcas/bp_flops_reduction"] = stats["bp_flops_reduction"]
    values["vcas/train_flops_reduction"] = stats["train_flops_reduction"]
    return {key: float(value) for key, value in values.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 1.0
