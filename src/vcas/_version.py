"""The version of vcas: defined here only (the package metadata reads it)."""

__version__ = "0.2.0"
