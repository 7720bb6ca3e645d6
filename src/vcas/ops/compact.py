"""Compact recompute: a block with a low keep ratio backpropagates through its kept samples only.

When a block's activation keep ratio is low at the time its forward runs, most samples will
arrive in its backward with an exactly zero gradient, and every op of the block (attention
products, softmax, normalisation, activations, dropout) would still work on full-size tensors.
Such a block instead runs its forward without building a graph (so it saves no activations),
and in the backward re-runs its forward on the samples whose gradient is non-zero and
backpropagates through that compact graph. The gradient is the same as the full backward's:
dropout masks drawn in the forward are replayed for the kept samples, and the block must treat
samples independently (no BatchNorm in training mode), which is checked once per block by
comparing a compact re-run with the forward's own output.

The re-run forward is extra work (counted as backward FLOPs); it pays where the ratio is low.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from ..accounting import TRAIN
from ..outputs import find_hidden_state, iter_tensors, replace_tensor
from ..state import SamplingState
from .activation import nonzero_indices, per_sample_norms

logger = logging.getLogger("vcas")

# Random ops a re-run cannot replay: a block that calls them is never recomputed.
_UNREPLAYABLE = {torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint,
                 torch.randint_like, torch.bernoulli, torch.multinomial, torch.normal,
                 torch.randperm, torch.Tensor.bernoulli_, torch.Tensor.uniform_,
                 torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.exponential_,
                 F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                 F.feature_alpha_dropout, F.rrelu}
_TENSOR = object()  # stands for a tensor input in the re-run's copy of the arguments
_SAFE_LEAVES = (torch.Tensor, type(None), bool, int, float, str, torch.dtype, torch.device)


class ForwardReplay(TorchFunctionMode):
    """Records a block's forward (dropout masks, sampled-linear outputs) and replays it for any
    subset of the samples in a re-run. Flags the use of random ops it cannot replay.

    Replaying the outputs of the sampled layers (gathered for the kept samples) spares the
    re-run its matrix products and convolutions: only the cheap element-wise ops run again, and
    the layers' backward still gets the re-run inputs it needs for the weight gradient.

    The sampled layers find the replay in ``state.replay``; only dropout and random ops need the
    torch-function mode, whose Python call on every op of the block costs time. So a block seen
    to draw no random numbers runs without it (``active(intercept=False)``), and the global
    generators tell whether it drew some after all (:class:`_RngState`). Not caught: a block
    that starts drawing from a private ``torch.Generator`` only after its first forward.
    """

    def __init__(self, state: SamplingState) -> None:
        super().__init__()
        self.state = state
        self.masks: list[torch.Tensor] = []
        self.linear_outputs: list[torch.Tensor] = []
        self.unreplayable: str | None = None
        self.recording = True
        self._kept: torch.Tensor | None = None
        self._batch = 0
        self._positions = [0, 0]

    def replaying(self, kept: torch.Tensor | None, batch: int) -> "ForwardReplay":
        self.recording, self._kept, self._batch, self._positions = False, kept, batch, [0, 0]
        return self

    @contextlib.contextmanager
    def active(self, intercept: bool) -> Iterator["ForwardReplay"]:
        """The replay, reachable by the sampled layers; with the mode only if ``intercept``."""
        self.state.replay = self
        try:
            with self if intercept else contextlib.nullcontext():
                yield self
        finally:
            self.state.replay = None

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
        if self.recording:  # PyTorch's own dropout kernel, which returns its mask
            output, mask = torch.native_dropout(input, p, True)
            self.masks.append(mask)
            return input.copy_(output) if inplace else output
        scale = 0.0 if p == 1 else 1.0 / (1 - p)
        mask = self._next(self.masks, 0, input.shape, "dropout mask")
        return input * mask.to(input.dtype).mul_(scale)

    def record_output(self, output: torch.Tensor) -> None:
        """The output of a sampled layer (linear or convolution) in the forward."""
        self.linear_outputs.append(output)

    def replayed_output(self, batch: int, shape: torch.Size | None = None) -> torch.Tensor:
        """The next recorded layer output, for the kept samples; ``batch`` (and ``shape`` where
        known) is what the re-run expects."""
        value = self._next(self.linear_outputs, 1, shape, "layer output")
        if value.dim() == 0 or value.shape[0] != batch:
            raise _ReplayMismatch(f"layer output {tuple(value.shape)} for a batch of {batch}")
        return value

    def _next(self, recorded: list[torch.Tensor], slot: int, shape: torch.Size | None,
              what: str) -> torch.Tensor:
        position = self._positions[slot]
        if position >= len(recorded):
            raise _ReplayMismatch(f"the re-run needs more of {what} than the forward made")
        self._positions[slot] += 1
        value = recorded[position]
        if self._kept is not None and value.dim() > 0 and value.shape[0] == self._batch:
            value = value.index_select(0, self._kept)
        if shape is not None and value.shape != shape:
            raise _ReplayMismatch(f"{what} {tuple(value.shape)} where the re-run has {tuple(shape)}")
        return value


class _ReplayMismatch(RuntimeError):
    pass


class _RngState:
    """The global RNG state (CPU and the inputs' CUDA devices), to draw the same numbers again."""

    def __init__(self, flat: list) -> None:
        self.cpu = torch.get_rng_state()
        devices = {leaf.device for leaf in flat if isinstance(leaf, torch.Tensor) and leaf.is_cuda}
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devices}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)

    def advanced(self) -> bool:
        """Whether a generator has drawn numbers since."""
        return (not torch.equal(torch.get_rng_state(), self.cpu)
                or any(not torch.equal(torch.cuda.get_rng_state(d), state)
                       for d, state in self.cuda.items()))


