"""The sampled backward ops: activation sampling at block outputs, sampled linear layers."""

from .activation import BlockSampler, per_sample_norms
from .linear import LinearSite, sampled_linear

__all__ = ["BlockSampler", "LinearSite", "per_sample_norms", "sampled_linear"]
