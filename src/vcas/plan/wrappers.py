"""The wrappers around a user's model: what vcas looks through, and what it refuses.

vcas attaches to the user's module inside DistributedDataParallel and ``torch.compile``
wrappers, so block names, ``state_dict`` keys and checkpoints are the same with and without them.
FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters in place and keeps the module
itself: vcas attaches to it as to any module. ``nn.DataParallel``, FSDP1
(``FullyShardedDataParallel``) and DeepSpeed are refused, with the reason.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from ..errors import AttachError

_FSDP1 = ("FullyShardedDataParallel",)
_DATA_PARALLEL_MESSAGE = (
    "nn.DataParallel copies the module onto each GPU on every forward, which vcas cannot follow; "
    "use DistributedDataParallel (torchrun, accelerate launch) instead")


def fsdp1_message(where: str) -> str:
    return (f"{where} uses FSDP1 (FullyShardedDataParallel), which flattens the parameters that "
            "vcas's sampled layers read; vcas supports FSDP2 instead: shard with "
            "torch.distributed.fsdp.fully_shard (Lightning: ModelParallelStrategy; the Trainer / "
            "accelerate: fsdp_version=2), or use DistributedDataParallel")


def deepspeed_message(where: str) -> str:
    return (f"{where} uses DeepSpeed, whose engine partitions and replaces the parameters and runs "
            "its own backward; vcas does not support it. Use DistributedDataParallel or FSDP2 "
            "(torch.distributed.fsdp.fully_shard)")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel and ``torch.compile`` wrappers.

    Raises:
        AttachError: the model is wrapped in ``nn.DataParallel``, FSDP1 or DeepSpeed, or holds
            FSDP1-wrapped or DeepSpeed-partitioned submodules.
    """
    while True:
        if isinstance(model, nn.DataParallel):
            raise AttachError(_DATA_PARALLEL_MESSAGE)
        check_not_sharded_unsupported(model, "the model")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = cast(nn.Module, model.module)
        elif is_compiled(model):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def check_not_sharded_unsupported(model: nn.Module, where: str) -> None:
    """Refuse FSDP1 and DeepSpeed wherever they appear in ``model``."""
    for name, module in model.named_modules():
        cls = type(module)
        label = f"{where} ({name})" if name else where
        if cls.__name__ in _FSDP1 or any(base.__name__ in _FSDP1 for base in cls.__mro__):
            raise AttachError(fsdp1_message(label))
        if cls.__module__.startswith("deepspeed"):
            raise AttachError(deepspeed_message(label))
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            raise AttachError(deepspeed_message(f"{where} (parameter {name}, ZeRO-3 partitioned)"))


def ddp_wrapper(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The outermost DistributedDataParallel in ``model``'s wrappers, or ``None``."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        if not is_compiled(model):
            return None
        model = cast(nn.Module, model._orig_mod)


def is_compiled(model: nn.Module) -> bool:
    return type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module)


def is_fsdp2(model: nn.Module) -> bool:
    """Whether some module of ``model`` was sharded with FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())
