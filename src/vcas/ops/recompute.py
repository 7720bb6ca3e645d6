"""Compact recompute: a block with a low keep ratio backpropagates through its kept samples only.

When a block's activation keep ratio is low at the time its forward runs, most samples will
arrive in its backward with an exactly zero gradient, and every op of the block (attention
products, softmax, normalisation, activations, dropout) would still work on full-size tensors.
Such a block instead runs its forward without building a graph (so it saves no activations), and
in the backward re-runs its forward on the samples whose gradient is non-zero and backpropagates
through that compact graph. Dropout masks drawn in the forward are replayed for the kept samples,
and the outputs of the sampled layers (linear, convolution) are replayed instead of recomputed.

Design note "per-sample evidence": the compact gradient equals the full one only if the block
treats samples independently. Replaying layer outputs hides any op that mixes samples before a
layer (``x - x.mean(0)``), so comparing outputs proves nothing. Instead, on its first uses
(``VERIFY_USES`` backward passes in which some samples were dropped and some kept) a block
backpropagates in full, as without compact recompute, and beside that computes its parameter and
input gradients twice for the same incoming gradient: through a full-batch re-run and through
the compact re-run. Only a block whose two agree on every use becomes compact; any other
falls back to the full backward for good, with one warning.

The re-run forward is extra work, counted as backward FLOPs; it pays where the ratio is low.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from ..accounting import FlopBucket, FlopTally
from ..plan.checkpointing import checkpoint_free_forward, checkpoints, inside_checkpoint
from ..plan.outputs import find_hidden_state, iter_tensors, replace_tensor
from ..runtime.mode import CALIBRATION, TRAIN
from ..runtime.rng import RngSnapshot
from ..runtime.runtime import Runtime
from .activation import nonzero_indices, per_sample_norms
from .capacity import capacity

logger = logging.getLogger("vcas")

# Backward passes with some samples dropped and some kept that must agree before a block
# recomputes compactly, and the most verifying uses before giving up on an uninformative block.
VERIFY_USES = 2
MAX_VERIFY_ATTEMPTS = 8
# Relative tolerance of the agreement (fp32 rounding differs with the batch size of a product).
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_LOW_PRECISION_TOLERANCE = 5e-2

# Random ops a re-run cannot replay: a block that calls them is never recomputed.
_UNREPLAYABLE = {torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint,
                 torch.randint_like, torch.bernoulli, torch.multinomial, torch.normal,
                 torch.randperm, torch.Tensor.bernoulli_, torch.Tensor.uniform_,
                 torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.exponential_,
                 F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                 F.feature_alpha_dropout, F.rrelu}
_TENSOR = object()  # stands for a tensor input in the re-run's copy of the arguments
_SAFE_LEAVES = (torch.Tensor, type(None), bool, int, float, str, torch.dtype, torch.device)


def _is_kv_cache(leaf: Any) -> bool:
    """A transformers key/value cache (``DynamicCache``, ``EncoderDecoderCache``, ...). In
    training it only collects the forward's keys and values; a re-run gets ``None`` instead,
    so that it computes the same keys and values without appending to the forward's cache."""
    cls = type(leaf)
    return cls.__module__.startswith("transformers") and cls.__name__.endswith("Cache")


def _replayable(leaf: Any) -> bool:
    return isinstance(leaf, _SAFE_LEAVES) or _is_kv_cache(leaf)


class Layers(enum.Enum):
    """What the sampled layers do under a replay."""

    RECORD = "record"  # compute, and record the output
    COMPUTE = "compute"  # compute (a full-batch reference re-run)
    REPLAY = "replay"  # return the recorded output for the kept samples


