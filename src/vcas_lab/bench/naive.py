"""The naive sampled linear backward, the benchmark's comparison point, as a registered site kind.

It is the straightforward implementation of sampled backpropagation for a linear layer: a
zero-filled full-size input gradient with the kept rows scattered into it, the non-zero rows of
the output gradient and the input re-gathered for the weight gradient, and a full sort per
layer for the probabilities. Every other op of a block still works on full-size tensors whose
dropped rows are zero. ``attach(model, cfg, sites=DEFAULT_SITES.register(nn.Linear,
NaiveLinearKind()))`` gives a model this backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vcas import LinearKind
from vcas.accounting import FlopBucket
from vcas.ops.autocast import autocast_inputs
from vcas.ops.linear import LinearSite
from vcas.runtime.runtime import Runtime
from vcas.sampling import capped_proportional_probs, sampled_weights


class NaiveLinearKind(LinearKind):
    """``nn.Linear`` with the naive sampled backward."""

    def build(self, name: str, module: nn.Module, runtime: Runtime, *, weight_sampled: bool,
              block: str | None = None) -> LinearSite:
        return NaiveLinearSite(name, module, runtime, self, weight_sampled=weight_sampled, block=block)


class NaiveLinearSite(LinearSite):
    def sampled(self, x: torch.Tensor, recorded: torch.Tensor | None = None) -> torch.Tensor:
        x, weight, bias = autocast_inputs(x, self.weight, self.layout.bias(self.module))
        with torch.autocast(x.device.type, enabled=False):
            return NaiveSampledLinear.apply(x, weight, bias, self)


class NaiveSampledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                site: LinearSite) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.site, ctx.has_bias = site, bias is not None
        rows = x.numel() // x.shape[-1]
        site.runtime.count_forward(2.0 * rows * weight.numel())
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        site: LinearSite = ctx.site
        runtime = site.runtime
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        per_row = 2.0 * weight.numel()
        norms = torch.linalg.vector_norm(gy, dim=1, dtype=torch.float32)
        rows = torch.nonzero(norms > 0).squeeze(1)
        grad_x = gy.new_zeros(gy.shape[0], weight.shape[1])
        grad_x.index_copy_(0, rows, gy.index_select(0, rows) @ weight)
        g, xk = gy.index_select(0, rows), xs.index_select(0, rows)
        ratio = runtime.ratios.weight[site.name]
        kept = rows.numel()
        if runtime.mode.sample_weights and ratio < 1.0 and kept > 0:
            scores = norms[rows] * torch.linalg.vector_norm(xk, dim=1, dtype=torch.float32)
            weights = sampled_weights(capped_proportional_probs(scores, ratio * kept),
                                      runtime.draws.draw(gy.device))
            chosen = torch.nonzero(weights).squeeze(1)
            g = g.index_select(0, chosen) * weights[chosen].to(g.dtype).unsqueeze(1)
            xk = xk.index_select(0, chosen)
        grad_w = g.t() @ xk
        grad_b = gy.sum(0) if ctx.has_bias else None
        exact = 2 * per_row * gy.shape[0]
        runtime.count_backward(FlopBucket(backward_exact=exact, backward_nonzero=exact,
                                          backward_done=per_row * (rows.numel() + g.shape[0])))
        return grad_x.reshape(x.shape), grad_w, grad_b, None
