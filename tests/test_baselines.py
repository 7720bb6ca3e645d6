import math

import pytest
import torch

from vcas.errors import ConfigError
from vcas_lab.baselines import selective_backprop_weights, upper_bound_weights


def test_selective_backprop_keeps_the_highest_losses():
    losses = torch.tensor([0.1, 2.0, 0.5, 3.0, 0.2, 1.0])
    weights = selective_backprop_weights(losses, keep=1 / 3)
    assert weights.tolist() == [0, 0.5, 0, 0.5, 0, 0]


def test_upper_bound_sampling_is_unbiased_for_the_mean_loss():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(12, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (12,), generator=g)
    losses = torch.nn.functional.cross_entropy(outputs, labels, reduction="none")
    estimates = torch.stack([(upper_bound_weights(losses, outputs, generator=g) * losses).sum().detach()
                             for _ in range(4000)])
    z = (estimates.mean() - losses.mean()) / (estimates.std() / math.sqrt(len(estimates)))
    assert abs(float(z.detach())) < 4.5
    assert (upper_bound_weights(losses, outputs, generator=g) > 0).sum() <= 4


@pytest.mark.parametrize("keep", [0.0, 1.5])
def test_invalid_keep_ratio(keep):
    with pytest.raises(ConfigError, match="keep"):
        selective_backprop_weights(torch.ones(3), keep)