class ForwardReplay(TorchFunctionMode):
    """Records a block's forward (dropout masks, sampled-layer outputs) and replays it for any
    subset of the samples. Flags the use of random ops it cannot replay.

    The sampled layers reach the replay through ``Runtime.replay`` (:meth:`layer_output`); only
    dropout and random ops need the torch-function mode, whose Python call on every op of the
    block costs time. So a block seen to draw no random numbers runs without it
    (``active(intercept=False)``), and the global generators tell whether it drew some after
    all. Not caught: a block that starts drawing from a private ``torch.Generator`` only after
    its first forward.
    """

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self.masks: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.unreplayable: str | None = None
        self.layers = Layers.RECORD
        # Whether a graph-free recording keeps the sampled layers' outputs for the re-run to
        # replay; without them (a block that checkpoints) the re-run computes them.
        self.keep_outputs = True
        self._kept: torch.Tensor | None = None
        self._batch = 0
        self._positions = [0, 0]

    @property
    def recording(self) -> bool:
        return self.layers is Layers.RECORD

    @property
    def compact(self) -> bool:
        """Whether a re-run holds only the kept samples (each with a non-zero gradient)."""
        return self.layers is not Layers.RECORD and self._kept is not None

    def rerun(self, kept: torch.Tensor | None, batch: int, layers: Layers = Layers.REPLAY) -> ForwardReplay:
        """Replay the recordings for the samples ``kept`` (None: all) of a batch of ``batch``."""
        self.layers, self._kept, self._batch, self._positions = layers, kept, batch, [0, 0]
        return self

    @contextlib.contextmanager
    def active(self, intercept: bool) -> Iterator[ForwardReplay]:
        """The replay, reachable by the sampled layers; with the mode only if ``intercept``."""
        with self.runtime.replaying(self), (self if intercept else contextlib.nullcontext()):
            yield self

    # ------------------------------------------------------------------ sampled layers
    def layer_output(self, compute: Callable[[], torch.Tensor], flops: Callable[[torch.Tensor], float],
                     batch: int, shape: torch.Size | None,
                     graph: Callable[[torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """A sampled layer's output under the replay.

        Args:
            compute: the layer's plain forward (no graph).
            flops: the forward FLOPs of an output.
            batch: the batch size of the layer's input.
            shape: the output shape where known (checked against the recording).
            graph: the layer's sampled op: ``graph(None)`` computes, ``graph(recorded)`` builds
                the backward around an output computed before.
        """
        if self.layers is Layers.REPLAY:
            recorded = self._next(self.outputs, 1, shape, "layer output")
            if recorded.dim() == 0 or recorded.shape[0] != batch:
                raise _ReplayMismatch(f"layer output {tuple(recorded.shape)} for a batch of {batch}")
            return graph(recorded) if torch.is_grad_enabled() else recorded
        if self.layers is Layers.COMPUTE:
            return graph(None)
        if torch.is_grad_enabled():  # a verifying use: the real graph, recorded beside it
            out = graph(None)
            self.outputs.append(out.detach())
            return out
        out = compute()
        self.runtime.count_forward(flops(out))
        if self.keep_outputs:
            self.outputs.append(out)
        return out

    # ------------------------------------------------------------------ dropout and random ops
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        if func in _UNREPLAYABLE or (func is F.scaled_dot_product_attention
                                     and (kwargs.get("dropout_p") or (args[4] if len(args) > 4 else 0))):
            self.unreplayable = getattr(func, "__name__", str(func))
        return func(*args, **kwargs)

    def _dropout(self, input: torch.Tensor, p: float = 0.5, training: bool = True,
                 inplace: bool = False) -> torch.Tensor:
        if not training or p == 0:
            return input
        if self.recording:
            output, mask = _dropout_with_mask(input, p)
            self.masks.append(mask)
            return input.copy_(output) if inplace else output
        return _replay_dropout(input, self._next(self.masks, 0, input.shape, "dropout mask"), p)

    def _next(self, recorded: list[torch.Tensor], slot: int, shape: torch.Size | None,
              what: str) -> torch.Tensor:
        position = self._positions[slot]
        if position >= len(recorded):
            raise _ReplayMismatch(f"the re-run needs more of {what} than the forward made")
        self._positions[slot] += 1
        value = recorded[position]
        if self._kept is not None and value.dim() > 0 and value.shape[0] == self._batch:
            value = select_samples(value, self._kept)
        if shape is not None and value.shape != shape:
            raise _ReplayMismatch(f"{what} {tuple(value.shape)} where the re-run has {tuple(shape)}")
        return value


def _dropout_with_mask(input: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout's output and its mask, drawn as ``F.dropout`` draws them.

    On a CPU the mask is the noise scaled by 1 / (1 - p) in the input's dtype: the draws and the
    arithmetic of PyTorch's CPU dropout, whose noise the exact backward keeps as well. PyTorch's
    fused kernel (``native_dropout``) returns a boolean mask, but on a CPU it makes it by
    converting the float noise, and its replay converts it back: replaying the float noise
    costs about half as much (``benchmarks/dropout_replay.py``). At p = 1 ``F.dropout`` draws
    nothing, and neither does this. Elsewhere the fused kernel is what ``F.dropout`` runs, and
    its boolean mask is free."""
    if p == 1:
        return input * input.new_zeros(()), torch.zeros_like(input, dtype=torch.bool)
    if input.device.type == "cpu":
        noise = torch.empty_like(input).bernoulli_(1 - p).div_(1 - p)
        return input * noise, noise
    return torch.native_dropout(input, p, True)


def _replay_dropout(input: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with a recorded mask (of :func:`_dropout_with_mask`), one pass each way."""
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(input, mask, 0.0 if p == 1 else 1.0 / (1 - p))
    return input * mask


class _ReplayMismatch(RuntimeError):
    pass


class CompactBlock:
    """A block's ``forward`` that recomputes compactly when its keep ratio is low.

    ``status`` is ``"unverified"`` until the block's first uses agreed with the full backward
    (design note "per-sample evidence" above), then ``"compact"``; ``"full"`` (with
    ``reason``) when it backpropagates in full for good.
    """

    def __init__(self, name: str, module: nn.Module, runtime: Runtime) -> None:
        self.name = name
        self.module = module
        self.runtime = runtime
        self.original_forward: Callable[..., Any] = type(module).forward.__get__(module)
        # The forward of its own passes: inside transformers' checkpointing wrapper, if any
        # (:mod:`vcas.plan.checkpointing`); the block runs its original forward otherwise.
        self.inner_forward: Callable[..., Any] = checkpoint_free_forward(module) or self.original_forward
        # Its BatchNorms, found once: walking the module tree on every forward costs Python time.
        self.batch_norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
        self.status = "unverified"
        self.reason: str | None = None
        self.agreements = 0
        self.attempts = 0
        # Whether the forward must run under the torch-function mode: until it is seen to draw
        # no random numbers, and again once it has drawn some.
        self.intercept = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._wanted():
            return self.original_forward(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        if not all(_replayable(leaf) for leaf in flat):
            return self._refuse("its inputs hold objects other than tensors, numbers and key/value "
                                "caches", args, kwargs)
        if self.status == "unverified":
            return self._verifying_forward(args, kwargs, flat, spec)
        rng = RngSnapshot(_cuda_devices(flat))
        replay, output, layer_flops = self._recorded_forward(args, kwargs, rng)
        hidden = find_hidden_state(output)
        reason = self._ineligible(output, hidden, flat, replay)
        if reason is not None:
            rng.restore()  # run the block as usual instead, drawing the same random numbers again
            return self._refuse(reason, args, kwargs)
        self.intercept = bool(replay.masks)
        # _ineligible refuses a block without a hidden state.
        return self._attach_backward(output, cast(torch.Tensor, hidden), flat, spec, replay, layer_flops)

    def reserved_selection(self, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The sync-free path's kept samples: room reserved from the block's keep ratio, the
        samples with a non-zero gradient first (:mod:`vcas.ops.capacity`); their gradient."""
        batch = grad.shape[0]
        room = capacity(self.runtime.ratios.act[self.name] * batch, batch)
        if room >= batch:
            return None, grad
        kept, factor = self.runtime.draws.select(per_sample_norms(grad) != 0, room)
        return kept, grad.index_select(0, kept) * factor.to(grad.dtype)

    # ------------------------------------------------------------------ decisions
    def _wanted(self) -> bool:
        runtime = self.runtime
        mode = runtime.mode
        return (mode.enabled and torch.is_grad_enabled() and mode.sample_acts and mode.phase == TRAIN
                and runtime.replay is None and self.status != "full"
                and runtime.ratios.act[self.name] <= runtime.recompute_below
                and not torch.compiler.is_compiling() and not _flop_counter_active()
                and not inside_checkpoint())

    def _refuse(self, reason: str, args: tuple, kwargs: dict) -> Any:
        self._give_up(reason)
        return self.original_forward(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """What its first uses established (verified, or backpropagated in full and why), so a
        resumed run takes the same path as the uninterrupted one."""
        return {"status": self.status, "reason": self.reason, "agreements": self.agreements,
                "attempts": self.attempts, "intercept": self.intercept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.status, self.reason = str(state["status"]), state["reason"]
        self.agreements, self.attempts = int(state["agreements"]), int(state["attempts"])
        self.intercept = bool(state["intercept"])

    def _give_up(self, reason: str) -> None:
        self.status, self.reason = "full", reason
        logger.warning("vcas: block %r is backpropagated in full, not recomputed compactly: %s",
                       self.name, reason)

    def _ineligible(self, output: Any, hidden: torch.Tensor | None, flat: list,
                    replay: ForwardReplay) -> str | None:
        if hidden is None or hidden.dim() == 0:
            return "it returns no batch-first hidden state"
        if replay.unreplayable:
            return f"it draws random numbers with {replay.unreplayable}, which a re-run cannot replay"
        if any(m.training for m in self.batch_norms):
            return "it holds a BatchNorm in training mode, which mixes the samples"
        inputs = {id(leaf) for leaf in flat if isinstance(leaf, torch.Tensor)}
        for leaf in iter_tensors(output):
            if leaf is not hidden and id(leaf) not in inputs and leaf.is_floating_point():
                return "it returns a second floating-point tensor besides its hidden state"
        return None

    def record_verdict(self, agreed: bool | None, detail: str = "") -> None:
        """The outcome of one verifying use (None: no use with samples both dropped and kept)."""
        self.attempts += 1
        if agreed is False:
            self._give_up(f"its compact backward differs from the full backward ({detail})")
            return
        self.agreements += bool(agreed)
        if self.agreements >= VERIFY_USES:
            self.status = "compact"
        elif self.attempts >= MAX_VERIFY_ATTEMPTS:
            self.status = "full"
            self.reason = ("no use dropped some of its samples and kept others, so it could not "
                           "be shown to treat samples independently")
            logger.info("vcas: block %r is backpropagated in full: %s", self.name, self.reason)

    # ------------------------------------------------------------------ the compact path
    def _recorded_forward(self, args: tuple, kwargs: dict, rng: RngSnapshot) -> tuple[ForwardReplay, Any, float]:
        """The graph-free forward, recorded; run again under the mode if it drew random numbers
        unseen (the same numbers: the generators are restored first). Also returns the forward
        FLOPs of the block's sampled layers."""
        replay = ForwardReplay(self.runtime)
        replay.keep_outputs = not checkpoints(self.module)  # checkpointing keeps only the inputs
        scratch = FlopTally()
        with torch.no_grad(), self.runtime.counting_into(scratch), replay.active(self.intercept):
            output = self.inner_forward(*args, **kwargs)
        if self.intercept or not rng.advanced():
            forward = _forward_flops(scratch)
            self.runtime.count_forward(forward)
            return replay, output, forward
        rng.restore()
        self.intercept = True
        return self._recorded_forward(args, kwargs, rng)

    def _attach_backward(self, output: Any, hidden: torch.Tensor, flat: list, spec: Any,
                         replay: ForwardReplay, layer_flops: float) -> Any:
        tensors = [leaf for leaf in flat if isinstance(leaf, torch.Tensor)]
        params = [p for p in self.module.parameters() if p.requires_grad]
        context = _RerunContext(self, flat, spec, replay, hidden, layer_flops)
        new_hidden = _CompactFunction.apply(context, *tensors, *params)
        return replace_tensor(output, hidden, new_hidden)

    # ------------------------------------------------------------------ the verifying path
    def _verifying_forward(self, args: tuple, kwargs: dict, flat: list, spec: Any) -> Any:
        """The block's own forward with its graph, its dropout masks and layer outputs recorded
        beside it; the backward is checked against the compact re-run (design note above)."""
        replay = ForwardReplay(self.runtime)
        scratch = FlopTally()
        with replay.active(intercept=True), self.runtime.counting_into(scratch):
            output = self.inner_forward(*args, **kwargs)
        layer_flops = _forward_flops(scratch)
        self.runtime.count_forward(layer_flops)
        hidden = find_hidden_state(output)
        reason = self._ineligible(output, hidden, flat, replay)
        if reason is not None:  # the forward ran as usual (it built its graph): keep its output
            self._give_up(reason)
            return output
        hidden = cast(torch.Tensor, hidden)  # _ineligible refuses a block without one
        inputs = tuple(leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in flat)
        check = _Verification(self, inputs, spec, replay, hidden, layer_flops)
        return replace_tensor(output, hidden, _VerifyFunction.apply(hidden, check))


class _RerunContext:
    """What the backward needs to re-run one block's forward on the kept samples."""

    def __init__(self, block: CompactBlock, flat: list, spec: Any, replay: ForwardReplay,
                 hidden: torch.Tensor, layer_flops: float) -> None:
        self.block, self.spec, self.replay = block, spec, replay
        # Tensors are passed to the autograd function (and saved there); here only placeholders.
        self.flat = [_TENSOR if isinstance(leaf, torch.Tensor) else _rerun_leaf(leaf) for leaf in flat]
        self.hidden: torch.Tensor | None = hidden
        device = hidden.device.type
        self.autocast, self.autocast_dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        self.n_tensors = sum(isinstance(leaf, torch.Tensor) for leaf in flat)
        self.layer_flops = layer_flops
        self.layers = Layers.REPLAY if replay.keep_outputs else Layers.COMPUTE


class _CompactFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, context: _RerunContext, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.context = context
        replay = context.replay
        ctx.n_recorded = len(replay.masks) + len(replay.outputs)
        # Saved here, the recordings are freed with the graph and seen by saved-tensor hooks.
        ctx.save_for_backward(*tensors, *replay.masks, *replay.outputs)
        ctx.n_masks = len(replay.masks)
        replay.masks, replay.outputs = [], []
        hidden, context.hidden = context.hidden, None  # no reference cycle through the output
        return cast(torch.Tensor, hidden)  # set by _RerunContext, cleared only here

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        context: _RerunContext = ctx.context
        saved = ctx.saved_tensors
        n_inputs, n_params = context.n_tensors, len(saved) - context.n_tensors - ctx.n_recorded
        inputs, params = saved[:n_inputs], saved[n_inputs:n_inputs + n_params]
        recorded = saved[n_inputs + n_params:]
        needs = ctx.needs_input_grad[1:]
        block = context.block
        runtime = block.runtime
        # Decided from the gradient that arrives (already sampled at the block output).
        if runtime.syncless(grad.device):
            kept, grad_kept = block.reserved_selection(grad)
        else:
            kept = nonzero_indices(per_sample_norms(grad), runtime)
            if kept is not None and kept.numel() == 0:
                # Every sample dropped: the re-run of one sample with a zero gradient counts the
                # work an exact backward would have done (and returns zeros: DistributedDataParallel
                # expects a gradient for every parameter).
                kept = torch.zeros(1, dtype=torch.long, device=grad.device)
            grad_kept = grad if kept is None else grad.index_select(0, kept)
        replay = context.replay
        replay.masks, replay.outputs = list(recorded[:ctx.n_masks]), list(recorded[ctx.n_masks:])
        runtime.compact_backwards += 1
        try:
            rerun = _Rerun(context.block, context.flat, context.spec, replay, inputs, params,
                           (context.autocast, context.autocast_dtype))
            input_grads, param_grads = rerun.backward(kept, grad_kept, grad.shape[0],
                                                      needs[:n_inputs], needs[n_inputs:n_inputs + n_params],
                                                      context.layer_flops, context.layers)
        finally:
            replay.masks, replay.outputs = [], []
        return (None, *input_grads, *param_grads, *(None for _ in recorded))


class _Rerun:
    """A re-run of a block's forward from its recordings, and the backward through it."""

    def __init__(self, block: CompactBlock, flat: list, spec: Any, replay: ForwardReplay,
                 inputs: tuple, params: tuple, autocast: tuple[bool, torch.dtype]) -> None:
        self.block, self.spec, self.replay = block, spec, replay
        self.leaves = _fill(flat, inputs)
        self.inputs, self.params = inputs, params
        self.autocast = autocast

    def backward(self, kept: torch.Tensor | None, grad_kept: torch.Tensor, batch: int,
                 input_needs: tuple, param_needs: tuple, layer_flops: float,
                 layers: Layers = Layers.REPLAY) -> tuple[list, list]:
        """Re-run on the kept samples and backpropagate ``grad_kept``; the re-run's FLOPs are
        counted as the backward of the whole batch (see :func:`_count_rerun`)."""
        if _flop_counter_active():
            raise RuntimeError(
                f"vcas: block {self.block.name!r} recomputes compactly in this backward, which "
                "torch.utils.flop_counter.FlopCounterMode cannot follow; enter FlopCounterMode "
                "before the forward as well (blocks then backpropagate in full), or set "
                "VCASConfig(recompute_below=0)")
        runtime = self.block.runtime
        scratch = FlopTally()
        with runtime.counting_into(scratch):
            input_grads, param_grads = self._gradients(kept, grad_kept, batch, input_needs,
                                                       param_needs, layers)
        _count_rerun(self.block, scratch.bucket(runtime.mode.phase), batch,
                     batch if kept is None else kept.numel(), layer_flops)
        return input_grads, param_grads

    def _gradients(self, kept: torch.Tensor | None, grad_kept: torch.Tensor, batch: int,
                   input_needs: tuple, param_needs: tuple, layers: Layers) -> tuple[list, list]:
        compact = [_select(leaf, kept, batch) for leaf in self.leaves]
        positions = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]
        wanted = [i for i, need in zip(positions, input_needs) if need and self.leaves[i].is_floating_point()]
        for i in wanted:
            compact[i] = compact[i].detach().requires_grad_()
        enabled, dtype = self.autocast
        with torch.enable_grad(), torch.autocast(grad_kept.device.type, dtype=dtype, enabled=enabled):
            args, kwargs = tree_unflatten(compact, self.spec)
            intercept = bool(self.replay.masks)
            with self.replay.rerun(kept, batch, layers).active(intercept):
                # The same forward as the recorded one, which returned a hidden state.
                hidden = cast(torch.Tensor, find_hidden_state(self.block.inner_forward(*args, **kwargs)))
            targets = [compact[i] for i in wanted] + [p for p, need in zip(self.params, param_needs) if need]
            grads = torch.autograd.grad(hidden, targets, grad_kept.to(hidden.dtype), allow_unused=True)
        return (_input_grads(self.inputs, self.leaves, wanted, grads, kept, batch),
                _param_grads(self.params, param_needs, grads[len(wanted):]))


def _forward_flops(scratch: FlopTally) -> float:
    """The sampled layers' forward FLOPs a block's forward counted into ``scratch`` (in either
    phase), which the caller then counts as its own."""
    return scratch.train.forward + scratch.calibration.forward


def _count_rerun(block: CompactBlock, rerun: FlopBucket, batch: int, kept: int, layer_flops: float) -> None:
    """Count a compact backward: the sampled layers' products as done on the kept samples, their
    exact references scaled to the whole batch, and the block's other work (attention products
    and the like) as the re-run forward and backward on the kept samples against an exact
    backward on the whole batch (measured ratios, once the model's FLOPs are measured)."""
    runtime = block.runtime
    scale = batch / kept
    bucket = FlopBucket(backward_exact=rerun.backward_exact * scale,
                        backward_nonzero=rerun.backward_nonzero * scale,
                        backward_done=rerun.backward_done + rerun.forward)
    other = runtime.tally.other
    ratios = other.blocks.get(block.name) if other is not None else None
    if ratios is not None:
        other_forward, other_backward = ratios
        bucket.recompute_other_exact = other_backward * bucket.backward_exact
        bucket.recompute_other_done = (other_forward * layer_flops / scale
                                       + other_backward * rerun.backward_exact)
    runtime.count_backward(bucket)


class _Verification:
    """One verifying use of a block: its recordings and detached inputs, compared in the backward."""

    def __init__(self, block: CompactBlock, inputs: tuple, spec: Any, replay: ForwardReplay,
                 hidden: torch.Tensor, layer_flops: float) -> None:
        self.block, self.inputs, self.spec, self.replay = block, inputs, spec, replay
        self.layer_flops = layer_flops  # the block's sampled layers' forward on the whole batch
        self.dtype = hidden.dtype
        device = hidden.device.type
        self.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def compare(self, grad: torch.Tensor) -> None:
        runtime = self.block.runtime
        if _flop_counter_active():  # it cannot follow re-runs in a backward: no evidence here
            self.block.record_verdict(None)
            return
        kept = nonzero_indices(per_sample_norms(grad), runtime)
        if kept is None or kept.numel() == 0 or not bool(torch.isfinite(grad).all()):
            self.block.record_verdict(None)
            return
        tensors = tuple(leaf for leaf in self.inputs if isinstance(leaf, torch.Tensor))
        params = tuple(p for p in self.block.module.parameters() if p.requires_grad)
        input_needs = tuple(t.is_floating_point() for t in tensors)
        param_needs = tuple(True for _ in params)
        flat = [_TENSOR if isinstance(leaf, torch.Tensor) else _rerun_leaf(leaf) for leaf in self.inputs]
        rerun = _Rerun(self.block, flat, self.spec, self.replay, tensors, params, self.autocast)
        # Exact weight gradients in both (no draws), counted as calibration work: what they ran
        # (two re-runs of the block alone), not the exact backward of a model they stand for.
        work = FlopTally(other=runtime.tally.other)
        with runtime.using(phase=CALIBRATION, sample_weights=False, record_samples=False,
                           record_row_scores=False, record_norms=False), runtime.counting_into(work):
            outcome = self._reruns(rerun, kept, grad, input_needs, param_needs)
        done = work.settle().calibration
        runtime.tally.bucket(CALIBRATION).add(FlopBucket(backward_done=done.backward_done + done.recompute_other_done))
        if isinstance(outcome, str):
            self.block.record_verdict(False, outcome)
            return
        full, compact = outcome
        agreed, detail = _agree(full[0] + full[1], compact[0] + compact[1], self.dtype)
        self.block.record_verdict(agreed, detail)

    def _reruns(self, rerun: _Rerun, kept: torch.Tensor, grad: torch.Tensor, input_needs: tuple,
                param_needs: tuple) -> tuple[Any, Any] | str:
        """The block's gradients re-run on the whole batch and on the kept samples, or why a
        re-run failed."""
        batch = grad.shape[0]
        try:
            full = rerun.backward(None, grad, batch, input_needs, param_needs, self.layer_flops, Layers.COMPUTE)
            # As the block's compact backward will: replaying its layers' outputs, or computing
            # them where checkpointing keeps none.
            layers = Layers.COMPUTE if checkpoints(self.block.module) else Layers.REPLAY
            compact = rerun.backward(kept, grad.index_select(0, kept), batch, input_needs, param_needs,
                                     self.layer_flops, layers)
        except _ReplayMismatch as error:
            return f"a re-run differs from the forward: {error}"
        except RuntimeError as error:  # the block cannot run on part of its batch
            return f"a re-run on part of the batch fails: {error}"
        return full, compact


class _VerifyFunction(torch.autograd.Function):
    """The identity on a verifying block's hidden state; its backward runs the comparison."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, check: _Verification) -> torch.Tensor:
        ctx.check = check
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        check, ctx.check = ctx.check, None
        if check is not None:
            check.compare(grad)
        return grad, None


def _agree(full: list, compact: list, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether every gradient of the compact re-run matches the full re-run's."""
    tolerance = _TOLERANCE.get(dtype, _LOW_PRECISION_TOLERANCE)
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        tolerance = _LOW_PRECISION_TOLERANCE
    scale = max((float(g.abs().max()) for g in full if g is not None and g.numel()), default=0.0)
    for position, (a, b) in enumerate(zip(full, compact)):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        error = float((a.float() - b.float()).norm())
        size = float(a.float().norm())
        if error > tolerance * size + 1e-6 * scale * a.numel() ** 0.5:
            return False, (f"gradient {position}: relative difference {error / max(size, 1e-30):.3g}; "
                           "the block mixes samples")
    return True, ""


def _rerun_leaf(leaf: Any) -> Any:
    return None if _is_kv_cache(leaf) else leaf


def _flop_counter_active() -> bool:
    """True under ``torch.utils.flop_counter.FlopCounterMode``: its module tracker cannot follow
    a forward re-run inside the backward, so blocks then take the full backward."""
    return any(isinstance(getattr(mode, "counter", mode), FlopCounterMode)
               for mode in _get_current_dispatch_mode_stack())


def _cuda_devices(flat: list) -> list[torch.device]:
    return list({leaf.device for leaf in flat if isinstance(leaf, torch.Tensor) and leaf.is_cuda})


def _select(leaf: Any, kept: torch.Tensor | None, batch: int) -> Any:
    if kept is None or not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != batch:
        return leaf
    return select_samples(leaf, kept)


def select_samples(value: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``value.index_select(0, kept)``, through a 2-D view when ``value`` is contiguous: one
    contiguous block per sample (several times faster on a CPU for 4-D boolean masks)."""
    if value.dim() <= 2 or not value.is_contiguous():
        return value.index_select(0, kept)
    return value.view(value.shape[0], -1).index_select(0, kept).view(kept.numel(), *value.shape[1:])


def _fill(flat: list, tensors: tuple[torch.Tensor, ...]) -> list:
    it = iter(tensors)
    return [next(it) if leaf is _TENSOR else leaf for leaf in flat]


def _input_grads(inputs: tuple, leaves: list, wanted: list[int], grads: tuple,
                 kept: torch.Tensor | None, batch: int) -> list[torch.Tensor | None]:
    """The gradient of each tensor input, scattered back to the whole batch."""
    by_leaf = dict(zip(wanted, grads))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    result = []
    for tensor, position in zip(inputs, positions):
        g = by_leaf.get(position)
        if g is not None and kept is not None and g.shape[0] != tensor.shape[0]:
            g = tensor.new_zeros(tensor.shape, dtype=g.dtype).index_copy_(0, kept, g)
        result.append(None if g is None else g.to(tensor.dtype))
    return result


def _param_grads(params: tuple, needs: tuple, grads: tuple) -> list[torch.Tensor | None]:
    it = iter(grads)
    return [next(it) if need else None for _, need in zip(params, needs)]
