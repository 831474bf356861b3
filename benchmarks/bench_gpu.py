"""GPU timing: every acceleration level against full compute, at batch 1 and 8, in bf16 on CUDA.

For each model (default: the reference models `digits-image` and `digits-video`; any model of
deploy/models.toml works, e.g. `--models flux.1-dev` on a GPU node), batch size and level, it
times whole generations (text encoding, denoising, decoding) after a warm-up, and reports the
median wall time and the realised speed-up over full compute measured in the same run. The batch is
held-out prompts and seeds (as `lesa bench quality` uses), so each level's PSNR against the full-compute
samples of the same run shows that the predictors keep their quality on this device and dtype. A level
uses its LESA bundle when one trained for this step count is installed, else TaylorSeer (order 1);
the `method` column says which.

    python benchmarks/bench_gpu.py                       # on a GPU node
    python benchmarks/bench_gpu.py --models flux.1-dev --batch-sizes 1,4 --repeats 2
    python benchmarks/bench_gpu.py --allow-cpu --steps 8 --batch-sizes 1 --repeats 1   # smoke test

Prints a table headed by the GPU's name and writes JSON to benchmarks/results/ (`--json PATH`).
On a machine without CUDA it says so and exits 0 without measuring (unless --allow-cpu).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import lesa_core
from lesa_core.benchmark import default_prompts, psnr
from lesa_core.production import build_pipeline, load_bundles, read_config

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits-image,digits-video", help="comma-separated names from the config")
    parser.add_argument("--config", default=None, help="model config file (default deploy/models.toml)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (LESA bundles are trained at 50)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--levels", default="all", help='comma-separated levels, or "all"')
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per cell (median reported)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU in float32 when no GPU (smoke test)")
    parser.add_argument("--json", type=Path, default=None, help="output JSON (default benchmarks/results/...)")
    return parser.parse_args(argv)


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def cache_for(level: str, steps: int, bundles: dict[str, Any]) -> tuple[str, lesa_core.CacheConfig | None]:
    if level == "none":
        return "none", None
    predictor = bundles.get(level)
    if predictor is not None and predictor.schedule.num_steps == steps:
        return "lesa", lesa_core.CacheConfig(method="lesa", schedule=predictor.schedule, predictor=predictor)
    return "taylorseer", lesa_core.CacheConfig(method="taylorseer", schedule=lesa_core.level_schedule(level, steps))


def time_generation(
    pipe: Any, request: dict[str, Any], cache: Any, device: str, repeats: int
) -> tuple[list[float], Any]:
    """Wall times of `repeats` generations, and the samples of the last one."""
    times, samples = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        samples = pipe(**request, cache=cache).samples
        sync(device)
        times.append(time.perf_counter() - start)
    return times, samples


def bench_model(name: str, args: argparse.Namespace, config: Any, device: str, dtype: str) -> list[dict[str, Any]]:
    entry = config.models[name]
    pipe = build_pipeline(entry, device, dtype, config.weights_root)
    on_device = getattr(pipe, "device", None)
    if torch.device(device).type == "cuda" and on_device is not None and torch.device(on_device).type != "cuda":
        raise RuntimeError(f"{name} stayed on {on_device}: its pipeline cannot move to {device}")
    if torch.device(device).type == "cuda" and not hasattr(pipe, "to"):
        raise RuntimeError(f"{name}: {type(pipe).__name__} has no .to(device, dtype), so it cannot run on {device}")
    info = pipe.info
    bundles = load_bundles(entry, info)
    width, height = info.sizes[0]
    frames = info.num_frames[0] if info.kind == "video" else None
    levels = list(lesa_core.LEVELS) if args.levels == "all" else ["none", *args.levels.split(",")]
    records = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        request = dict(
            prompts=default_prompts(info.kind, batch), seeds=list(range(1000, 1000 + batch)), height=height,
            width=width, num_frames=frames, num_inference_steps=args.steps,
        )  # fmt: skip
        # Warm-up: kernels, allocator and cuDNN autotuning, outside the timings.
        pipe(**{**request, "num_inference_steps": max(info.min_steps, 4)})
        full_s, full_samples = None, None
        for level in dict.fromkeys(levels):
            method, cache = cache_for(level, args.steps, bundles)
            schedule = cache.schedule if cache is not None else lesa_core.CacheSchedule.every_step(args.steps)
            times, samples = time_generation(pipe, request, cache, device, args.repeats)
            median = statistics.median(times)
            if level == "none":
                full_s, full_samples = median, samples
            # Against the full-compute samples of this run, same prompts and seeds (none is the reference).
            quality = psnr(samples, full_samples) if full_samples is not None and level != "none" else None
            record = dict(
                model=name, kind=info.kind, width=width, height=height, num_frames=frames, batch_size=batch,
                level=level, method=method, total_steps=args.steps, full_steps=schedule.num_full,
                speedup_theoretical=round(schedule.speedup, 3), seconds_median=round(median, 4),
                seconds_all=[round(t, 4) for t in times], ms_per_sample=round(1000 * median / batch, 2),
                speedup_wall=round(full_s / median, 3) if full_s else None,
                psnr_vs_full=round(quality, 2) if quality is not None else None,
            )  # fmt: skip
            records.append(record)
            print(
                f"{name:<16} {batch:>5} {level:>6} {method:>10} {schedule.num_full:>4}/{args.steps:<3} "
                f"{median * 1000:>10.1f} {record['ms_per_sample']:>10.1f} {record['speedup_wall'] or 0:>8.2f}x "
                f"{schedule.speedup:>6.2f}x {record['psnr_vs_full'] or '':>7}",
                flush=True,
            )
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = args.device, args.dtype
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        if not args.allow_cpu:
            print(
                f"bench_gpu: no CUDA GPU on this machine (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'none'}); nothing measured. Run it on a GPU node, or pass --allow-cpu "
                "for a float32 CPU smoke run."
            )
            return 0
        device, dtype = "cpu", "float32"
    config = read_config(args.config)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in config.models]
    if unknown:
        print(f"bench_gpu: unknown model(s) {unknown}; configured: {', '.join(config.models)}", file=sys.stderr)
        return 2
    gpu = device_name(device)
    print(f"# {gpu} | torch {torch.__version__} | {dtype} | {args.steps} steps | median of {args.repeats}")
    print(f"{'model':<16} {'batch':>5} {'level':>6} {'method':>10} {'full':>8} {'ms/batch':>10} {'ms/sample':>10} "
          f"{'wall':>9} {'theory':>7} {'psnr':>7}")  # fmt: skip
    records: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    for name in names:
        try:
            records.extend(bench_model(name, args, config, device, dtype))
        except (OSError, RuntimeError, ValueError) as error:
            failures[name] = str(error)
            print(f"bench_gpu: {name} not measured: {error}", file=sys.stderr)
    result = {
        "device": gpu,
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": dtype,
        "steps": args.steps,
        "repeats": args.repeats,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "records": records,
        "failures": failures,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")[:40]
    suffix = "" if dtype == "bfloat16" else f"-{dtype}"  # a float32 run must not overwrite the bf16 one
    path = args.json or RESULTS / f"bench_gpu-{slug}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if failures and not records else 0


if __name__ == "__main__":
    sys.exit(main())
