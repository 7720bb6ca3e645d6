"""The sampled backward ops: activation sampling at block outputs, sampled linear layers."""

from .activation import BlockSampler, per_sample_norms
from .conv import ConvSite, sampled_conv
from .linear import LinearSite, sampled_linear

__all__ = ["BlockSampler", "ConvSite", "LinearSite", "per_sample_norms", "sampled_conv", "sampled_linear"]
