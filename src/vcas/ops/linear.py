"""SampleW: the sampled linear backward (METHOD.md section 4).

The input gradient is computed only for rows whose incoming gradient is non-zero (decided from
the gradient that arrives, never assumed); the weight gradient is leverage-score sampled over the
non-zero rows when the layer's keep ratio is below 1. The bias gradient stays exact.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..accounting import FlopBucket
from ..sampling import bernoulli_weights, capped_proportional_probs, sampling_variance
from ..state import SamplingState
from .autocast import autocast_inputs


class LinearSite:
    """A linear layer whose backward is sampled; installed as the module's ``forward``.

    ``transposed`` marks layers that store the weight as (in, out), like transformers' Conv1D.
    """

    def __init__(self, index: int, name: str, module: torch.nn.Module, state: SamplingState,
                 transposed: bool = False) -> None:
        self.index = index
        self.name = name
        self.module = module
        self.state = state
        self.transposed = transposed
        self.original_forward: Callable[..., torch.Tensor] = type(module).forward.__get__(module)
        # The autograd function of the sampled op; the benchmark swaps in its naive variant.
        self.function: type[torch.autograd.Function] = _SampledLinearFunction
        self.recorded_variance: list[float] = []
        self.recorded_scores: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.state.enabled and torch.is_grad_enabled()):
            if self.state.enabled and self.state.compact_forward:
                rows = x.numel() // x.shape[-1] if x.dim() else 1
                self.state.count_forward(2.0 * rows * self.module.weight.numel())
            return self.original_forward(x)
        weight = self.module.weight
        if self.transposed:
            weight = weight.t()
        return sampled_linear(x, weight, self.module.bias, self)


def sampled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   site: LinearSite) -> torch.Tensor:
    """``F.linear`` whose backward skips zero rows and samples the weight-gradient rows."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return site.function.apply(x, weight, bias, site)


class _SampledLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                site: LinearSite) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.site = site
        ctx.has_bias = bias is not None
        rows = x.numel() // x.shape[-1] if x.dim() else 1
        site.state.count_forward(2.0 * rows * weight.numel())
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        site: LinearSite = ctx.site
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        flops = FlopBucket()
        per_row = 2.0 * weight.numel()
        flops.backward_exact = per_row * gy.shape[0] * (int(need_x) + int(need_w))

        row_norms = torch.linalg.vector_norm(gy, dim=1, dtype=torch.float32)
        if not bool(torch.isfinite(row_norms).all()):
            site.state.nonfinite_gradients += 1
            rows = None  # non-finite: fall back to the exact backward
        else:
            nonzero = row_norms > 0
            rows = None if bool(nonzero.all()) else torch.nonzero(nonzero).squeeze(1)
        n_rows = gy.shape[0] if rows is None else rows.numel()

        grad_x = None
        if need_x:
            grad_x = _input_grad(gy, weight, rows).reshape(x.shape)
            flops.backward_done += per_row * n_rows
        grad_w = None
        if need_w:
            grad_w, n_kept = _weight_grad(gy, xs, row_norms, rows, site)
            flops.backward_done += per_row * n_kept
        grad_b = gy.sum(0) if (need_b and ctx.has_bias) else None
        site.state.count_backward(flops)
        return grad_x, grad_w, grad_b, None


def _input_grad(gy: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    if rows is None:
        return gy @ weight
    grad = gy.new_zeros(gy.shape[0], weight.shape[1])
    return grad.index_copy_(0, rows, gy.index_select(0, rows) @ weight)


def _weight_grad(gy: torch.Tensor, xs: torch.Tensor, row_norms: torch.Tensor,
                 rows: torch.Tensor | None, site: LinearSite) -> tuple[torch.Tensor, int]:
    """dW from the non-zero rows, leverage-score sampled when the layer's ratio is below 1."""
    if rows is not None:
        gy, xs, row_norms = gy.index_select(0, rows), xs.index_select(0, rows), row_norms[rows]
    state = site.state
    ratio = state.weight_ratios[site.index]
    sample = state.sample_weights and ratio < 1.0 and gy.shape[0] > 0
    if not (sample or state.record_weight_variance) or gy.shape[0] == 0:
        return gy.t() @ xs, gy.shape[0]
    scores = row_norms * torch.linalg.vector_norm(xs, dim=1, dtype=torch.float32)
    probs = capped_proportional_probs(scores, ratio * gy.shape[0])
    if state.record_weight_variance:
        site.recorded_variance.append(float(sampling_variance(probs, scores)))
        site.recorded_scores.append(scores.detach().cpu())
    if not sample:
        return gy.t() @ xs, gy.shape[0]
    weights = bernoulli_weights(probs, state.generator(gy.device))
    kept = torch.nonzero(weights).squeeze(1)
    scaled = gy.index_select(0, kept) * weights[kept].to(gy.dtype).unsqueeze(1)
    return scaled.t() @ xs.index_select(0, kept), kept.numel()
