"""Installing the sampled backward into a user's model, and removing it without a trace.

Nothing the user owns is replaced: parameters, buffers, module classes and state_dict keys stay
the same. A sampled layer (and a block that may recompute compactly) gets an instance-level
``forward`` (deleted again on removal); a block gets forward hooks and the model a pair of hooks
that record the batch size of its inputs (all removed on removal). A PEFT tuner gets
instance-level ``merge_and_unload`` / ``unload`` that refuse until removal
(:mod:`vcas.install.peft`).

Everything installed refuses to be pickled or deep-copied, so ``torch.save(model)`` and
``copy.deepcopy(model)`` of an attached model fail with a message that names ``detach()``
instead of copying hooks that would share one controller's live state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import AttachError
from ..ops.activation import BlockSampler
from ..ops.recompute import CompactBlock
from ..plan.discovery import Plan
from ..plan.outputs import check_batch_first, find_hidden_state, input_batch_sizes
from ..runtime.runtime import Runtime
from .peft import refusal, unloading_methods
from .registry import Site

# Training forwards without a controller step after which vcas says what to call.
STEPLESS_FORWARDS = 256

_COPY_MESSAGE = (
    "this model has vcas attached: its hooks hold the controller's live state, which cannot be "
    "{action}. Save model.state_dict() instead (its keys are unchanged by vcas), or call "
    "controller.detach() first and attach the model again afterwards")


class _Installed:
    """A callable vcas put into a module (a forward or a hook); refuses copies."""

    def __init__(self, target: Callable[..., Any]) -> None:
        self.target = target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise AttachError(_COPY_MESSAGE.format(action="pickled (torch.save(model), pickle)"))

    def __deepcopy__(self, memo: dict) -> Any:
        raise AttachError(_COPY_MESSAGE.format(action="deep-copied (copy.deepcopy(model))"))


def is_attached(model: nn.Module) -> bool:
    """True if some module of ``model`` already carries a vcas forward."""
    return any(isinstance(module.__dict__.get("forward"), _Installed) for module in model.modules())


class Installation:
    """The samplers, sites and compact blocks of one model, built from its plan.

    Building touches nothing; :meth:`install` puts everything into the model, :meth:`remove`
    takes it out again.

    Args:
        model: the model the plan was made for.
        plan: what to install.
        runtime: the controller's runtime, shared by everything installed.
        min_weight_numel: linears with fewer weight entries keep an exact weight gradient.
        check_batch_first: check during each forward that every block's hidden state is batch-first.
    """

    def __init__(self, model: nn.Module, plan: Plan, runtime: Runtime, *, min_weight_numel: int = 0,
                 check_batch_first: bool = True) -> None:
        self.model = model
        self.plan = plan
        self.runtime = runtime
        self.check_batch_first = check_batch_first
        self.samplers = {name: BlockSampler(name, runtime, above=plan.above[name]) for name, _ in plan.blocks}
        self.sites: dict[str, Site] = {
            site.name: site.kind.build(site.name, site.module, runtime, block=site.block,
                                       weight_sampled=site.trainable and site.weight.numel() >= min_weight_numel)
            for site in plan.sites}
        # Blocks whose forward another library already replaced keep it (and the full backward),
        # as do blocks that are a sampled layer themselves.
        site_modules = {id(site.module) for site in plan.sites}
        self.compact_blocks = {name: CompactBlock(name, module, runtime) for name, module in plan.blocks
                               if runtime.recompute_below > 0 and "forward" not in module.__dict__
                               and id(module) not in site_modules}
        self._handles: list[RemovableHandle] = []
        self._forwards: list[tuple[nn.Module, _Installed]] = []
        self._guards: list[tuple[nn.Module, str, _Installed]] = []
        self.installed = False

    def install(self) -> None:
        if is_attached(self.model):
            raise AttachError("this model already has vcas attached; call detach() on its controller first")
        runtime, model = self.runtime, self.model
        guard = BatchGuard(runtime)
        hooks: list[RemovableHandle] = []
        if self.check_batch_first:
            hooks += [model.register_forward_pre_hook(_Installed(guard.enter), with_kwargs=True),
                      model.register_forward_hook(_Installed(guard.exit), always_call=True)]
        # The shared input norms of the linears hold their last input only within a forward.
        hooks.append(model.register_forward_hook(_Installed(self._model_forward_ends), always_call=True))
        for name, module in self.plan.blocks:
            if self.check_batch_first:
                hooks.append(module.register_forward_hook(_Installed(guard.checker(name))))
            hooks.append(module.register_forward_hook(_Installed(self.samplers[name].forward_hook)))
        self._handles = hooks
        for target in list(self.sites.values()) + list(self.compact_blocks.values()):
            forward = _Installed(target)
            target.module.forward = forward
            self._forwards.append((target.module, forward))
        # PEFT's unloading would carry the sampled forwards into the model it returns (vcas.install.peft).
        for module, method in unloading_methods(model):
            stand_in = _Installed(refusal(method))
            setattr(module, method, stand_in)
            self._guards.append((module, method, stand_in))
        self.installed = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, forward in self._forwards:
            if module.__dict__.get("forward") is forward:
                del module.forward
        self._forwards = []
        for module, method, guard in self._guards:
            if module.__dict__.get(method) is guard:
                delattr(module, method)
        self._guards = []
        self.installed = False

    def _model_forward_ends(self, module: nn.Module, args: tuple, output: Any) -> None:
        runtime = self.runtime
        runtime.forget_inputs()
        if runtime.mode.enabled and torch.is_grad_enabled():
            runtime.forwards_since_step += 1
            if runtime.forwards_since_step == STEPLESS_FORWARDS:
                message = (f"vcas: {STEPLESS_FORWARDS} training forwards without a controller step: "
                           "call controller.maybe_calibrate() after every optimizer.step(), or "
                           "attach with optimizer=... so that vcas counts steps itself; until then "
                           "the keep ratios never adapt")
                warnings.warn(message, stacklevel=2)


class BatchGuard:
    """Checks, while the model's forward runs, that every block output is batch-first.

    The batch sizes are those of the model's tensor inputs; blocks called outside a model
    forward are not checked (there is nothing to compare with).
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._sizes: list[set[int]] = []  # a stack: a model may call itself

    def enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._sizes.append(input_batch_sizes(args, kwargs))

    def exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._sizes:
            self._sizes.pop()

    def checker(self, block_name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def check(module: nn.Module, args: tuple, output: Any) -> None:
            if not (self._sizes and self._sizes[-1] and self.runtime.mode.enabled and torch.is_grad_enabled()):
                return
            hidden = find_hidden_state(output)
            if hidden is not None and hidden.requires_grad:
                check_batch_first(hidden, self._sizes[-1], block_name)
        return check
