"""The sampling state one controller shares with the hooks and ops it installed in one model."""

from __future__ import annotations

from typing import Any

import torch

from .accounting import TRAIN, FlopBucket, FlopTally


class SamplingState:
    """What the installed hooks read at backward time. One per controller; never global.

    Attributes:
        enabled: False while paused or detached: every hook and op is then a no-op.
        sample_acts: apply activation sampling (SampleA) at block outputs.
        sample_weights: apply weight-gradient sampling (SampleW) in linear layers.
        record_norms: blocks record their per-sample gradient norms (calibration exact pass).
        record_row_scores: linears whose weight gradient may be sampled record their SampleW
            row scores without sampling (calibration passes), from which the controllers get
            the analytic SampleW variance at any ratio.
        record_samples: sampled layers with a weight subset record per-sample weight-gradient
            statistics (:mod:`vcas.ops.records`; the adaptive controller's exact passes).
        last_block: while recording samples, the block whose sampler the gradient passed last.
        pass_norms: while recording samples, the per-sample norms each sampler saw in this pass.
        phase: the accounting bucket FLOPs go to (``"train"`` or ``"calibration"``).
        act_ratios: keep ratio per block, input side first.
        weight_ratios: keep ratio per sampled linear layer.
        recompute_below: blocks whose keep ratio is at most this recompute compactly
            (:mod:`vcas.ops.compact`); 0 = never.
        gather_below: sampled linears gather the non-zero rows of their incoming gradient (and
            skip the zero rows' products) only when at most this fraction of the rows is non-zero.
        replay: while a compact block runs its forward without a graph (``replay.recording``)
            or re-runs it in the backward, its :class:`~vcas.ops.compact.ForwardReplay`.
        recompute_scale: while a compact block re-runs its forward in the backward, the batch
            size over the number of kept samples (else ``None``): re-run FLOPs count as backward
            work, and the exact-backward reference is scaled back to the whole batch.
    """

    def __init__(self, n_blocks: int, n_linears: int, seed: int, rank: int = 0) -> None:
        self.enabled = True
        self.sample_acts = True
        self.sample_weights = True
        self.record_norms = False
        self.record_row_scores = False
        self.record_samples = False
        self.last_block: int | None = None
        self.pass_norms: dict[int, torch.Tensor] = {}
        self.phase = TRAIN
        self.act_ratios = [1.0] * n_blocks
        self.weight_ratios = [1.0] * n_linears
        self.recompute_below = 0.0
        self.gather_below = 1.0
        self.replay: Any = None
        self.recompute_scale: float | None = None
        self.tally = FlopTally()
        self.nonfinite_gradients = 0
        self.seed = seed
        self.rank = rank
        self._generators: dict[str, torch.Generator] = {}
        # The last input whose row norms a sampled linear took, with its version and the norms.
        self._input_norms: tuple[torch.Tensor, int, torch.Tensor] | None = None

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

    def count_forward(self, flops: float) -> None:
        bucket = self.tally.bucket(self.phase)
        if self.recompute_scale is None:
            bucket.forward += flops
        else:  # a forward re-run inside the backward is backward work
            bucket.backward_done += flops

    def count_backward(self, flops: FlopBucket) -> None:
        if self.recompute_scale is not None:
            flops.backward_exact *= self.recompute_scale
        self.tally.bucket(self.phase).add(flops)

    def generator(self, device: torch.device) -> torch.Generator:
        """The controller's own generator for ``device``: sampling never touches the user's RNG."""
        key = str(device)
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed + 1_000_003 * self.rank + _device_offset(device))
            self._generators[key] = generator
        return self._generators[key]

    def generator_states(self) -> dict[str, torch.Tensor]:
        return {key: g.get_state() for key, g in self._generators.items()}

    def load_generator_states(self, states: dict[str, torch.Tensor]) -> None:
        for key, value in states.items():
            self.generator(torch.device(key)).set_state(value)


def _device_offset(device: torch.device) -> int:
    return 0 if device.index is None else 7919 * (device.index + 1)
