"""Deciding what vcas does to a model before anything is changed: blocks, sampled layers, the
reasons for every layer left exact, and the wrappers around the model."""
