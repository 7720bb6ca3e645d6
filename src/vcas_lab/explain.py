"""``vcas explain MODEL``: what vcas samples in a local transformers model, without training."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local transformers checkpoint or config directory, or a "
                        "built-in task name (bbc-minilm, mnist-vit, ...)")
    parser.add_argument("--min-weight-numel", type=int, default=None,
                        help="VCASConfig.min_weight_numel (default: its default)")


def run(args: argparse.Namespace) -> int:
    import vcas

    from . import tasks

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.model in tasks.BUILTIN:
        model = tasks.builtin_model(args.model)
    elif Path(args.model).is_dir():
        try:
            model = tasks.model_from_directory(args.model)
        except tasks.TaskError as error:
            print(f"vcas explain: error: {error}", file=sys.stderr)
            return 2
    else:
        print(f"vcas explain: error: {args.model!r} is neither a local model directory nor a "
              f"built-in task ({', '.join(sorted(tasks.BUILTIN))})", file=sys.stderr)
        return 2
    print(vcas.explain(model, min_weight_numel=args.min_weight_numel))
    return 0
