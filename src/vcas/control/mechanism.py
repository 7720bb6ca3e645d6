"""The mechanism a controller drives: the sampled backward installed in one model.

It owns the installation and the runtime, and offers the controllers what they need of them,
and nothing else: the ratios, the recording of calibration steps, the records, the measured
weights and their probes, the one-off FLOPs measurement, and a scope that leaves training
untouched (RNG streams, buffers, DDP's gradient synchronisation).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..accounting import FlopTally, OtherWork
from ..ops.records import FlatProbe, LinearSketch, SampleRecord, linear_sketch
from ..plan.checkpointing import checkpointing_suspended
from ..plan.discovery import Plan
from ..runtime.mode import EXACT, RECORDING_STEP, SAMPLING, Mode
from ..runtime.ratios import RatioTable
from ..runtime.rng import preserved_training_state
from ..runtime.runtime import Runtime
from .statistics import CalibrationStats

logger = logging.getLogger("vcas")

LossFn = Callable[[Any], torch.Tensor]


class Mechanism:
    """The sampled backward of one model, as its controller sees it.

    Args:
        model: the user's module (inside any DDP or ``torch.compile`` wrapper).
        plan: what was installed.
        installation: the installed samplers and sites (:class:`vcas.install.installation.Installation`).
        measured: the weights whose gradient variance the controllers measure, by name (a
            sampled layer's name, or a parameter's qualified name in a model without sampled
            layers), in the order the controllers sum them.
        subsets: per measured weight, the flat indices of its probed entries (paper).
        ddp: the DistributedDataParallel wrapper, if any (calibration passes run under no_sync).
        seed: the seed of the linears' sketches, redrawn for every calibration (the same on
            every rank: their records are merged as passes of one step).
    """

    def __init__(self, model: nn.Module, plan: Plan, installation: Any, measured: dict[str, nn.Parameter],
                 subsets: dict[str, torch.Tensor], ddp: nn.parallel.DistributedDataParallel | None,
                 seed: int = 0) -> None:
        self.model = model
        self.plan = plan
        self.installation = installation
        self.runtime: Runtime = installation.runtime
        self.measured = measured
        self.subsets = subsets
        self.ddp = ddp
        self.sketches = torch.Generator().manual_seed(seed)
        self._before_draw = self.sketches.get_state()

    # ------------------------------------------------------------------ what is sampled
    @property
    def block_names(self) -> list[str]:
        return self.plan.block_names

    @property
    def linear_names(self) -> list[str]:
        return [site.name for site in self.plan.linears]

    @property
    def above_positions(self) -> list[int | None]:
        """Per block (plan order), the position of the block above in its stack, or None."""
        index = {name: i for i, name in enumerate(self.block_names)}
        return [None if (above := self.plan.above[name]) is None else index[above]
                for name in self.block_names]

    @property
    def dense_above(self) -> list[float]:
        """Per block (plan order), the keep ratio above which sampling there saves next to
        nothing: for a block whose sampled layers are all linears, ``gather_below`` (above it
        their input-gradient products run dense, and so does everything else in the block; a
        sampled weight gradient keeps ``nu`` of fewer non-zero rows, a small saving) or
        ``recompute_below`` where that is higher (compact recompute saves below it); 1 for a
        block with a convolution (convolutions gather their non-zero samples at any ratio).

        The sync-free path (CUDA) runs dense from a lower ratio (its room for the kept rows is a
        high quantile of their count): there ratios between that point and this one still save
        nothing."""
        linear_only = max(self.runtime.gather_below, self.runtime.recompute_below)
        return [linear_only if all(site.is_linear for site in self.plan.sites if site.block == block) else 1.0
                for block in self.block_names]

    def weight_sampled(self, linear: str) -> bool:
        """Whether the controllers may sample this linear's weight gradient."""
        return self.installation.sites[linear].weight_sampled

    @property
    def ratios(self) -> RatioTable:
        return self.runtime.ratios

    def set_ratios(self, ratios: RatioTable) -> None:
        self.runtime.ratios = ratios

    # ------------------------------------------------------------------ adaptive calibration steps
    @property
    def recording(self) -> bool:
        """Whether the coming training steps are calibration steps (exact activation gradients,
        recorded)."""
        return self.runtime.base_mode == RECORDING_STEP

    def start_recording(self) -> None:
        """The coming steps calibrate, each linear recording through a sketch of its own drawn
        now (the calibration's estimates are independent of the previous ones')."""
        self.runtime.recorder.clear()
        self._before_draw = self.sketches.get_state()
        self.runtime.recorder.redraw_sketches(self.sketches)
        self.runtime.set_base_mode(RECORDING_STEP)

    def sketch_state(self) -> torch.Tensor:
        """The sketches' generator as a resumed run needs it: while a calibration records, its
        state before that calibration's draw (resuming starts the recording again, and draws
        the same sketches)."""
        return self._before_draw if self.recording else self.sketches.get_state()

    def load_sketch_state(self, state: torch.Tensor | None, seed: int) -> None:
        """Restore :meth:`sketch_state` (``None``, from an earlier checkpoint format: reseed)."""
        self.sketches.manual_seed(seed)
        if state is not None:
            self.sketches.set_state(state)
        self._before_draw = self.sketches.get_state()

    def stop_recording(self) -> None:
        if self.recording:
            self.runtime.set_base_mode(SAMPLING)

    def take_stats(self) -> CalibrationStats | None:
        """What the sampled layers recorded since recording started (None if nothing ran).

        A pass with a non-finite record in any layer is dropped from every layer (the layers
        above the overflow would otherwise mix two loss scales): a step the fp16 GradScaler
        skips is not an optimizer step, so recording goes on into the next step, whose records
        then decide. (Only "nothing ran" gives None, so that DDP ranks stay in step: they all
        merge, then skip alike.) Row scores of such a pass stay: they are finite, and can only
        make a weight ratio more cautious."""
        if not self.runtime.recorder.has_samples:
            return None
        records = self.runtime.recorder.take()
        measured = [name for name in self.measured if name in self.installation.sites]
        by_layer = {name: records.samples.get(name, []) for name in measured}
        overflowed = {id(r.pass_norms) for layer in by_layer.values() for r in layer if not r.finite}
        layers = {name: [r for r in layer if id(r.pass_norms) not in overflowed]
                  for name, layer in by_layer.items()}
        probes = self.runtime.recorder.probes
        scales = {name: probes[name].scale(self.measured[name].numel()) for name in measured}
        scores = {name: records.row_scores.get(name, []) for name in self.linear_names}
        return CalibrationStats(layers, scales, scores, tuple(self.block_names))

    # ------------------------------------------------------------------ isolation
    @contextlib.contextmanager
    def isolated(self, mode: Mode | None = None, **changes: object) -> Iterator[None]:
        """Run extra passes that leave training untouched: every RNG stream and buffer is
        restored, DDP does not synchronise, and the installed ops run under ``mode``. The passes
        take gradients with ``autograd.grad``, which torch's reentrant checkpoint refuses: they
        run with transformers' activation checkpointing switched off."""
        with preserved_training_state(self.model), _no_sync(self.ddp), checkpointing_suspended(self.model), \
                self.runtime.using(mode or self.runtime.mode, **changes):
            yield

    # ------------------------------------------------------------------ FLOPs outside the sampled layers
    def measure_other_work(self, loss: Callable[[], torch.Tensor]) -> None:
        """Measure the model's FLOPs outside the sampled layers once, with
        ``torch.utils.flop_counter``, for the whole model and per block; see
        :mod:`vcas.accounting`. ``loss()`` runs one forward and returns a scalar."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        scratch = FlopTally()
        gather_below = self.runtime.gather_below
        self.runtime.gather_below = 0.0  # dense products: the counted backward is the exact one
        try:
            with self.isolated(EXACT), self.runtime.counting_into(scratch):
                with FlopCounterMode(display=False) as forward:
                    loss()
                with FlopCounterMode(display=False) as whole:
                    torch.autograd.grad(_scalar(loss()), params, allow_unused=True)
        finally:
            self.runtime.gather_below = gather_below
        layers = scratch.train
        # The counted forward ran twice (once in each counter) into the scratch tally.
        layer_forward, layer_backward = layers.forward / 2, layers.backward_exact
        if layer_forward <= 0 or layer_backward <= 0:
            return
        forward_counts, whole_counts = _per_module(forward, self.model), _per_module(whole, self.model)
        total_forward, total = forward_counts.get("", 0.0), whole_counts.get("", 0.0)
        # What the sampled layers really ran in the counted backward, not their exact products: a
        # layer whose gradient is all zero (a LoRA A below a B initialised to zero) skips its
        # products, and the difference is not the model's other work.
        layer_backward_run = layers.backward_done
        other = OtherWork(max(0.0, total_forward - layer_forward) / layer_forward,
                          max(0.0, total - total_forward - layer_backward_run) / layer_backward,
                          self._block_ratios(forward_counts))
        self.runtime.tally.other = other

    def _block_ratios(self, forward: dict[str, float]) -> dict[str, tuple[float, float]]:
        """Per block: its other forward FLOPs per sampled-layer forward FLOP, and its other
        backward FLOPs per sampled-layer backward FLOP (the counted products of the sampled layers
        are the exact ones here).

        Backward FLOPs come from the forward ones, not from the counter's module tracker, which
        attributes a backward product to whichever module's backward hooks are active when it
        runs (measured on a ViT block: its attention products' backward went to the query, key
        and value layers, none to the block). A matrix product's backward runs one product of
        its size per operand that needs a gradient: two for attention's products and for a
        trainable layer (input and weight), one for a frozen layer (input only)."""
        ratios = {}
        for block in self.block_names:
            sites = [s for s in self.plan.sites if s.block == block]
            site_forward = sum(forward.get(s.name, 0.0) for s in sites)
            site_backward = sum(forward.get(s.name, 0.0) * (2 if s.weight.requires_grad else 1) for s in sites)
            if site_forward <= 0 or block not in forward:
                continue
            other_forward = max(0.0, forward[block] - site_forward)
            ratios[block] = (other_forward / site_forward, 2 * other_forward / site_backward)
        return ratios

    def exact_pass(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` to the measured weights with ``autograd.grad`` (``.grad`` untouched)."""
        torch.autograd.grad(loss, list(self.measured.values()), allow_unused=True)


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            "loss_fn(batch) must return a scalar tensor that requires grad (the training loss "
            f"of that batch); got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    return loss


