"""The state one controller shares with the hooks and ops it installed in one model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..accounting import FlopBucket, FlopTally
from ..ops.capacity import capacity
from .mode import SAMPLING, Mode
from .ratios import RatioTable
from .recorder import Recorder
from .rng import ExpectedDraws, SamplingGenerators


class Runtime:
    """What the installed ops read at forward and backward time. One per controller; never global.

    Attributes:
        mode: the current :class:`Mode` (frozen; replaced through :meth:`using` or
            :meth:`set_base_mode`).
        ratios: the current :class:`RatioTable`.
        tally: where FLOPs are counted (a compact block's re-run counts into a scratch tally of
            its own through :meth:`counting_into`).
        generators: the controller's own sampling generators (checkpointed).
        draws: where the samplers' keep decisions come from: ``generators`` (Bernoulli draws),
            or :class:`~vcas.runtime.rng.ExpectedDraws` in deterministic tests.
        recorder: the records of the current calibration.
        replay: while a compactly recomputed block records or re-runs its forward, its replay
            (:class:`vcas.ops.recompute.ForwardReplay`); set only through :meth:`replaying`.
        recompute_below: blocks whose keep ratio is at most this recompute compactly.
        gather_below: linears gather the non-zero rows of their incoming gradient only when at
            most this fraction of the rows is non-zero.
        sync_free: whether the ops avoid every host synchronisation (fixed-capacity selections,
            :mod:`vcas.ops.capacity`): True, False, or None for "on CUDA devices only".
    """

    def __init__(self, ratios: RatioTable, generators: SamplingGenerators, recorder: Recorder, *,
                 recompute_below: float = 0.0, gather_below: float = 1.0,
                 sync_free: bool | None = None) -> None:
        self.mode: Mode = SAMPLING
        self._base_mode: Mode = SAMPLING
        self.ratios = ratios
        self.tally = FlopTally()
        self.generators = generators
        self.draws: SamplingGenerators | ExpectedDraws = generators
        self.recorder = recorder
        self.replay: object | None = None
        self.recompute_below = recompute_below
        self.gather_below = gather_below
        self.sync_free = sync_free
        self._nonfinite = 0
        self._nonfinite_on_device: list[torch.Tensor] = []
        self.compact_backwards = 0
        # Training forwards since the controller last counted an optimizer step.
        self.forwards_since_step = 0
        # The last input whose row norms a sampled linear took, with its version and the norms.
        self._input_norms: tuple[torch.Tensor, int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ modes
    def set_base_mode(self, mode: Mode) -> None:
        """The mode of the coming training steps (outside every :meth:`using` scope)."""
        self._base_mode = mode
        self.mode = mode

    @property
    def base_mode(self) -> Mode:
        return self._base_mode

    @contextlib.contextmanager
    def using(self, mode: Mode | None = None, **changes: object) -> Iterator[Mode]:
        """Run a scope under ``mode`` (default: the current one) with ``changes`` applied."""
        previous = self.mode
        self.mode = (mode if mode is not None else previous).replace(**changes)
        try:
            yield self.mode
        finally:
            self.mode = previous

    @contextlib.contextmanager
    def replaying(self, replay: object) -> Iterator[None]:
        previous, self.replay = self.replay, replay
        try:
            yield
        finally:
            self.replay = previous

    @contextlib.contextmanager
    def counting_into(self, tally: FlopTally) -> Iterator[FlopTally]:
        """Count FLOPs into ``tally`` inside the scope (the caller merges them as it sees fit)."""
        previous, self.tally = self.tally, tally
        try:
            yield tally
        finally:
            self.tally = previous

    # ------------------------------------------------------------------ counting
    def count_forward(self, flops: float) -> None:
        self.tally.bucket(self.mode.phase).forward += flops

    def count_backward(self, flops: FlopBucket) -> None:
        self.tally.bucket(self.mode.phase).add(flops)

    def count_nonfinite(self, flag: torch.Tensor | None = None) -> None:
        """Count a gradient that was not finite; ``flag`` (a device boolean) counts it without
        reading it now (the sync-free path)."""
        if flag is None:
            self._nonfinite += 1
        else:
            self._nonfinite_on_device.append(flag.detach().to(torch.int64))

    @property
    def nonfinite_gradients(self) -> int:
        if self._nonfinite_on_device:  # read here, outside the training step
            self._nonfinite += int(sum(flag.sum().cpu() for flag in self._nonfinite_on_device))
            self._nonfinite_on_device.clear()
        return self._nonfinite

    def syncless(self, device: torch.device) -> bool:
        """Whether ops on ``device`` take the sync-free path."""
        return device.type == "cuda" if self.sync_free is None else self.sync_free

    @property
    def in_compact_rerun(self) -> bool:
        """Whether the ops run inside a compact re-run, whose inputs hold only kept samples."""
        return self.replay is not None and bool(self.replay.compact)  # type: ignore[attr-defined]

    def reserved_samples(self, block: str | None, samples: int, every_sample_kept: bool = False) -> int:
        """How many of ``samples`` the sync-free path reserves room for at a sampled layer in
        ``block``: every one outside the blocks, without activation sampling, or when the input
        holds only kept samples (a compact re-run), else the kept count's bound at the block's ratio."""
        if every_sample_kept or block is None or not self.mode.sample_acts:
            return samples
        return capacity(self.ratios.act[block] * samples, samples)

    # ------------------------------------------------------------------ shared input norms
    def input_row_norms(self, x: torch.Tensor) -> torch.Tensor:
        """Row norms of a linear input (its last dimension), float32. Linears that read the same
        input (attention's query, key and value projections) share one computation."""
        cached = self._input_norms
        if cached is not None and cached[0] is x and cached[1] == x._version:
            return cached[2]
        norms = torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]), dim=1, dtype=torch.float32)
        self._input_norms = (x, x._version, norms)
        return norms

    def forget_inputs(self) -> None:
        """Drop the reference to the last input (kept only between the linears of one forward)."""
        self._input_norms = None
