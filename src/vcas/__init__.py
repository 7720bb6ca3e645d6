"""vcas: unbiased sampled backpropagation with variance-controlled adaptive sampling (VCAS).

    import vcas
    controller = vcas.attach(model, vcas.VCASConfig(), optimizer=optimizer)
    ...                                  # train as usual
    print(controller.stats()["sampling_train_flops_reduction"])
"""

from ._version import __version__
from .config import VCASConfig
from .control.controller import Controller, attach
from .errors import AttachError, BlockDetectionError, ConfigError, StateDictError, VCASError
from .install.registry import DEFAULT_SITES, SiteRegistry
from .ops.linear import LinearKind
from .plan.explain import Explanation, explain
from .plan.outputs import BatchLayoutError

__all__ = [
           "DEFAULT_SITES",
           "AttachError",
           "BatchLayoutError",
           "BlockDetectionError",
           "ConfigError",
           "Controller",
           "Explanation",
           "LinearKind",
           "SiteRegistry",
           "StateDictError",
           "VCASConfig",
           "VCASError",
           "__version__",
           "attach",
           "explain",
]
