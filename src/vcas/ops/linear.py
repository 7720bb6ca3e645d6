"""SampleW: the sampled linear backward (METHOD.md section 4).

The input gradient is computed only for rows whose incoming gradient is non-zero (decided from
the gradient that arrives, never assumed); the weight gradient is leverage-score sampled over the
non-zero rows when the layer's keep ratio is below 1. The bias gradient stays exact.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..accounting import CALIBRATION, FlopBucket
from ..sampling import bernoulli_keep, capped_proportional_probs, finite_capped_vector
from ..state import SamplingState
from .activation import nonzero_rows
from .autocast import autocast_inputs
from .records import SampleRecord, linear_contributions, summarize


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
        self.recorded_scores: list[torch.Tensor] = []
        # The weight slices whose per-sample gradients are recorded (set by the controller for
        # measured weights; see vcas.ops.records), and the records of the current calibration.
        self.slices: tuple[int, torch.Tensor] | None = None
        self.sample_records: list[SampleRecord] = []
        # Whether the controller may sample this layer's weight gradient (it leaves small ones
        # exact): only then do calibrations record its SampleW row scores.
        self.scored = True

    def record_samples(self, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        """Append this pass's per-sample statistics on the slices (exact passes only)."""
        contributions = linear_contributions(grad_out, x, self.slices)
        self.sample_records.append(summarize(contributions, self.state))
        extra = FlopBucket(backward_done=2.0 * _rows(x) * contributions.shape[1])
        self.state.tally.bucket(CALIBRATION).add(extra)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        replay = state.replay if state.enabled else None
        recorded = None
        if replay is not None and not replay.recording:
            # A compact block's re-run: the output its forward computed, for the kept samples.
            out_features = self.module.weight.shape[1 if self.transposed else 0]
            recorded = replay.replayed_output(x.shape[0] if x.dim() else 1, x.shape[:-1] + (out_features,))
            if not torch.is_grad_enabled():
                return recorded
        if not (state.enabled and torch.is_grad_enabled()):
            out = self.original_forward(x)
            if replay is not None:  # a compact block's graph-free forward
                state.count_forward(2.0 * _rows(x) * self.module.weight.numel())
                replay.record_output(out)
            return out
        weight = self.module.weight
        if self.transposed:
            weight = weight.t()
        return sampled_linear(x, weight, self.module.bias, self, recorded)


def sampled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   site: LinearSite, recorded: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose backward skips zero rows and samples the weight-gradient rows.

    ``recorded``: the output, already computed (by a compact block's forward) for this input."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return site.function.apply(x, weight, bias, site, recorded)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 1


class _SampledLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                site: LinearSite, recorded: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.site = site
        ctx.has_bias = bias is not None
        # The input's row norms for SampleW's scores, taken while the input is still in cache
        # (in the backward it is read cold: twice the time on a CPU).
        sampled = ctx.needs_input_grad[1] and _samples_weight(site)
        ctx.x_norms = site.state.input_row_norms(x) if sampled else None
        if recorded is not None:
            return recorded
        site.state.count_forward(2.0 * _rows(x) * weight.numel())
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

        row_norms = _row_norms(gy)
        # Rows with a non-finite norm count as non-zero, so they pass exactly.
        rows = nonzero_rows(row_norms)
        n_nonzero = gy.shape[0] if rows is None else rows.numel()
        if n_nonzero > site.state.gather_below * gy.shape[0]:
            rows = None  # nearly every row is non-zero: the dense products cost less than gathering
        # The non-zero rows, gathered once for both products.
        g_rows = gy if rows is None else gy.index_select(0, rows)

        grad_x = None
        if need_x:
            grad_x = _input_grad(g_rows, weight, rows, gy.shape[0]).reshape(x.shape)
            flops.backward_done += per_row * g_rows.shape[0]
        grad_w = None
        if need_w:
            grad_w, n_kept = _weight_grad(g_rows, xs, row_norms, rows, n_nonzero, site, ctx.x_norms)
            flops.backward_done += per_row * n_kept
        grad_b = g_rows.sum(0) if (need_b and ctx.has_bias) else None
        site.state.count_backward(flops)
        if need_w and site.state.record_samples and site.slices is not None:
            site.record_samples(grad_out, x)
        return grad_x, grad_w, grad_b, None, None


def _input_grad(g_rows: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                n_rows: int) -> torch.Tensor:
    if rows is None:
        return g_rows @ weight
    grad = g_rows.new_zeros(n_rows, weight.shape[1])
    return grad.index_copy_(0, rows, g_rows @ weight)


def _samples_weight(site: LinearSite) -> bool:
    """Whether this pass samples the layer's weight gradient."""
    return site.state.sample_weights and site.state.weight_ratios[site.index] < 1.0


def _scores_rows(site: LinearSite) -> bool:
    """Whether the weight gradient needs the SampleW row scores (sampling, or recording them)."""
    return (site.state.record_row_scores and site.scored) or _samples_weight(site)


def _weight_grad(g_rows: torch.Tensor, xs: torch.Tensor, row_norms: torch.Tensor,
                 rows: torch.Tensor | None, n_nonzero: int, site: LinearSite,
                 x_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """dW from the non-zero rows, leverage-score sampled when the layer's ratio is below 1.

    Inputs are gathered once, for the rows finally used. A non-finite gradient is neither
    sampled nor recorded (sampling would only hide it); it is counted in the state."""
    state = site.state
    n = g_rows.shape[0]
    if n == 0 or not _scores_rows(site):
        return g_rows.t() @ _gather(xs, rows), n
    x_norms = _row_norms(xs) if x_norms is None else x_norms
    if rows is not None:
        x_norms, row_norms = x_norms.index_select(0, rows), row_norms.index_select(0, rows)
    scores = row_norms * x_norms
    sample, record = _samples_weight(site), state.record_row_scores and site.scored
    # nu is a fraction of the non-zero rows (without gathering, the zero rows are here too).
    probs = _keep_probs(scores, state.weight_ratios[site.index] * n_nonzero) if sample else None
    finite = probs is not None if sample else (not record or bool(torch.isfinite(scores).all()))
    if not finite:
        state.nonfinite_gradients += 1
    elif record:
        site.recorded_scores.append(scores.detach().cpu())
    if probs is None:
        return g_rows.t() @ _gather(xs, rows), n
    kept, weights = bernoulli_keep(probs, state.generator(g_rows.device))
    scaled = g_rows.index_select(0, kept) * weights.to(g_rows.dtype).unsqueeze(1)
    source = kept if rows is None else rows.index_select(0, kept)
    return scaled.t() @ xs.index_select(0, source), kept.numel()


def _keep_probs(scores: torch.Tensor, budget: float) -> torch.Tensor | None:
    """SampleW's keep probabilities, or ``None`` if a score is not finite."""
    if scores.device.type == "cpu":
        return finite_capped_vector(scores, budget)  # its solve checks the scores on the way
    if not bool(torch.isfinite(scores).all()):
        return None
    return capped_proportional_probs(scores, budget)


def _row_norms(rows: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)


def _gather(xs: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return xs if rows is None else xs.index_select(0, rows)
