"""`lesa bench quality`: the command-line face of lesa_core.benchmark (see that module)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesa_core.cli import CliError, non_negative_int, positive_int, prepare_output
from lesa_core.predictor import BundleError

# Scratch by default: the committed tables in benchmarks/results/<model>/ are only written when
# --out-dir names them, so a one-seed trial never overwrites them.
SCRATCH_DIR = Path("runs") / "bench"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: quality and speed of every method and level")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    quality = kinds.add_parser(
        "quality",
        help="PSNR / SSIM / MSE / evaluator agreement / realised speed-up of each method x level vs full compute",
    )
    add_quality_arguments(quality)
    quality.set_defaults(func=run_quality_command)


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `lesa bench quality` and benchmarks/bench_quality.py."""
    from lesa_core.benchmark import DEFAULT_LEVELS, DEFAULT_METHODS, DEFAULT_SEEDS

    parser.add_argument("--model", default="digits-image", help="digits-image | digits-video | pipeline directory")
    parser.add_argument("--prompts", type=Path, default=None, help="file, one prompt per line (default: held-out)")
    seeds = f"{DEFAULT_SEEDS[0]}-{DEFAULT_SEEDS[-1]}"
    parser.add_argument(
        "--seeds", default=seeds, help=f"e.g. {seeds} (the default) or 1000,1004 (training uses seeds < 1000)"
    )
    parser.add_argument("--levels", default=",".join(DEFAULT_LEVELS), help="comma-separated lesa_core levels")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="none,reuse,taylorseer1,taylorseer2,lesa; lesa-<variant> uses bundles <predictors>/<variant>/<level>",
    )
    parser.add_argument("--batch-sizes", default="1,8", help="batch sizes for the wall-clock speed-up")
    parser.add_argument(
        "--steps", type=positive_int, default=50, help="denoising steps (LESA bundles are trained at 50)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed calls per cell (fastest and median reported)"
    )
    parser.add_argument("--quality-batch", type=positive_int, default=8, help="batch size of the quality runs")
    parser.add_argument("--threads", type=non_negative_int, default=1, help="torch threads (0: leave torch's default)")
    parser.add_argument("--predictors", type=Path, default=None, help="bundle root (default <model>/predictors)")
    parser.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="METHOD:LEVEL=DIR",
        help="explicit predictor bundle for one LESA method and level (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="JSON output (default <out-dir>/quality.json)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="default runs/bench/<model> (the committed results: --out-dir benchmarks/results/<model>)",
    )
    parser.add_argument(
        "--update-cards", action="store_true", help="write each LESA level's figures into its bundle's config.json"
    )


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(b) for b in _csv(text)]
    except ValueError:
        raise ValueError(f"--batch-sizes {text!r}: expected comma-separated integers, e.g. 1,8") from None


def _bundles(items: list[str]) -> dict[tuple[str, str], Path]:
    bundles = {}
    for item in items:
        key, sep, path = item.partition("=")
        method, colon, level = key.partition(":")
        if not (sep and colon and method and level and path):
            raise ValueError(f"--bundle {item!r}: expected METHOD:LEVEL=DIR, e.g. lesa:5x=path/to/bundle")
        bundles[(method, level)] = Path(path)
    return bundles


def run_quality_command(args: argparse.Namespace) -> int:
    from lesa_core import benchmark

    try:
        config = benchmark.BenchConfig(
            model=args.model,
            seeds=benchmark.parse_seeds(args.seeds),
            prompts=benchmark.read_prompts(args.prompts) if args.prompts else None,
            levels=_csv(args.levels),
            methods=_csv(args.methods),
            batch_sizes=_batch_sizes(args.batch_sizes),
            steps=args.steps,
            guidance=args.guidance,
            repeats=args.repeats,
            quality_batch=args.quality_batch,
            threads=args.threads or None,
            predictors_dir=args.predictors,
            bundles=_bundles(args.bundle),
        )
    except (ValueError, OSError) as error:
        raise CliError(str(error)) from error
    out_dir = args.out_dir or SCRATCH_DIR / Path(args.model).name
    prepare_output(out_dir, "--out-dir", directory=True)
    prepare_output(args.json, "--json")
    try:
        from lesa_models import load_pipeline

        pipe = load_pipeline(args.model)
    except (ValueError, FileNotFoundError) as error:
        raise CliError(str(error)) from error
    try:
        result = benchmark.run_quality_benchmark(config, pipe)
    except (BundleError, benchmark.BenchSettingsError) as error:
        raise CliError(str(error)) from None
    paths = benchmark.write_outputs(result, out_dir, args.json)
    print()
    print(benchmark.markdown_table(result))
    for name, path in paths.items():
        shown = ", ".join(str(p) for p in path) if isinstance(path, list) else str(path)
        print(f"wrote {name}: {shown}")
    if args.update_cards:
        for bundle in benchmark.update_quality_cards(result):
            print(f"updated quality card: {bundle}/config.json")
    return 0
