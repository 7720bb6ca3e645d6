"""Installing the sampled backward into a model: the registry of sampled layer kinds, and the
reversible :class:`~vcas.install.installation.Installation`."""
