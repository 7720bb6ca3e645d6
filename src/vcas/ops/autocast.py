"""Autocast for the sampled ops: cast the inputs as the op autocast replaces would, once."""

from __future__ import annotations

import torch


def autocast_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cast ``x``, ``weight`` and ``bias`` to the autocast dtype of ``x``'s device, if enabled.

    The sampled autograd functions then run with autocast off, so forward and backward compute in
    the same dtype as ``F.linear`` / ``F.conv*d`` would under autocast.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype), (bias.to(dtype) if bias is not None else None)
