"""The naive sampled linear backward, kept as the benchmark's comparison point (issue 5).

It is the straightforward implementation of METHOD.md section 4: a zero-filled full-size input
gradient with the kept rows scattered into it, the non-zero rows of the output gradient and the
input re-gathered for the weight gradient, and a full sort per layer for the probabilities.
Every other op of a block still works on full-size tensors whose dropped rows are zero.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..accounting import FlopBucket
from ..ops.linear import LinearSite
from ..sampling import bernoulli_weights, capped_proportional_probs


class NaiveSampledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                site: LinearSite, recorded: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.site, ctx.has_bias = site, bias is not None
        rows = x.numel() // x.shape[-1]
        site.state.count_forward(2.0 * rows * weight.numel())
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        site: LinearSite = ctx.site
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        per_row = 2.0 * weight.numel()
        norms = torch.linalg.vector_norm(gy, dim=1, dtype=torch.float32)
        rows = torch.nonzero(norms > 0).squeeze(1)
        grad_x = gy.new_zeros(gy.shape[0], weight.shape[1])
        grad_x.index_copy_(0, rows, gy.index_select(0, rows) @ weight)
        g, xk = gy.index_select(0, rows), xs.index_select(0, rows)
        ratio = site.state.weight_ratios[site.index]
        kept = rows.numel()
        if site.state.sample_weights and ratio < 1.0 and kept > 0:
            scores = norms[rows] * torch.linalg.vector_norm(xk, dim=1, dtype=torch.float32)
            weights = bernoulli_weights(capped_proportional_probs(scores, ratio * kept),
                                        site.state.generator(gy.device))
            chosen = torch.nonzero(weights).squeeze(1)
            g = g.index_select(0, chosen) * weights[chosen].to(g.dtype).unsqueeze(1)
            xk = xk.index_select(0, chosen)
        grad_w = g.t() @ xk
        grad_b = gy.sum(0) if ctx.has_bias else None
        site.state.count_backward(FlopBucket(
            backward_exact=2 * per_row * gy.shape[0],
            backward_done=per_row * (rows.numel() + g.shape[0])))
        return grad_x.reshape(x.shape), grad_w, grad_b, None, None
