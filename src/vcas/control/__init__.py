"""Deciding the keep ratios: the controller (orchestration), its policies (the paper's rules and
the adaptive controller), the mechanism they drive, and the independent variance check."""
