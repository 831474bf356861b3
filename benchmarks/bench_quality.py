"""Quality and speed of every forecasting method at every level: `lesa bench quality` as a script.

    python benchmarks/bench_quality.py --model digits-image                  # 256 held-out seeds (1000-1255), 50 steps
    python benchmarks/bench_quality.py --model digits-video --update-cards
    python benchmarks/bench_quality.py --seeds 1000-1001 --steps 8 --methods none,reuse --levels 2x  # smoke

Everything is in lesa_core.benchmark; this file only parses the same arguments as the CLI.
"""

from __future__ import annotations

import argparse
import sys

from lesa_core.benchmark_cli import add_quality_arguments, run_quality_command
from lesa_core.cli import CliError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_quality_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_quality_command(args)
    except CliError as error:
        print(f"bench_quality: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
