"""vcas: unbiased sampled backpropagation with variance-controlled adaptive sampling (VCAS)."""

from .config import VCASConfig
from .controller import Controller, attach
from .errors import AttachError, BlockDetectionError, ConfigError, StateDictError, VCASError
from .explain import Explanation, explain
from .outputs import BatchLayoutError

__all__ = ["VCASConfig", "Controller", "attach", "VCASError", "ConfigError",
           "BlockDetectionError", "AttachError", "StateDictError", "explain", "Explanation",
           "BatchLayoutError"]
__version__ = "0.1.0"
