"""vcas: unbiased sampled backpropagation with variance-controlled adaptive sampling (VCAS)."""

from .config import VCASConfig
from .controller import Controller, attach
from .errors import AttachError, BlockDetectionError, ConfigError, StateDictError, VCASError

__all__ = ["VCASConfig", "Controller", "attach", "VCASError", "ConfigError",
           "BlockDetectionError", "AttachError", "StateDictError"]
__version__ = "0.1.0"
