"""What the sampled layers and block samplers record for the controllers.

The recorder is the one place records live: ops append to it by layer name, the controller
takes them out. It keeps at most ``max_passes`` backward passes: a loop that never lets the
controller take them (``maybe_calibrate`` never called) cannot grow memory without bound, and
is told once what to call.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import warnings
from collections.abc import Mapping

import torch

from ..ops.records import FlatProbe, LinearSketch, SampleRecord, contribution_moments, redrawn

logger = logging.getLogger("vcas")

MAX_PASSES = 64


@dataclasses.dataclass
class PassRecords:
    """What one backward pass recorded (adaptive calibration steps)."""

    norms: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    samples: dict[str, list[SampleRecord]] = dataclasses.field(default_factory=dict)
    row_scores: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)
    last_block: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.norms or self.samples or self.row_scores)


@dataclasses.dataclass(frozen=True)
class Records:
    """Records taken out of the recorder: per layer name, one entry per pass, in pass order."""

    samples: dict[str, list[SampleRecord]]
    row_scores: dict[str, list[torch.Tensor]]
    block_norms: dict[str, list[torch.Tensor]]
    dropped_passes: int = 0


class Recorder:
    """Per-layer records of the current calibration.

    Args:
        probes: per sampled layer whose weight gradient is measured, what its per-sample
            contributions are recorded through (a linear's sketch, a convolution's entries).
        max_passes: the most backward passes kept between two :meth:`take` calls.
    """

    def __init__(self, probes: Mapping[str, LinearSketch | FlatProbe], max_passes: int = MAX_PASSES) -> None:
        self.probes = dict(probes)
        self.max_passes = max_passes
        self._passes: collections.deque[PassRecords] = collections.deque()
        self._dropped = 0
        self._warned = False

    def redraw_sketches(self, generator: torch.Generator) -> None:
        """New sketches for the linears, drawn from ``generator``."""
        self.probes = {name: redrawn(probe, generator) if isinstance(probe, LinearSketch) else probe
                       for name, probe in self.probes.items()}

    # ------------------------------------------------------------------ written by the ops
    def start_pass(self) -> None:
        """A forward starts: the backward that follows records into a fresh pass."""
        if self._passes and self._passes[-1].empty:
            self._passes[-1].last_block = None
            return
        self._passes.append(PassRecords())
        if len(self._passes) > self.max_passes:
            self._passes.popleft()
            self._dropped += 1
            self._warn_unbounded()

    def _current(self) -> PassRecords:
        if not self._passes:
            self._passes.append(PassRecords())
        return self._passes[-1]

    def block_norms(self, block: str, norms: torch.Tensor, *, samples: bool) -> None:
        """A block sampler's per-sample gradient norms (``samples``: the adaptive records,
        which also mark the block as the last sampler the gradient passed)."""
        current = self._current()
        current.norms[block] = norms.detach()
        if samples:
            current.last_block = block

    def layer_samples(self, layer: str, contributions: torch.Tensor) -> None:
        squared_norms, total = contribution_moments(contributions)
        current = self._current()
        record = SampleRecord(current.last_block, squared_norms, total, current.norms)
        current.samples.setdefault(layer, []).append(record)

    def row_scores(self, layer: str, scores: torch.Tensor) -> None:
        self._current().row_scores.setdefault(layer, []).append(scores.detach())

    # ------------------------------------------------------------------ read by the controller
    @property
    def has_samples(self) -> bool:
        return any(p.samples for p in self._passes)

    @property
    def passes(self) -> int:
        return sum(not p.empty for p in self._passes)

    def take(self) -> Records:
        """Every record since the last take, by layer name in pass order; the recorder is emptied."""
        passes = [p for p in self._passes if not p.empty]
        for p in passes:
            _to_cpu(p)
        samples: dict[str, list[SampleRecord]] = {}
        scores: dict[str, list[torch.Tensor]] = {}
        norms: dict[str, list[torch.Tensor]] = {}
        for p in passes:
            for name, records in p.samples.items():
                samples.setdefault(name, []).extend(records)
            for name, values in p.row_scores.items():
                scores.setdefault(name, []).extend(values)
            for name, value in p.norms.items():
                norms.setdefault(name, []).append(value)
        taken = Records(samples, scores, norms, self._dropped)
        self.clear()
        return taken

    def clear(self) -> None:
        self._passes.clear()
        self._dropped = 0

    def _warn_unbounded(self) -> None:
        if self._warned:
            return
        self._warned = True
        message = (f"vcas: more than {self.max_passes} backward passes recorded without a "
                   "controller step; only the last ones are kept. Call controller.maybe_calibrate() "
                   "after every optimizer.step(), or attach with optimizer=... so that vcas counts "
                   "steps itself: until then the controller never updates and every backward stays exact")
        warnings.warn(message, stacklevel=3)
        logger.warning(message)


def _to_cpu(records: PassRecords) -> None:
    """Move a pass's records to the CPU in place (its records share its norms dict)."""
    for block, norms in records.norms.items():
        records.norms[block] = norms.cpu()
    for layer in records.samples.values():
        for record in layer:
            record.squared_norms, record.total = record.squared_norms.cpu(), record.total.cpu()
    for name, scores in records.row_scores.items():
        records.row_scores[name] = [s.cpu() for s in scores]
