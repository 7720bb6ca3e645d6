"""The ``vcas`` command line: ``vcas demo``, ``vcas compare``, ``vcas bench``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so optional dependencies stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("vcas.experiments.demo", "compare exact training and VCAS on the built-in default task"),
    "compare": ("vcas.experiments.compare", "fine-tune one model with several methods side by side"),
    "bench": ("vcas.benchmark", "time exact and sampled backward passes at fixed keep ratios"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcas", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        try:
            importlib.import_module(module).add_arguments(sub)
        except ModuleNotFoundError as error:
            sub.set_defaults(missing=str(error))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "missing", None):
        print(f"vcas {args.command}: {args.missing}", file=sys.stderr)
        return 2
    return int(importlib.import_module(args.module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