def scalar_loss(loss_fn: LossFn, batch: Any) -> torch.Tensor:
    """``loss_fn(batch)``, checked to be a scalar that requires grad."""
    return _scalar(loss_fn(batch))


def _per_module(counter: FlopCounterMode, model: nn.Module) -> dict[str, float]:
    """FLOPs per qualified module name ("" for the whole model) from a counter's module tracker
    (which names modules after the root class: ``Root.encoder.layer.0``)."""
    root = type(model).__name__
    counts = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            counts[""] = float(sum(ops.values()))
        elif name == root:
            counts.setdefault("", float(sum(ops.values())))
        elif name.startswith(root + "."):
            counts[name[len(root) + 1:]] = float(sum(ops.values()))
    return counts


@contextlib.contextmanager
def _no_sync(wrapper: nn.parallel.DistributedDataParallel | None) -> Iterator[None]:
    """DDP's ``no_sync`` around calibration passes (when vcas knows the wrapper).

    Calibration takes gradients with ``torch.autograd.grad``, which never fires DDP's gradient
    all-reduce; ``no_sync`` additionally stops a forward through the wrapper from preparing the
    reducer for a backward that does not come (with ``find_unused_parameters=True`` that
    preparation would all-reduce the buckets of unused parameters).
    """
    with (wrapper.no_sync() if wrapper is not None else contextlib.nullcontext()):
        yield


