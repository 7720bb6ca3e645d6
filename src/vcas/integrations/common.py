"""Framework-free pieces the callbacks share: a resumable stream of calibration batches, the
batch size of a DataLoader, moving batches to a device, and what is logged."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..control.controller import Controller
from ..errors import StateDictError


class CalibrationBatches:
    """An endless stream of shuffled batches from a DataLoader's dataset and ``collate_fn``,
    whose position can be saved and restored.

    It draws with its own ``torch.Generator`` through DataLoaders of its own (no workers), so it
    neither consumes the training iterator nor the global RNG that the training sampler seeds
    its next epoch from: the training batch order stays exactly what it is without vcas. Each
    pass over the dataset is a new permutation. An iterable-style dataset is iterated again from
    its start, unshuffled.

    :meth:`state_dict` is the generator state at the start of the current pass and the number
    of batches drawn in it; after :meth:`load_state_dict` the stream continues with the batch
    that would have come next (the pass's permutation is drawn again; an iterable-style
    dataset is read again up to that point).

    Raises (from ``next``):
        ValueError: the dataset yields no batch.
    """

    def __init__(self, loader: DataLoader, batch_size: int, seed: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.dataset = loader.dataset
        self.collate_fn = loader.collate_fn
        self.batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._pass_start: torch.Tensor | None = None  # generator state before the pass's permutation
        self._position = 0  # batches drawn in the current pass
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> CalibrationBatches:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = self._start_pass()
        try:
            batch = next(self._batches)
        except StopIteration:
            if self._position == 0:
                raise ValueError("the training dataset yields no batch to calibrate on") from None
            self._position = 0
            self._batches = self._start_pass()
            return next(self)
        self._position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: enough to continue it exactly in another process."""
        start = self._pass_start if self._pass_start is not None else self._generator.get_state()
        return {"pass_start": start.clone(), "position": self._position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` output of a stream over the same dataset.

        Raises:
            StateDictError: ``state`` is not such output.
        """
        if not isinstance(state, Mapping) or set(state) != {"pass_start", "position"}:
            raise StateDictError("a CalibrationBatches state has the keys 'pass_start' and 'position' "
                                 "(the output of CalibrationBatches.state_dict())")
        self._generator.set_state(state["pass_start"])
        self._pass_start = None
        self._position = int(state["position"])
        self._batches = None  # the next draw starts the pass again from its saved start

    def _start_pass(self) -> Iterator[Any]:
        self._pass_start = self._generator.get_state()
        skipped = self._position
        if isinstance(self.dataset, IterableDataset):
            loader = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate_fn,
                                generator=self._generator, num_workers=0)
            return itertools.islice(iter(loader), skipped, None)
        order = torch.randperm(len(cast(Sized, self.dataset)), generator=self._generator).tolist()
        loader = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate_fn,
                            sampler=order[skipped * self.batch_size:], generator=self._generator,
                            num_workers=0)
        # The loader's iterator draws its base seed from the generator it is given, never the global one.
        return iter(loader)


def calibration_batches(loader: DataLoader, batch_size: int, seed: int) -> CalibrationBatches:
    """An endless, resumable stream of shuffled batches from ``loader``'s dataset and
    ``collate_fn`` (see :class:`CalibrationBatches`)."""
    return CalibrationBatches(loader, batch_size, seed)


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
        # A concrete mapping type (dict, OrderedDict, transformers' BatchEncoding) built from a dict.
        return cast(Any, type(batch))({key: to_device(value, device) for key, value in batch.items()})
    if isinstance(batch, (list, tuple)):
        moved = [to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def stream_state(batches: Any) -> Any:
    """The saved position of a calibration batch source that has one (``state_dict()`` and
    ``load_state_dict()``, as :class:`CalibrationBatches`), else ``None``."""
    return batches.state_dict() if _resumable(batches) else None


def restore_stream(batches: Any, state: Any) -> None:
    """Restore :func:`stream_state` output into ``batches`` (nothing when either has none)."""
    if state is not None and _resumable(batches):
        batches.load_state_dict(state)


def _resumable(batches: Any) -> bool:
    return callable(getattr(batches, "state_dict", None)) and callable(getattr(batches, "load_state_dict", None))


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
    # The last calibration's estimates as its history entry holds them: the same values as
    # stats() gives, and also right after load_state_dict, which restores the history.
    last = controller.history[-1] if controller.history else {}
    var_sgd = last.get("var_sgd")
    if var_sgd:  # None before the first calibration; 0 would make the ratios meaningless
        values["vcas/var_act_over_sgd"] = last["var_act"] / var_sgd
        values["vcas/var_weight_over_sgd"] = last["var_weight"] / var_sgd
    values["vcas/bp_flops_reduction"] = stats["bp_flops_reduction"]
    values["vcas/train_flops_reduction"] = stats["train_flops_reduction"]
    return {key: float(value) for key, value in values.items()}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 1.0
