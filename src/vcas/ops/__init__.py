"""The sampled backward ops: activation sampling at block outputs, sampled linear layers and
convolutions, compact recompute of low-ratio blocks, per-sample records."""
