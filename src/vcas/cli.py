"""The ``vcas`` command.

``vcas explain MODEL`` and ``vcas --version`` are the library's; ``vcas demo``, ``vcas compare``
and ``vcas bench`` are the lab's (the ``vcas_lab`` package, installed with ``pip install
vcas[lab]``). Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so optional
dependencies stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__

SUBCOMMANDS = {
    "demo": ("vcas_lab.demo", "compare exact training and VCAS on the built-in default task"),
    "compare": ("vcas_lab.compare", "train one model with several methods side by side"),
    "bench": ("vcas_lab.bench", "time exact and sampled backward passes at fixed keep ratios"),
    "explain": ("vcas_lab.explain", "show what vcas samples in a model, and why the rest stays exact"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcas", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vcas {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        try:
            importlib.import_module(module).add_arguments(sub)
        except ModuleNotFoundError as error:
            sub.set_defaults(missing=f"{error} (install the lab: pip install 'vcas[lab]')")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "missing", None):
        print(f"vcas {args.command}: {args.missing}", file=sys.stderr)
        return 2
    return int(importlib.import_module(args.module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
