"""SampleA: importance sampling of the activation gradient over samples at block outputs.

The sampler reads the :class:`~vcas.state.SamplingState` at backward time, so one forward graph
can be backpropagated exactly, then with sampling (the calibration does this with ``retain_graph``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..outputs import find_hidden_state
from ..sampling import bernoulli_weights, capped_proportional_probs
from ..state import SamplingState


def per_sample_norms(grad: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each sample's slice (dimension 0), accumulated in float32."""
    return torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1, dtype=torch.float32)


def finite_norms(norms: torch.Tensor, state: SamplingState) -> bool:
    """Whether every norm is finite; a non-finite gradient is counted in
    ``state.nonfinite_gradients`` and passes through exactly (sampling would only hide it)."""
    if bool(torch.isfinite(norms).all()):
        return True
    state.nonfinite_gradients += 1
    return False


def nonzero_rows(norms: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows (or samples) whose finite gradient norm is non-zero, the work a
    sampled op must do; ``None`` stands for all of them."""
    indices = torch.nonzero(norms).squeeze(1)
    return None if indices.numel() == norms.numel() else indices


def nonzero_indices(norms: torch.Tensor, state: SamplingState) -> torch.Tensor | None:
    """:func:`nonzero_rows`, and ``None`` (all rows, exactly) for a non-finite gradient."""
    return nonzero_rows(norms) if finite_norms(norms, state) else None


class BlockSampler:
    """SampleA at one block's output: a forward hook that hooks the hidden state's gradient."""

    def __init__(self, index: int, name: str, state: SamplingState,
                 above: int | None = None) -> None:
        self.index = index
        self.name = name
        self.state = state
        # The block whose sampler the gradient passed first; None at the top of a stack
        # (design note "stacks" in vcas.discovery).
        self.above = above
        self.recorded_norms: list[torch.Tensor] = []

    def forward_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not (self.state.enabled and torch.is_grad_enabled()):
            return
        if self.state.record_samples:
            # The backward that follows starts above every block, with a fresh set of norms.
            self.state.last_block, self.state.pass_norms = None, {}
        hidden = find_hidden_state(output)
        if hidden is None or not hidden.requires_grad:
            return
        if hidden.dim() < 1:
            raise RuntimeError(
                f"vcas: block {self.name!r} returned a scalar hidden state; activation sampling "
                "needs a batch-first tensor. Name other blocks with attach(..., blocks=[...]).")
        hidden.register_hook(self.sample_gradient)

    def sample_gradient(self, grad: torch.Tensor) -> torch.Tensor | None:
        state = self.state
        if not state.enabled or grad is None:
            return None
        norms = per_sample_norms(grad)
        if not finite_norms(norms, state):
            return None
        if state.record_norms:
            self.recorded_norms.append(norms.detach().cpu())
        if state.record_samples:
            state.last_block = self.index
            state.pass_norms[self.index] = norms.detach().cpu()
        ratio = state.act_ratios[self.index]
        above = 1.0 if self.above is None else state.act_ratios[self.above]
        if not state.sample_acts or ratio >= above:
            return None
        probs = capped_proportional_probs(norms, ratio * grad.shape[0])
        weights = bernoulli_weights(probs, state.generator(grad.device))
        return grad * weights.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
