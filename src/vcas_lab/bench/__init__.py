"""``vcas bench``: time exact and sampled training steps side by side at fixed keep ratios.

For each keep ratio (activation = weight ratio) it reports the median backward time of the
naive sampled backward and of vcas's, against exact PyTorch measured in the same rounds, the
*ideal* time (exact backward time x sampled / exact backward FLOPs, counted with
``torch.utils.flop_counter``), the efficiency ideal / measured, the forward overhead and the
activation memory. Importable: ``run_benchmark`` and ``summarize`` return the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from vcas.config import VCASConfig

from .measure import VARIANTS, run_benchmark
from .presets import PRESETS, build_from_config, build_preset
from .report import format_table, plot, summarize

__all__ = ["PRESETS", "run_benchmark", "summarize"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="minilm",
                        help="model shape to time (default: minilm)")
    parser.add_argument("--model", help="a local transformers checkpoint or config directory "
                        "(sequence classification) instead of a preset")
    parser.add_argument("--batch", type=int, help="batch size (default: the preset's)")
    parser.add_argument("--seq", type=int, help="sequence length, tokens or image side (default: the preset's)")
    parser.add_argument("--layers", type=int, help="number of blocks (default: the preset's)")
    parser.add_argument("--ratios", default="1,0.5,0.25,0.1",
                        help="comma-separated keep ratios, act = weight (default: 1,0.5,0.25,0.1)")
    parser.add_argument("--variants", default="naive,vcas",
                        help=f"sampled variants to time beside exact, from {','.join(VARIANTS)} "
                        "(default: naive,vcas)")
    parser.add_argument("--flop-draws", type=int, default=5,
                        help="sampled steps whose FLOPs are averaged per setting (default: 5)")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed rounds (default: 9); times are medians, ratios medians of per-round ratios")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per setting first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="bf16 runs under autocast (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--recompute-below", type=float, default=None,
                        help="VCASConfig.recompute_below for the vcas variant")
    parser.add_argument("--out", type=Path, help="directory for bench.json, bench.md and bench.png")


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"vcas bench: --ratios {text!r} is not a comma-separated list of numbers") from None
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise SystemExit(f"vcas bench: --ratios {text!r} must hold keep ratios in (0, 1]")
    return ratios


def run(args: argparse.Namespace) -> int:
    ratios = _ratios(args.ratios)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or set(variants) - set(VARIANTS):
        raise SystemExit(f"vcas bench: --variants {args.variants!r} must name some of {', '.join(VARIANTS)}")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("vcas bench: --repeats must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.model:
        workload = build_from_config(args.model, args.batch or 32, args.seq or 128, args.layers)
    else:
        workload = build_preset(args.preset, args.batch, args.seq, args.layers)
    workload.to(device).model.train()
    config = VCASConfig(seed=0) if args.recompute_below is None else VCASConfig(
        seed=0, recompute_below=args.recompute_below)
    print(f"vcas bench: {workload.name} on {device} ({'bf16 autocast' if dtype else 'fp32'}), "
          f"ratios {ratios}, {args.repeats} rounds", file=sys.stderr)
    settings = run_benchmark(workload, ratios, config, repeats=args.repeats, warmup=args.warmup,
                             dtype=dtype, variants=variants, flop_draws=args.flop_draws,
                             progress=lambda m: print(f"  {m}", file=sys.stderr))
    summary = summarize(settings)
    result = {"workload": workload.name, "description": workload.description,
              "device": str(device), "dtype": "bf16" if dtype else "fp32",
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(),
              "repeats": args.repeats, "config": config.to_dict(), **summary}
    table = format_table(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(result, indent=2))
        (args.out / "bench.md").write_text(table + "\n")
        if plot(result, args.out / "bench.png"):
            print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0