def measured_weights(plan: Plan) -> dict[str, nn.Parameter]:
    """The weights whose gradient variance is measured: the sampled layers' trainable weights
    (linears first, then convolutions), or, in a model without them, the trainable parameters
    of the blocks, by qualified name."""
    sites = [site for site in plan.linears + plan.convs if site.trainable]
    if sites:
        return {site.name: site.weight for site in sites}
    seen: set[int] = set()
    params: dict[str, nn.Parameter] = {}
    for block_name, block in plan.blocks:
        for name, param in block.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params[f"{block_name}.{name}"] = param
    return params


def probes(plan: Plan, measured: dict[str, nn.Parameter], fraction: float,
           seed: int) -> tuple[dict[str, torch.Tensor], dict[str, LinearSketch | FlatProbe]]:
    """The random ``fraction`` of each measured weight (flat entries, for the paper's calibration
    and the convolutions' records), and each linear's first sketch (:mod:`vcas.ops.records`)."""
    generator = torch.Generator().manual_seed(seed)
    kinds = {site.name: site for site in plan.sites}
    subsets: dict[str, torch.Tensor] = {}
    layer_probes: dict[str, LinearSketch | FlatProbe] = {}
    for name, param in measured.items():
        size = max(1, math.ceil(fraction * param.numel()))
        subsets[name] = torch.randperm(param.numel(), generator=generator)[:size].sort().values
        site = kinds.get(name)
        if site is None:
            continue
        if not site.is_linear:
            layer_probes[name] = FlatProbe(subsets[name])
        else:
            transposed = getattr(site.kind, "transposed", False)
            out_features, in_features = param.shape[::-1] if transposed else param.shape
            layer_probes[name] = linear_sketch(out_features, in_features, fraction, generator)
    return subsets, layer_probes


__all__ = ["Mechanism", "SampleRecord", "measured_weights", "probes", "scalar_loss"]
