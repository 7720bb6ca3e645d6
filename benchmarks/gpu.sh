#!/usr/bin/env bash
# vcas bench on a CUDA GPU: every preset, bf16 autocast, CUDA-event timing (about 5 minutes on
# one recent data-centre GPU). Results go to benchmarks/results/gpu/<preset>/bench.{json,md,png}.
# Usage: bash benchmarks/gpu.sh [output-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
run() {
  local preset="$1"; shift
  timeout 120 python3 -m vcas.cli bench --preset "$preset" --device cuda --dtype bf16 \
    --ratios 1,0.5,0.25,0.1 --repeats 10 --warmup 3 --out "$out/$preset" "$@" \
    || echo "vcas bench --preset $preset failed or timed out" >&2
}
run minilm
run bert-base --layers 12
run vit --layers 12
run resnet --batch 256
