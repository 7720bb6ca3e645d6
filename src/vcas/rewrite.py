"""Installing the sampled backward into a user's model, and removing it without a trace.

Nothing the user owns is replaced: parameters, buffers, module classes and state_dict keys stay
the same. A linear layer or convolution gets an instance-level ``forward`` (deleted again on
removal); a block gets forward hooks and the model a pair of hooks that record the batch size of
its inputs (all removed on removal).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .discovery import Plan
from .errors import AttachError
from .ops import BlockSampler, LinearSite
from .ops.compact import CompactBlock
from .ops.conv import ConvSite
from .outputs import check_batch_first, find_hidden_state, input_batch_sizes
from .state import SamplingState


def is_attached(model: nn.Module) -> bool:
    """True if some module of ``model`` already carries a vcas sampled forward."""
    return any(isinstance(module.__dict__.get("forward"), (LinearSite, ConvSite, CompactBlock))
               for module in model.modules())


class Installation:
    """The hooks and forwards installed in one model; ``remove()`` undoes all of them."""

    def __init__(self, model: nn.Module, plan: Plan, state: SamplingState, *,
                 check_batch_first: bool = True) -> None:
        if is_attached(model):
            raise AttachError(
                "this model already has vcas attached; call detach() on its controller first")
        self.block_samplers = [BlockSampler(i, name, state, above=above)
                               for i, ((name, _), above) in enumerate(zip(plan.blocks, plan.above))]
        self.linear_sites = [LinearSite(i, name, module, state, transposed)
                             for i, (name, module, transposed) in enumerate(plan.linears)]
        self.conv_sites = [ConvSite(i, name, module, state)
                           for i, (name, module) in enumerate(plan.convs)]
        # Blocks whose forward another library already replaced keep it (and the full backward).
        self.compact_blocks = [CompactBlock(i, name, module, state)
                               for i, (name, module) in enumerate(plan.blocks)
                               if state.recompute_below > 0 and "forward" not in module.__dict__]
        self._handles: list[RemovableHandle] = []
        guard = BatchGuard(state)
        if check_batch_first:
            self._handles += [model.register_forward_pre_hook(guard.enter, with_kwargs=True),
                              model.register_forward_hook(guard.exit, always_call=True)]
        # The shared input norms of the linears hold their last input only within a forward.
        self._handles.append(model.register_forward_hook(
            lambda module, args, output: state.forget_inputs(), always_call=True))
        for sampler, (name, module) in zip(self.block_samplers, plan.blocks):
            if check_batch_first:
                self._handles.append(module.register_forward_hook(guard.checker(name)))
            self._handles.append(module.register_forward_hook(sampler.forward_hook))
        for site in self.linear_sites + self.conv_sites + self.compact_blocks:
            site.module.forward = site

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for site in self.linear_sites + self.conv_sites + self.compact_blocks:
            if site.module.__dict__.get("forward") is site:
                del site.module.forward


class BatchGuard:
    """Checks, while the model's forward runs, that every block output is batch-first.

    The batch sizes are those of the model's tensor inputs; blocks called outside a model
    forward are not checked (there is nothing to compare with).
    """

    def __init__(self, state: SamplingState) -> None:
        self.state = state
        self._sizes: list[set[int]] = []  # a stack: a model may call itself

    def enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._sizes.append(input_batch_sizes(args, kwargs))

    def exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._sizes:
            self._sizes.pop()

    def checker(self, block_name: str):
        def check(module: nn.Module, args: tuple, output: Any) -> None:
            if not (self._sizes and self._sizes[-1] and self.state.enabled and torch.is_grad_enabled()):
                return
            hidden = find_hidden_state(output)
            if hidden is not None and hidden.requires_grad:
                check_batch_first(hidden, self._sizes[-1], block_name)
        return check
