"""Installing the sampled backward into a user's model, and removing it without a trace.

Nothing the user owns is replaced: parameters, buffers, module classes and state_dict keys stay
the same. A linear layer gets an instance-level ``forward`` (deleted again on removal) and a block
gets one forward hook (removed on removal).
"""

from __future__ import annotations

from torch import nn

from .errors import AttachError
from .ops import BlockSampler, LinearSite
from .state import SamplingState


def is_attached(model: nn.Module) -> bool:
    """True if some module of ``model`` already carries a vcas sampled forward."""
    return any(isinstance(module.__dict__.get("forward"), LinearSite) for module in model.modules())


class Installation:
    """The hooks and forwards installed in one model; ``remove()`` undoes all of them."""

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]],
                 linears: list[tuple[str, nn.Module, bool]], state: SamplingState) -> None:
        if is_attached(model):
            raise AttachError(
                "this model already has vcas attached; call detach() on its controller first")
        overridden = [name for name, module, _ in linears if "forward" in module.__dict__]
        if overridden:
            raise AttachError(
                f"linear layers {overridden} already have an instance-level forward (another "
                "library patched them); vcas cannot sample them. Exclude those blocks.")
        self.block_samplers = [BlockSampler(i, name, state) for i, (name, _) in enumerate(blocks)]
        self.linear_sites = [LinearSite(i, name, module, state, transposed)
                             for i, (name, module, transposed) in enumerate(linears)]
        self._handles = [module.register_forward_hook(sampler.forward_hook)
                         for sampler, (_, module) in zip(self.block_samplers, blocks)]
        for site in self.linear_sites:
            site.module.forward = site

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for site in self.linear_sites:
            if site.module.__dict__.get("forward") is site:
                del site.module.forward
