"""`lesa` sub-commands that belong to the algorithm library itself."""

from __future__ import annotations

import argparse

from lesa_core.cli import CliError
from lesa_core.predictor import BundleError
from lesa_core.schedule import CacheSchedule


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import-reference", help="convert a checkpoint from the paper's code into a predictor bundle"
    )
    parser.add_argument("checkpoint", help="torch file saved by the reference implementation")
    parser.add_argument("out_dir", help="bundle directory to write (config.json + model.safetensors)")
    parser.add_argument("--num-steps", type=int, required=True)
    parser.add_argument("--interval", type=int, required=True)
    parser.add_argument("--first-enhance", type=int, required=True)
    parser.add_argument("--family", default=None, help="transformer class, e.g. FluxTransformer2DModel")
    parser.set_defaults(func=_import_reference)


def _import_reference(args: argparse.Namespace) -> int:
    from lesa_core.reference_import import import_reference

    try:
        schedule = CacheSchedule(args.num_steps, args.interval, args.first_enhance)
        predictor = import_reference(args.checkpoint, args.out_dir, schedule, args.family)
    except (BundleError, ValueError) as error:
        raise CliError(str(error)) from error
    branches = ", ".join(predictor.config.branches)
    print(f"wrote {args.out_dir}: {schedule.describe()}, branches: {branches}")
    return 0
