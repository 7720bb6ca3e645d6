"""SampleA: importance sampling of the activation gradient over samples at block outputs.

The sampler reads the runtime's mode and ratios at backward time, so one forward graph can be
backpropagated exactly, then with sampling (the paper's calibration does this with
``retain_graph``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..plan.outputs import find_hidden_state
from ..runtime.runtime import Runtime
from ..sampling import capped_proportional_probs, sampled_weights


def per_sample_norms(grad: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each sample's slice (dimension 0), accumulated in float32."""
    return torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1, dtype=torch.float32)


def finite_norms(norms: torch.Tensor, runtime: Runtime) -> bool:
    """Whether every norm is finite; a non-finite gradient is counted in the runtime and
    passes through exactly (sampling would only hide it)."""
    if bool(torch.isfinite(norms).all()):
        return True
    runtime.count_nonfinite()
    return False


def nonzero_rows(norms: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows (or samples) whose gradient norm is non-zero, the work a sampled op
    must do; ``None`` stands for all of them."""
    indices = torch.nonzero(norms).squeeze(1)
    return None if indices.numel() == norms.numel() else indices


def nonzero_indices(norms: torch.Tensor, runtime: Runtime) -> torch.Tensor | None:
    """:func:`nonzero_rows`, and ``None`` (all rows, exactly) for a non-finite gradient."""
    return nonzero_rows(norms) if finite_norms(norms, runtime) else None


class BlockSampler:
    """SampleA at one block's output: a forward hook that hooks the hidden state's gradient.

    Args:
        name: the block's qualified name (its key in the ratio table).
        runtime: the controller's runtime.
        above: the block whose sampler the gradient passed first (the next block of the same
            stack), or None at the top of a stack (design note "stacks" in
            :mod:`vcas.plan.discovery`).
    """

    def __init__(self, name: str, runtime: Runtime, above: str | None = None) -> None:
        self.name = name
        self.runtime = runtime
        self.above = above

    def forward_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        mode = self.runtime.mode
        if not (mode.enabled and torch.is_grad_enabled()):
            return
        if mode.record_samples:
            # The backward that follows starts above every block, in a fresh recording pass.
            self.runtime.recorder.start_pass()
        hidden = find_hidden_state(output)
        if hidden is None or not hidden.requires_grad:
            return
        if hidden.dim() < 1:
            raise RuntimeError(
                f"vcas: block {self.name!r} returned a scalar hidden state; activation sampling "
                "needs a batch-first tensor. Name other blocks with attach(..., blocks=[...]).")
        hidden.register_hook(self.sample_gradient)

    def keep_ratio(self) -> float | None:
        """This pass's keep ratio, or None where it samples nothing (at or above the ratio
        of the block above, whose sampler already dropped what it had to)."""
        mode, ratios = self.runtime.mode, self.runtime.ratios
        ratio = ratios.act[self.name]
        above = 1.0 if self.above is None else ratios.act[self.above]
        return ratio if mode.sample_acts and ratio < above else None

    def sample_gradient(self, grad: torch.Tensor) -> torch.Tensor | None:
        runtime = self.runtime
        mode = runtime.mode
        if not mode.enabled or grad is None:
            return None
        ratio = self.keep_ratio()
        if ratio is None and not (mode.record_norms or mode.record_samples):
            return None
        norms = per_sample_norms(grad)
        if runtime.syncless(grad.device):
            return self._sample_without_sync(grad, norms, ratio)
        if not finite_norms(norms, runtime):
            return None
        if mode.record_norms or mode.record_samples:
            runtime.recorder.block_norms(self.name, norms, samples=mode.record_samples)
        if ratio is None:
            return None
        probs = capped_proportional_probs(norms, ratio * grad.shape[0])
        weights = sampled_weights(probs, runtime.draws.draw(grad.device))
        return grad * weights.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))

    def _sample_without_sync(self, grad: torch.Tensor, norms: torch.Tensor,
                             ratio: float | None) -> torch.Tensor | None:
        """SampleA with nothing read back to the host: a non-finite gradient passes exactly (it
        is counted on the device), and the probabilities are solved on the device."""
        runtime, mode = self.runtime, self.runtime.mode
        finite = torch.isfinite(norms).all()
        runtime.count_nonfinite(~finite)
        if mode.record_norms or mode.record_samples:
            runtime.recorder.block_norms(self.name, norms, samples=mode.record_samples)
        if ratio is None:
            return None
        safe = torch.where(finite, norms, torch.zeros_like(norms))
        probs = capped_proportional_probs(safe.unsqueeze(0), ratio * grad.shape[0]).squeeze(0)
        weights = torch.where(finite, sampled_weights(probs, runtime.draws.draw(grad.device)), 1.0)
        return grad * weights.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
