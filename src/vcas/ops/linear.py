"""SampleW: the sampled linear backward.

The input gradient is computed only for rows whose incoming gradient is non-zero (decided from
the gradient that arrives, never assumed); the weight gradient is leverage-score sampled over the
non-zero rows when the layer's keep ratio is below 1. The bias gradient stays exact. A layer
whose weight is frozen computes no weight gradient and keeps no input for one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..accounting import FlopBucket
from ..runtime.mode import CALIBRATION
from ..runtime.runtime import Runtime
from ..sampling import capped_probs_on_device, capped_proportional_probs, finite_capped_vector, sampled_rows
from .activation import nonzero_rows
from .autocast import autocast_inputs
from .capacity import capacity
from .records import LinearSketch, linear_contributions, sketch_flops


@dataclasses.dataclass(frozen=True)
class LinearKind:
    """How to read a linear-like module: ``y = x @ weight(m).T + bias(m)``.

    Attributes:
        weight: the module's weight parameter, (out, in) (or (in, out) when ``transposed``).
        bias: the module's bias, or None.
        transposed: the weight is stored as (in, out), like transformers' ``Conv1D``.
    """

    weight: Callable[[nn.Module], torch.Tensor] = lambda m: cast(torch.Tensor, m.weight)
    bias: Callable[[nn.Module], torch.Tensor | None] = lambda m: cast("torch.Tensor | None", m.bias)
    transposed: bool = False

    kind = "linear"

    def weight_of(self, module: nn.Module) -> torch.Tensor:
        return self.weight(module)

    def build(self, name: str, module: nn.Module, runtime: Runtime, *, weight_sampled: bool,
              block: str | None = None) -> LinearSite:
        return LinearSite(name, module, runtime, self, weight_sampled=weight_sampled, block=block)


class LinearSite:
    """A linear layer whose backward is sampled; installed as the module's ``forward``.

    Args:
        name: the layer's qualified name (its key in the ratio table and the recorder).
        module: the layer.
        runtime: the controller's runtime.
        layout: how to read the module's weight and bias.
        weight_sampled: whether the controllers may sample this layer's weight gradient (they
            leave small layers exact); only then do calibrations record its SampleW row scores.
        block: the block the layer lies in (None outside the blocks): its keep ratio bounds the
            rows the sync-free path reserves.
    """

    kind = "linear"

    def __init__(self, name: str, module: nn.Module, runtime: Runtime, layout: LinearKind,
                 *, weight_sampled: bool = True, block: str | None = None) -> None:
        self.name = name
        self.module = module
        self.runtime = runtime
        self.layout = layout
        self.weight_sampled = weight_sampled
        self.block = block
        self.original_forward: Callable[..., torch.Tensor] = type(module).forward.__get__(module)
        # Rows per sample with a non-zero gradient the last time samples reached this layer:
        # the zero-row reference for a pass in which every sample was dropped above.
        self.rows_per_sample: float | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.layout.weight(self.module)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0 if not self.layout.transposed else 1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        if not runtime.mode.enabled:
            return self.original_forward(x)
        replay = runtime.replay
        if replay is not None:  # a compactly recomputed block records or re-runs its forward
            flops = 2.0 * _rows(x) * self.weight.numel()
            shape = x.shape[:-1] + (self.out_features,)
            return replay.layer_output(  # type: ignore[attr-defined]
                lambda: self.original_forward(x), lambda out: flops, x.shape[0] if x.dim() else 1,
                shape, lambda recorded: self.sampled(x, recorded, every_sample_kept=runtime.in_compact_rerun))
        if not torch.is_grad_enabled():
            return self.original_forward(x)
        return self.sampled(x)

    def sampled(self, x: torch.Tensor, recorded: torch.Tensor | None = None,
                every_sample_kept: bool = False) -> torch.Tensor:
        """``F.linear`` whose backward skips zero rows and samples the weight-gradient rows.

        ``recorded``: the output, already computed (by a compact block's forward) for this input.
        ``every_sample_kept``: the input holds only samples a block kept (a compact re-run), so
        the sync-free path reserves room for all of them, not for the block's keep ratio of them."""
        weight = self.weight.t() if self.layout.transposed else self.weight
        x, weight, bias = autocast_inputs(x, weight, self.layout.bias(self.module))
        with torch.autocast(x.device.type, enabled=False):
            return _SampledLinearFunction.apply(x, weight, bias, self, recorded, every_sample_kept)

    # ------------------------------------------------------------------ backward decisions
    def samples_weight(self) -> bool:
        """Whether this pass samples the layer's weight gradient."""
        return self.runtime.mode.sample_weights and self.runtime.ratios.weight[self.name] < 1.0

    def scores_rows(self) -> bool:
        """Whether the weight gradient needs the SampleW row scores (sampling, or recording them)."""
        return (self.runtime.mode.record_row_scores and self.weight_sampled) or self.samples_weight()

    def records_samples(self) -> bool:
        return self.runtime.mode.record_samples and self.name in self.runtime.recorder.probes

    def record_samples(self, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        """Record this pass's per-sample contributions through the sketch (exact passes only)."""
        sketch = cast(LinearSketch, self.runtime.recorder.probes[self.name])  # linears get sketches
        contributions = linear_contributions(grad_out, x, sketch)
        self.runtime.recorder.layer_samples(self.name, contributions)
        extra = FlopBucket(backward_done=sketch_flops(_rows(x), sketch, contributions.shape[1]))
        self.runtime.tally.bucket(CALIBRATION).add(extra)

    def nonzero_reference(self, row_norms: torch.Tensor, n_nonzero: int, samples: int) -> float:
        """Rows an exact backward that skips zero rows would have computed: the non-zero rows,
        with every sample that reaches no row here (dropped above) counted at the mean density
        of the samples that do."""
        rows = row_norms.numel()
        if samples <= 1 or rows % samples:
            return float(n_nonzero if n_nonzero else rows)
        if n_nonzero == rows:
            self.rows_per_sample = rows / samples
            return float(rows)
        alive = int((row_norms.view(samples, -1) != 0).any(1).sum())
        if alive == 0:
            return samples * (self.rows_per_sample if self.rows_per_sample is not None else rows / samples)
        self.rows_per_sample = n_nonzero / alive
        return n_nonzero * samples / alive


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() else 1


def _samples(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() > 1 else 1


class _SampledLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                site: LinearSite, recorded: torch.Tensor | None, every_sample_kept: bool) -> torch.Tensor:
        needs_weight_grad = ctx.needs_input_grad[1]
        # A frozen weight needs no weight gradient: the input is not kept for one.
        ctx.save_for_backward(x if needs_weight_grad else None, weight)
        ctx.site = site
        ctx.has_bias = bias is not None
        ctx.input_shape, ctx.samples = x.shape, _samples(x)
        ctx.every_sample_kept = every_sample_kept
        # The input's row norms for SampleW's scores, taken while the input is still in cache
        # (in the backward it is read cold: twice the time on a CPU).
        sampled = needs_weight_grad and site.samples_weight()
        ctx.x_norms = site.runtime.input_row_norms(x) if sampled else None
        if recorded is not None:
            return recorded
        site.runtime.count_forward(2.0 * _rows(x) * weight.numel())
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.site.runtime.syncless(grad_out.device):
            return _backward_without_sync(ctx, grad_out)
        x, weight = ctx.saved_tensors
        site: LinearSite = ctx.site
        runtime = site.runtime
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        flops = FlopBucket()
        per_row = 2.0 * weight.numel()
        products = int(need_x) + int(need_w)
        flops.backward_exact = per_row * gy.shape[0] * products

        row_norms = _row_norms(gy)
        # Rows with a non-finite norm count as non-zero, so they pass exactly.
        rows = nonzero_rows(row_norms)
        n_nonzero = gy.shape[0] if rows is None else rows.numel()
        flops.backward_nonzero = per_row * products * site.nonzero_reference(row_norms, n_nonzero, ctx.samples)
        if n_nonzero > runtime.gather_below * gy.shape[0]:
            rows = None  # nearly every row is non-zero: the dense products cost less than gathering
        # The non-zero rows, gathered once for both products.
        g_rows = gy if rows is None else gy.index_select(0, rows)

        grad_x = None
        if need_x:
            grad_x = _input_grad(g_rows, weight, rows, gy.shape[0]).reshape(ctx.input_shape)
            flops.backward_done += per_row * g_rows.shape[0]
        grad_w = None
        if need_w:
            xs = x.reshape(-1, x.shape[-1])
            grad_w, n_kept = _weight_grad(g_rows, xs, row_norms, rows, n_nonzero, site, ctx.x_norms)
            flops.backward_done += per_row * n_kept
        return _finish(ctx, site, flops, g_rows, grad_out, x, grad_x, grad_w, need_w, need_b)


def _input_grad(g_rows: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                n_rows: int) -> torch.Tensor:
    if rows is None:
        return g_rows @ weight
    grad = g_rows.new_zeros(n_rows, weight.shape[1])
    return grad.index_copy_(0, rows, g_rows @ weight)


def _weight_grad(g_rows: torch.Tensor, xs: torch.Tensor, row_norms: torch.Tensor,
                 rows: torch.Tensor | None, n_nonzero: int, site: LinearSite,
                 x_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """dW from the non-zero rows, leverage-score sampled when the layer's ratio is below 1.

    Inputs are gathered once, for the rows finally used. A non-finite gradient is neither
    sampled nor recorded (sampling would only hide it); it is counted in the runtime."""
    runtime = site.runtime
    n = g_rows.shape[0]
    if n == 0 or not site.scores_rows():
        return g_rows.t() @ _gather(xs, rows), n
    x_norms = _row_norms(xs) if x_norms is None else x_norms
    if rows is not None:
        x_norms, row_norms = x_norms.index_select(0, rows), row_norms.index_select(0, rows)
    scores = row_norms * x_norms
    sample = site.samples_weight()
    record = runtime.mode.record_row_scores and site.weight_sampled
    # nu is a fraction of the non-zero rows (without gathering, the zero rows are here too).
    probs = _keep_probs(scores, runtime.ratios.weight[site.name] * n_nonzero) if sample else None
    finite = probs is not None if sample else (not record or bool(torch.isfinite(scores).all()))
    if not finite:
        runtime.count_nonfinite()
    elif record:
        runtime.recorder.row_scores(site.name, scores)
    if probs is None:
        return g_rows.t() @ _gather(xs, rows), n
    kept, weights = sampled_rows(probs, runtime.draws.draw(g_rows.device))
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


# --------------------------------------------------------------------- the sync-free path
def _backward_without_sync(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The same backward with nothing read back to the host (:mod:`vcas.ops.capacity`): the
    non-zero rows are gathered into room reserved from the block's keep ratio, SampleW keeps
    rows into room reserved from nu, and the FLOPs are those of the reserved rows."""
    x, weight = ctx.saved_tensors
    site: LinearSite = ctx.site
    runtime = site.runtime
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gy = grad_out.reshape(-1, grad_out.shape[-1])
    n_rows = gy.shape[0]
    per_row = 2.0 * weight.numel()
    products = int(need_x) + int(need_w)
    row_norms = _row_norms(gy)
    nonzero = row_norms != 0  # non-finite rows count as non-zero: they pass exactly
    samples = ctx.samples
    room = runtime.reserved_samples(site.block, samples, ctx.every_sample_kept)
    reserved = min(n_rows, room * (n_rows // samples if n_rows % samples == 0 else 1))
    if reserved > runtime.gather_below * n_rows:
        rows, g_rows, reserved = None, gy, n_rows
    else:
        rows, factor = runtime.draws.select(nonzero, reserved)
        g_rows = gy.index_select(0, rows) * factor.to(gy.dtype)
        reserved = rows.numel()
    flops = FlopBucket(backward_exact=per_row * n_rows * products,
                       backward_nonzero=per_row * products * _nonzero_reference_on_device(nonzero, samples),
                       backward_done=per_row * reserved * int(need_x))
    grad_x = None
    if need_x:
        grad_x = _input_grad(g_rows, weight, rows, n_rows).reshape(ctx.input_shape)
    grad_w = None
    if need_w:
        xs = x.reshape(-1, x.shape[-1])
        x_rows = _gather(xs, rows)
        grad_w, done = _weight_grad_without_sync(g_rows, x_rows, rows, nonzero, site, ctx.x_norms)
        flops.backward_done += per_row * done
    return _finish(ctx, site, flops, g_rows, grad_out, x, grad_x, grad_w, need_w, need_b)


def _finish(ctx: Any, site: LinearSite, flops: FlopBucket, g_rows: torch.Tensor, grad_out: torch.Tensor,
            x: torch.Tensor, grad_x: torch.Tensor | None, grad_w: torch.Tensor | None, need_w: bool,
            need_b: bool) -> tuple:
    """What both backward paths end with: the bias gradient, the FLOPs counted, the samples
    recorded on a calibration step, and autograd's tuple."""
    grad_b = g_rows.sum(0) if (need_b and ctx.has_bias) else None
    site.runtime.count_backward(flops)
    if need_w and site.records_samples():
        site.record_samples(grad_out, x)
    return grad_x, grad_w, grad_b, None, None, None


def _weight_grad_without_sync(g_rows: torch.Tensor, x_rows: torch.Tensor, rows: torch.Tensor | None,
                              nonzero: torch.Tensor, site: LinearSite,
                              x_norms: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """dW from the gathered rows, SampleW into room reserved from nu (the same estimator as the
    exact-size path; rows that overflow the room are thinned, re-weighted, unbiased)."""
    runtime = site.runtime
    reserved = g_rows.shape[0]
    record = runtime.mode.record_row_scores and site.weight_sampled
    if not (site.samples_weight() or record) or reserved == 0:
        return g_rows.t() @ x_rows, reserved
    norms_x = _row_norms(x_rows) if x_norms is None else _gather(x_norms, rows)
    scores = _row_norms(g_rows) * norms_x
    if record:
        runtime.recorder.row_scores(site.name, scores)
    if not site.samples_weight():
        return g_rows.t() @ x_rows, reserved
    nu = runtime.ratios.weight[site.name]
    # nu is a fraction of the non-zero rows, counted on the device.
    budget = nu * (nonzero.sum() if rows is None else nonzero.index_select(0, rows).sum())
    finite = torch.isfinite(scores).all()
    runtime.count_nonfinite(~finite)
    safe = torch.where(finite, scores, torch.zeros_like(scores))
    probs = capped_probs_on_device(safe, budget, capacity(nu * reserved, reserved))
    keeps = runtime.draws.draw(g_rows.device).keeps(probs)
    weights = torch.where(keeps > 0, keeps.to(probs.dtype) / probs.clamp(min=torch.finfo(probs.dtype).tiny),
                          torch.zeros_like(probs))
    kept, factor = runtime.draws.select(keeps > 0, capacity(nu * reserved, reserved))
    room = kept.numel()
    scale = (weights.index_select(0, kept) * factor).to(g_rows.dtype)
    sampled = (g_rows.index_select(0, kept) * scale.unsqueeze(1)).t() @ x_rows.index_select(0, kept)
    # A non-finite gradient stays non-finite (a GradScaler then skips the step), whatever was kept.
    return torch.where(finite, sampled, torch.full_like(sampled, float("nan"))), room


def _nonzero_reference_on_device(nonzero: torch.Tensor, samples: int) -> torch.Tensor:
    """:meth:`LinearSite.nonzero_reference` kept on the device: the non-zero rows, with the
    samples that reach no row here counted at the density of those that do."""
    rows = nonzero.numel()
    count = nonzero.sum().to(torch.float64)
    if samples <= 1 or rows % samples:
        return count
    alive = nonzero.view(samples, -1).any(1).sum().to(torch.float64)
    return torch.where(alive > 0, count * samples / alive.clamp(min=1), torch.full_like(count, float(rows)))
