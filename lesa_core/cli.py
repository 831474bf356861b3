"""The `lesa` command line: one entry point, sub-commands contributed by each package.

Each package that offers commands exposes `add_commands(subparsers)` in its own `cli.py`;
this file only gathers them, so a newcomer finds a command next to the code it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Packages that contribute sub-commands, in the order they appear in `lesa --help`.
COMMAND_MODULES = ("lesa_core.commands", "lesa_models.cli", "service.cli", "lesa_core.benchmark_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesa", description="LESA: serve Diffusion Transformers fast.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # that package has no commands yet
            raise
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as error:
        print(f"lesa {args.command}: error: {error}", file=sys.stderr)
        return 2


class CliError(Exception):
    """A user-facing error: printed as one line, no traceback."""


if __name__ == "__main__":
    sys.exit(main())
