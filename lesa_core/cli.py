"""The `lesa` command line: one entry point, sub-commands contributed by each package.

Each package that offers commands exposes `add_commands(subparsers)` in its own `cli.py`;
this file only gathers them, so a newcomer finds a command next to the code it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
from collections.abc import Iterable
from pathlib import Path

from lesa_core.allocator import retain_freed_memory

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
    name = f"lesa {args.command}"
    if not getattr(args, "allocator_from_settings", False):  # `serve` and `worker`: LESA_RETAIN_FREED_MEMORY
        retain_freed_memory()  # generation and training, step after step: lesa_core/allocator.py
    try:
        return _run_command(args)
    except CliError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; `record`, `train-predictor` and `train-model` resume where they stopped "
              "when run again with the same arguments", file=sys.stderr)  # fmt: skip
        return 130
    except Exception as error:  # noqa: BLE001 - a command line prints one line, never a traceback
        if os.environ.get("LESA_DEBUG"):
            raise
        print(f"{name}: error: {describe(error)} (LESA_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _run_command(args: argparse.Namespace) -> int:
    _made.clear()  # only this command's folders: never ones a caller of `prepare_output` made before
    try:
        return int(args.func(args) or 0)
    except BaseException:
        remove_empty(_made)  # a failed command leaves no empty output folder behind; what it wrote stays
        raise
    finally:
        _made.clear()


def describe(error: BaseException) -> str:
    """One line for an error a command did not anticipate, naming the file where there is one."""
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or type(error).__name__}: {error.filename}"
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error.reason} at byte {error.start})"
    if isinstance(error, EOFError | pickle.UnpicklingError):
        return f"a saved state file is truncated or corrupt ({error or type(error).__name__}); delete it to start over"
    errors = getattr(error, "errors", None)
    if type(error).__name__ == "ValidationError" and callable(errors):  # pydantic settings
        return "invalid setting: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors()[:3]
        )
    return f"{type(error).__name__}: {error}"


class CliError(Exception):
    """A user-facing error: printed as one line, no traceback."""


def prepare_output(path: Path | None, flag: str, directory: bool = False, create: bool = True) -> None:
    """Make `path` (a file, or with `directory` a folder) writable before the work that fills it
    runs: a path that cannot be written found only at the end would throw the work away.

    With `create` False nothing is made, the same paths are refused: for a command that makes the
    folder itself and removes it again when refused (`lesa record`)."""
    if path is None:
        return
    folder = path if directory else path.parent
    try:
        if not directory and path.is_dir():
            raise CliError(f"{flag} {path}: is a directory, expected a file to write")
        # the nearest part of the folder that exists: a file there (even `FILE/sub/x.png`) is named
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise CliError(f"{flag} {path}: {existing} is a file, not a folder")
        if not create:
            if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
                raise CliError(f"{flag} {path}: cannot write in {existing} (permission denied)")
            return
        _made.extend(p for p in (folder, *folder.parents) if not p.exists())
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"{flag} {path}: cannot create {folder} ({error.strerror})") from None


# The folders `prepare_output` created for the command running now: removed again, if still
# empty, when it fails (`main`), so a refused or interrupted run leaves the filesystem as it was.
_made: list[Path] = []


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove each of `folders` that is empty, deepest first; never one that holds anything."""
    for folder in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # refused for a folder that is not empty (or already gone)
        except OSError:
            pass


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts, sizes, steps), refused by argparse with the flag named."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


MAX_SEED = 2**31 - 1  # what every sampler of the project accepts (--seed here, --seeds lists in benchmark)


def seed_int(text: str) -> int:
    """argparse type: a seed every sampler of the project accepts, 0 .. MAX_SEED."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be 0 .. {MAX_SEED}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (epochs; 0 skips that phase)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


if __name__ == "__main__":
    # `python -m lesa_core.cli`: this module is __main__, and the commands raise lesa_core.cli's
    # CliError, which __main__'s `main` would not know as its own
    from lesa_core.cli import main as package_main

    sys.exit(package_main())
