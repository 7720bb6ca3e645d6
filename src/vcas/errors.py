"""Library exceptions. Each subclasses the built-in a caller would expect to catch."""


class VCASError(Exception):
    """Base class of every error raised by vcas."""


class ConfigError(VCASError, ValueError):
    """An invalid configuration value or ratio; the message names the field and the valid range."""


class BlockDetectionError(VCASError, ValueError):
    """No blocks could be found or the given block specification did not match the model."""


class AttachError(VCASError, RuntimeError):
    """The model cannot be attached (already attached, no sampled layer, ...)."""


class StateDictError(VCASError, ValueError):
    """A controller state_dict does not match this controller's model or configuration."""
