"""Convolutions whose backward skips the samples with a zero incoming gradient.

After activation sampling the dropped samples carry exactly zero gradient, so a convolution can
compute its input and weight gradients from the other samples alone and give the same result.
Which samples to skip is read from the gradient that arrives, never assumed: after a BatchNorm in
training mode the dropped samples have non-zero gradients again and nothing is skipped
. Weight-gradient sampling (SampleW) is defined for linear layers only.

Plain ``nn.Conv1d/2d/3d`` call the sampled op directly. Subclasses with their own forward
(TensorFlow-style "same" padding in EfficientNet, weight standardisation) run their forward with
their ``F.conv*d`` calls routed to the sampled op; the result is exact given the arriving
gradient, whatever the subclass does around the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..accounting import FlopBucket
from ..runtime.mode import CALIBRATION
from ..runtime.runtime import Runtime
from .activation import nonzero_indices, per_sample_norms
from .autocast import autocast_inputs
from .records import FlatProbe

_PLAIN = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


class ConvKind:
    """The registry entry of ``nn.Conv1d/2d/3d`` and their subclasses."""

    kind = "conv"

    def weight_of(self, module: nn.Module) -> torch.Tensor:
        return cast(torch.Tensor, module.weight)

    def build(self, name: str, module: nn.Module, runtime: Runtime, *, weight_sampled: bool,
              block: str | None = None) -> ConvSite:
        return ConvSite(name, module, runtime, block)


class ConvSite:
    """A convolution whose backward skips zero-gradient samples; installed as the module's ``forward``."""

    kind = "conv"

    def __init__(self, name: str, module: nn.Module, runtime: Runtime, block: str | None = None) -> None:
        self.name = name
        self.module = module
        self.runtime = runtime
        self.block = block
        self.original_forward: Callable[..., torch.Tensor] = type(module).forward.__get__(module)
        self.direct = type(module) in _PLAIN and module.padding_mode == "zeros"
        self.weight_sampled = False

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.module.weight)

    def records_samples(self) -> bool:
        return self.runtime.mode.record_samples and self.name in self.runtime.recorder.probes

    def record_samples(self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       geometry: tuple, per_sample_flops: float) -> None:
        """Record this pass's per-sample weight-gradient entries on the probe (exact passes
        only), one sample at a time: one extra weight-gradient product, on calibration steps."""
        probe = cast(FlatProbe, self.runtime.recorder.probes[self.name])  # convolutions get entries
        subset = probe.index.to(weight.device)
        mask = (False, True, False)
        # The weight gradient is requested by the mask: never None.
        contributions = torch.stack([
            cast(torch.Tensor, _convolution_backward(grad_out[i:i + 1], x[i:i + 1], weight, geometry, mask)[1])
            .reshape(-1).index_select(0, subset).float() for i in range(x.shape[0])])
        self.runtime.recorder.layer_samples(self.name, contributions)
        extra = FlopBucket(backward_done=per_sample_flops * grad_out.shape[0])
        self.runtime.tally.bucket(CALIBRATION).add(extra)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # A compact block's graph-free forward and its re-run go through the sampled op too,
        # which records the output and replays it (vcas.ops.recompute).
        replaying = self.runtime.replay is not None
        if not (self.runtime.mode.enabled and (torch.is_grad_enabled() or replaying)):
            return self.original_forward(*args, **kwargs)
        if self.direct:
            m = cast("nn.Conv1d | nn.Conv2d | nn.Conv3d", self.module)
            x = args[0] if args else kwargs["input"]
            return sampled_conv(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups,
                                site=self)
        with _RouteConvCalls(self):
            return self.original_forward(*args, **kwargs)


class _RouteConvCalls(TorchFunctionMode):
    """Sends the ``F.conv1d/2d/3d`` calls made inside one module's forward to the sampled op."""

    def __init__(self, site: ConvSite) -> None:
        super().__init__()
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV_FUNCTIONS:
            bound = dict(zip(_ARGUMENTS, args), **kwargs)
            return sampled_conv(site=self.site, **bound)
        return func(*args, **kwargs)


def sampled_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 stride: int | Sequence[int] = 1, padding: str | int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, *,
                 site: ConvSite) -> torch.Tensor:
    """``F.conv{1,2,3}d`` whose backward computes only the samples with a non-zero gradient."""
    dims = weight.dim() - 2
    if input.dim() != weight.dim():  # an unbatched input: there are no samples to skip
        return _CONV_FUNCTIONS[dims - 1](input, weight, bias, stride, padding, dilation, groups)
    stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
    input, padding = _explicit_padding(input, weight, padding, dilation)
    input, weight, bias = autocast_inputs(input, weight, bias)
    geometry = (stride, padding, dilation, groups)

    replay = site.runtime.replay

    def graph(recorded: torch.Tensor | None = None) -> torch.Tensor:
        # In a compact re-run every sample is a kept one: the sync-free path reserves room for all.
        every_sample_kept = site.runtime.in_compact_rerun
        with torch.autocast(input.device.type, enabled=False):
            return _SampledConvFunction.apply(input, weight, bias, geometry, site, recorded, every_sample_kept)

    if replay is None:
        return graph()

    def compute() -> torch.Tensor:
        return _convolution(input, weight, bias, geometry)

    def flops(out: torch.Tensor) -> float:
        return conv_flops(out.shape[1:], weight) * out.shape[0]

    # A compact block records the output in its forward and replays it in its re-run.
    return replay.layer_output(compute, flops, input.shape[0], None, graph)  # type: ignore[attr-defined]


