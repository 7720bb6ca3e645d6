"""Random number generators: the controller's own, and snapshots of the user's.

vcas draws its samples from generators of its own, so attaching it never shifts the user's
dropout masks or data order. Where vcas runs the user's code again (a calibration pass, a block
re-run in compact recompute), it restores the user's generators afterwards (or before, to draw
the same numbers again), as ``torch.utils.checkpoint`` does.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..ops.capacity import select as capacity_select
from ..sampling import BernoulliDraw, ExpectedDraw


class RngSnapshot:
    """The state of the global generators: torch's CPU generator and the CUDA devices given
    (all initialised ones by default); with ``everything``, also Python's and numpy's."""

    def __init__(self, cuda_devices: Iterable[torch.device] | None = None, *,
                 everything: bool = False) -> None:
        self.cpu = torch.get_rng_state()
        if cuda_devices is None:
            ready = torch.cuda.is_available() and torch.cuda.is_initialized()
            cuda_devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if ready else []
        self.cuda = {device: torch.cuda.get_rng_state(device) for device in cuda_devices}
        self.python: Any = random.getstate() if everything else None
        numpy = sys.modules.get("numpy") if everything else None  # only if the program imported it
        self.numpy: Any = numpy.random.get_state() if numpy is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)

    def advanced(self) -> bool:
        """Whether torch's CPU or one of the snapshot's CUDA generators has drawn since."""
        return (not torch.equal(torch.get_rng_state(), self.cpu)
                or any(not torch.equal(torch.cuda.get_rng_state(d), s) for d, s in self.cuda.items()))


@contextlib.contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Restore every RNG stream (torch CPU and CUDA, numpy, Python) and all buffers on exit."""
    snapshot = RngSnapshot(everything=True)
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        snapshot.restore()


class SamplingGenerators:
    """The controller's own generators, one per device, seeded from its seed and the rank."""

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed = seed
        self.rank = rank
        self._generators: dict[str, torch.Generator] = {}

    def draw(self, device: torch.device) -> BernoulliDraw:
        """The samplers' keep decisions on ``device``, from this controller's generator."""
        return BernoulliDraw(self.for_device(device))

    def select(self, marked: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sync-free path's fixed-size selection (:func:`vcas.ops.capacity.select`)."""
        return capacity_select(marked, size, self.for_device(marked.device))

    def for_device(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed + 1_000_003 * self.rank + _device_offset(device))
            self._generators[key] = generator
        return self._generators[key]

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._generators.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: g.get_state() for key, g in self._generators.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        for key, value in states.items():
            self.for_device(torch.device(key)).set_state(value)


def _device_offset(device: torch.device) -> int:
    return 0 if device.index is None else 7919 * (device.index + 1)


class ExpectedDraws:
    """Draws at their expectation on every device (:class:`vcas.sampling.ExpectedDraw`): put
    into ``Runtime.draws``, every sampler must reproduce the exact gradient."""

    def draw(self, device: torch.device) -> ExpectedDraw:
        return ExpectedDraw()

    def select(self, marked: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item with weight 1: a selection thins an overflow at random and re-weights the
        chosen by ``marked / size``, which is the identity in expectation."""
        return torch.arange(marked.numel(), device=marked.device), torch.ones((), device=marked.device)