class CompactBlock:
    """A block's ``forward`` that recomputes compactly when its keep ratio is low."""

    def __init__(self, index: int, name: str, module: nn.Module, state: SamplingState) -> None:
        self.index = index
        self.name = name
        self.module = module
        self.state = state
        self.original_forward: Callable[..., Any] = type(module).forward.__get__(module)
        # None until the first compact forward has been checked against the full one.
        self.verified: bool | None = None
        # Whether the forward must run under the torch-function mode: until it is seen to draw
        # no random numbers, and again once it has drawn some.
        self.intercept = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._wanted():
            return self.original_forward(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        if not all(isinstance(leaf, _SAFE_LEAVES) for leaf in flat):
            return self._refuse("its inputs hold objects other than tensors and numbers", args, kwargs)
        rng = _RngState(flat)
        replay, output = self._recorded_forward(args, kwargs, rng)
        hidden = find_hidden_state(output)
        reason = self._ineligible(output, hidden, flat, replay)
        if reason is None and self.verified is None:
            reason = self._verify(flat, spec, hidden, replay)
        if reason is not None:
            # Run the block as usual instead, drawing the same random numbers again.
            rng.restore()
            return self._refuse(reason, args, kwargs)
        self.verified = True
        self.intercept = bool(replay.masks)
        return self._attach_backward(output, hidden, flat, spec, replay)

    def _recorded_forward(self, args: tuple, kwargs: dict, rng: _RngState) -> tuple[ForwardReplay, Any]:
        """The graph-free forward, recorded; run again under the mode if it drew random numbers
        unseen (the same numbers: the generators are restored first)."""
        replay = ForwardReplay(self.state)
        with torch.no_grad(), replay.active(self.intercept):
            output = self.original_forward(*args, **kwargs)
        if self.intercept or not rng.advanced():
            return replay, output
        rng.restore()
        self.intercept = True
        return self._recorded_forward(args, kwargs, rng)

    def _wanted(self) -> bool:
        state = self.state
        ratio = state.act_ratios[self.index]
        return (state.enabled and torch.is_grad_enabled() and state.sample_acts
                and state.phase == TRAIN and state.recompute_scale is None
                and self.verified is not False and ratio <= state.recompute_below
                and not torch.compiler.is_compiling() and not _flop_counter_active())

    def _refuse(self, reason: str, args: tuple, kwargs: dict) -> Any:
        self.verified = False
        logger.warning("vcas: block %r is backpropagated in full, not recomputed compactly: %s",
                       self.name, reason)
        return self.original_forward(*args, **kwargs)

    def _ineligible(self, output: Any, hidden: torch.Tensor | None, flat: list,
                    replay: ForwardReplay) -> str | None:
        if hidden is None or hidden.dim() == 0:
            return "it returns no batch-first hidden state"
        if replay.unreplayable:
            return f"it draws random numbers with {replay.unreplayable}, which a re-run cannot replay"
        if any(isinstance(m, _BatchNorm) and m.training for m in self.module.modules()):
            return "it holds a BatchNorm in training mode, which mixes the samples"
        inputs = {id(leaf) for leaf in flat if isinstance(leaf, torch.Tensor)}
        for leaf in iter_tensors(output):
            if leaf is not hidden and id(leaf) not in inputs and leaf.is_floating_point():
                return "it returns a second floating-point tensor besides its hidden state"
        return None

    def _verify(self, flat: list, spec: Any, hidden: torch.Tensor, replay: ForwardReplay) -> str | None:
        """Re-run on every other sample and compare with the forward's output once."""
        batch = hidden.shape[0]
        kept = torch.arange(0, batch, 2, device=hidden.device)
        try:
            with torch.no_grad():
                rerun = self._rerun(flat, spec, kept, batch, replay)
        except _ReplayMismatch as error:
            return f"a compact re-run differs from the forward ({error})"
        expected = hidden.index_select(0, kept)
        if rerun is None or rerun.shape != expected.shape:
            return "a compact re-run returns a hidden state of another shape"
        tolerance = 1e-2 if hidden.dtype in (torch.float16, torch.bfloat16) else 1e-4
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if not torch.allclose(rerun.float(), expected.float(), rtol=tolerance, atol=tolerance * scale):
            return "a compact re-run on some samples differs from the forward on those samples"
        return None

    def _rerun(self, flat: list, spec: Any, kept: torch.Tensor | None, batch: int,
               replay: ForwardReplay) -> torch.Tensor | None:
        leaves = [_select(leaf, kept, batch) for leaf in flat]
        args, kwargs = tree_unflatten(leaves, spec)
        with replay.replaying(kept, batch).active(bool(replay.masks)):
            output = self.original_forward(*args, **kwargs)
        return find_hidden_state(output)

    def _attach_backward(self, output: Any, hidden: torch.Tensor, flat: list, spec: Any,
                         replay: ForwardReplay) -> Any:
        tensors = [leaf for leaf in flat if isinstance(leaf, torch.Tensor)]
        params = [p for p in self.module.parameters() if p.requires_grad]
        device = hidden.device.type
        context = _RerunContext(self, flat, spec, replay, hidden,
                                torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        new_hidden = _CompactFunction.apply(context, *tensors, *params)
        return replace_tensor(output, hidden, new_hidden)


class _RerunContext:
    """What the backward needs to re-run one block's forward on the kept samples."""

    def __init__(self, block: CompactBlock, flat: list, spec: Any, replay: ForwardReplay,
                 hidden: torch.Tensor, autocast: bool, autocast_dtype: torch.dtype) -> None:
        self.block, self.spec, self.replay = block, spec, replay
        # Tensors are passed to the autograd function (and saved there); here only placeholders.
        self.flat = [_TENSOR if isinstance(leaf, torch.Tensor) else leaf for leaf in flat]
        self.hidden: torch.Tensor | None = hidden
        self.autocast, self.autocast_dtype = autocast, autocast_dtype
        self.n_tensors = sum(isinstance(leaf, torch.Tensor) for leaf in flat)


class _CompactFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, context: _RerunContext, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.context = context
        replay = context.replay
        ctx.n_recorded = len(replay.masks) + len(replay.linear_outputs)
        # Saved here, the recordings are freed with the graph and seen by saved-tensor hooks.
        ctx.save_for_backward(*tensors, *replay.masks, *replay.linear_outputs)
        ctx.n_masks = len(replay.masks)
        replay.masks, replay.linear_outputs = [], []
        hidden, context.hidden = context.hidden, None  # no reference cycle through the output
        return hidden

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        context: _RerunContext = ctx.context
        saved = ctx.saved_tensors
        n_inputs, n_params = context.n_tensors, len(saved) - context.n_tensors - ctx.n_recorded
        inputs, params = saved[:n_inputs], saved[n_inputs:n_inputs + n_params]
        recorded = saved[n_inputs + n_params:]
        needs = ctx.needs_input_grad[1:]
        input_needs, param_needs = needs[:n_inputs], needs[n_inputs:n_inputs + n_params]
        # Decided from the gradient that arrives (already sampled at the block output).
        kept = nonzero_indices(per_sample_norms(grad), context.block.state)
        if kept is not None and kept.numel() == 0:
            # Zeros, not None: DistributedDataParallel expects a gradient for every parameter.
            zeros = [torch.zeros_like(t) if need else None
                     for t, need in zip(inputs + params, input_needs + param_needs)]
            return (None, *zeros, *(None for _ in recorded))
        grad_kept = grad if kept is None else grad.index_select(0, kept)
        replay = context.replay
        replay.masks, replay.linear_outputs = list(recorded[:ctx.n_masks]), list(recorded[ctx.n_masks:])
        try:
            input_grads, param_grads = _rerun_backward(context, inputs, input_needs, params,
                                                       param_needs, kept, grad_kept, grad.shape[0])
        finally:
            replay.masks, replay.linear_outputs = [], []
        return (None, *input_grads, *param_grads, *(None for _ in recorded))


def _rerun_backward(context: _RerunContext, inputs: tuple, input_needs: tuple, params: tuple,
                    param_needs: tuple, kept: torch.Tensor | None, grad_kept: torch.Tensor,
                    batch: int) -> tuple[list, list]:
    """Re-run the block's forward on the kept samples and backpropagate ``grad_kept`` through it."""
    leaves = _fill(context.flat, inputs)
    compact = [_select(leaf, kept, batch) for leaf in leaves]
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    wanted = [i for i, need in zip(positions, input_needs) if need and leaves[i].is_floating_point()]
    for i in wanted:
        compact[i] = compact[i].detach().requires_grad_()
    if _flop_counter_active():
        raise RuntimeError(
            f"vcas: block {context.block.name!r} recomputes compactly in this backward, which "
            "torch.utils.flop_counter.FlopCounterMode cannot follow; enter FlopCounterMode before "
            "the forward as well (blocks then backpropagate in full), or set "
            "VCASConfig(recompute_below=0)")
    state = context.block.state
    state.recompute_scale = batch / (batch if kept is None else kept.numel())
    try:
        with torch.enable_grad(), torch.autocast(grad_kept.device.type, dtype=context.autocast_dtype,
                                                 enabled=context.autocast):
            args, kwargs = tree_unflatten(compact, context.spec)
            with context.replay.replaying(kept, batch).active(bool(context.replay.masks)):
                hidden = find_hidden_state(context.block.original_forward(*args, **kwargs))
            targets = [compact[i] for i in wanted] + [p for p, need in zip(params, param_needs) if need]
            grads = torch.autograd.grad(hidden, targets, grad_kept.to(hidden.dtype), allow_unused=True)
    finally:
        state.recompute_scale = None
    return (_input_grads(inputs, leaves, wanted, grads, kept, batch),
            _param_grads(params, param_needs, grads[len(wanted):]))


def _flop_counter_active() -> bool:
    """True under ``torch.utils.flop_counter.FlopCounterMode``: its module tracker cannot follow
    a forward re-run inside the backward, so blocks then take the full backward."""
    return any(isinstance(getattr(mode, "counter", mode), FlopCounterMode)
               for mode in _get_current_dispatch_mode_stack())


def _select(leaf: Any, kept: torch.Tensor | None, batch: int) -> Any:
    if kept is None or not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != batch:
        return leaf
    return leaf.index_select(0, kept)


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