def _convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 geometry: tuple) -> torch.Tensor:
    stride, padding, dilation, groups = geometry
    return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)


def conv_flops(output_shape: Sequence[int], weight: torch.Tensor) -> float:
    """Forward FLOPs of a convolution: 2 per multiply-add, ``C_in / groups`` inputs per output.

    One backward product (input or weight gradient) costs the same. ``torch.utils.flop_counter``
    agrees for ``groups=1`` and counts the weight gradient ``groups`` times too high otherwise.
    """
    return 2.0 * math.prod(output_shape) * weight[0].numel()


class _SampledConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                geometry: tuple, site: ConvSite, recorded: torch.Tensor | None,
                every_sample_kept: bool) -> torch.Tensor:
        out = _convolution(x, weight, bias, geometry) if recorded is None else recorded
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.site, ctx.has_bias = geometry, site, bias is not None
        ctx.every_sample_kept = every_sample_kept
        ctx.per_sample = conv_flops(out.shape[1:], weight)
        if recorded is None:
            site.runtime.count_forward(ctx.per_sample * out.shape[0])
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        site: ConvSite = ctx.site
        factor = None
        rows: torch.Tensor | None
        if site.runtime.syncless(grad_out.device):  # room reserved for the kept samples
            room = site.runtime.reserved_samples(site.block, grad_out.shape[0], ctx.every_sample_kept)
            rows, factor = site.runtime.draws.select(per_sample_norms(grad_out) != 0, room)
        else:
            rows = nonzero_indices(per_sample_norms(grad_out), site.runtime)
        n_rows = grad_out.shape[0] if rows is None else rows.numel()
        grad_x = grad_w = grad_b = None
        if n_rows > 0 and (need_x or need_w or need_b):
            gy = grad_out if rows is None else grad_out.index_select(0, rows)
            if factor is not None:
                gy = gy * factor.to(gy.dtype)
            xs = x if rows is None else x.index_select(0, rows)
            grad_x, grad_w, grad_b = _convolution_backward(gy, xs, weight, ctx.geometry,
                                                           (need_x, need_w, need_b))
        if need_x:
            grad_x = _scatter_rows(grad_x, rows, x)
        if need_w and grad_w is None:
            grad_w = torch.zeros_like(weight)
        if need_b and grad_b is None:
            grad_b = grad_out.new_zeros(grad_out.shape[1])
        products = int(need_x) + int(need_w)
        exact = ctx.per_sample * grad_out.shape[0] * products
        # Without sampling every sample reaches a convolution (a sample whose gradient is zero
        # here was dropped above): the zero-row reference is the exact backward.
        flops = FlopBucket(backward_exact=exact, backward_nonzero=exact,
                           backward_done=ctx.per_sample * n_rows * products)
        site.runtime.count_backward(flops)
        if need_w and site.records_samples():
            site.record_samples(grad_out, x, weight, ctx.geometry, ctx.per_sample)
        return grad_x, grad_w, grad_b, None, None, None, None


def _convolution_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geometry: tuple,
                          mask: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution_backward(
        gy, x, weight, [weight.shape[0]] if mask[2] else None, stride, padding, dilation, False,
        [0] * len(stride), groups, list(mask))


def _scatter_rows(grad: torch.Tensor | None, rows: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if grad is None:
        return torch.zeros_like(x)
    if rows is None:
        return grad
    return torch.zeros_like(x).index_copy_(0, rows, grad)


def _tuple(value: int | Sequence[int], dims: int) -> list[int]:
    return [int(value)] * dims if isinstance(value, int) else [int(v) for v in value]


def _explicit_padding(x: torch.Tensor, weight: torch.Tensor, padding: str | int | Sequence[int],
                      dilation: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Integer padding for ``convolution_backward``; "same" with an odd total pads ``x`` first."""
    dims = weight.dim() - 2
    if padding == "valid":
        return x, [0] * dims
    if padding != "same":
        return x, _tuple(cast("int | Sequence[int]", padding), dims)
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if all(total % 2 == 0 for total in totals):
        return x, [total // 2 for total in totals]
    pad: list[int] = []
    for total in reversed(totals):  # F.pad takes the last dimension first
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad), [0] * dims
