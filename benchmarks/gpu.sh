#!/usr/bin/env bash
# vcas on a CUDA GPU, bf16 autocast: `vcas bench` on every preset (CUDA-event timing) and one
# end-to-end lockstep run of exact training against VCAS on bbc-minilm (about 10 minutes on one
# recent data-centre GPU). Results go to <output-dir>/bench-<preset>/ and <output-dir>/compare-bbc-minilm/.
# Usage: bash benchmarks/gpu.sh [output-dir]   (default results/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
mkdir -p "$out"
bench() {
  local preset="$1"; shift
  timeout 150 python3 -m vcas.cli bench --preset "$preset" --device cuda --dtype bf16 \
    --ratios 1,0.5,0.25,0.1 --variants naive,vcas --repeats 10 --warmup 3 \
    --out "$out/bench-$preset" "$@" \
    || echo "vcas bench --preset $preset failed or timed out" >&2
}
bench minilm
bench bert-base --layers 12
bench vit --layers 12
bench resnet --batch 256
# One epoch of the default task, exact and VCAS alternating on the same batches.
timeout 420 python3 -m vcas.cli compare --task bbc-minilm --device cuda --bf16 --lockstep \
  --epochs 1 --seeds 0 --no-progress --out "$out/compare-bbc-minilm" --overwrite \
  || echo "vcas compare on CUDA failed or timed out" >&2
