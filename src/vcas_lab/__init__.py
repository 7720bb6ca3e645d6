"""Experiments on real tasks: ``vcas compare`` and ``vcas demo`` (optional dependencies inside)."""
