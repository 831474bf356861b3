"""The theoretical speed-up counted in FLOPs, next to the step ratio the quality benchmark uses.

`lesa bench quality` states the theoretical speed-up as total steps / full steps, which counts a
predicted step as free. A predicted step still runs the timestep embedding, the predictor and the
final layer; this counts what whole generations of a reference model compute (torch's
`FlopCounterMode`: matrix products, convolutions and attention; element-wise work such as the
forecast's multiply-adds is not counted) and divides full compute's count by each method's.
FLOPs do not depend on the machine, so one run holds for every CPU and GPU. Prints a table and
writes JSON.

    python benchmarks/bench_flops.py            # both reference models, every level
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lesa_core.benchmark import default_prompts, machine_info
from lesa_core.levels import LEVELS
from lesa_models import load_pipeline
from lesa_models.cli import resolve_acceleration

RESULTS = Path(__file__).resolve().parent / "results"


def generation_flops(pipe, cache, batch: int, steps: int) -> int:
    """FLOPs of one whole generation of `batch` samples: every transformer call and the sampler.
    Counted on the second of two identical generations, as a server runs them: the prompts' text
    encodings are cached by then and a predictor's tables folded, so neither is counted for one
    method and not another."""
    width, height = pipe.sizes[0]
    prompts = default_prompts(pipe.kind, batch)
    seeds = list(range(1000, 1000 + batch))
    pipe(prompts, seeds=seeds, height=height, width=width, num_inference_steps=steps, cache=cache)
    with FlopCounterMode(display=False) as counter:
        pipe(prompts, seeds=seeds, height=height, width=width, num_inference_steps=steps, cache=cache)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-image,digits-video")
    parser.add_argument("--methods", default="reuse,taylorseer,lesa")
    parser.add_argument("--levels", default=",".join(name for name in LEVELS if name != "none"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", type=Path, default=RESULTS / "flops.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    records = []
    for model in args.models.split(","):
        pipe = load_pipeline(model)
        full = generation_flops(pipe, None, args.batch, args.steps)
        for level in args.levels.split(","):
            for method in args.methods.split(","):
                cache = resolve_acceleration(pipe, level, args.steps, method=method)
                flops = generation_flops(pipe, cache, args.batch, args.steps)
                step_ratio = cache.schedule.speedup
                records.append(
                    {
                        "model": model,
                        "method": method,
                        "level": level,
                        "full_steps": cache.schedule.num_full,
                        "total_steps": args.steps,
                        "gflops_per_generation": round(flops / 1e9, 4),
                        "gflops_full_compute": round(full / 1e9, 4),
                        "speedup_flops": round(full / flops, 4),
                        "speedup_steps": round(step_ratio, 4),
                        "flops_over_steps": round(full / flops / step_ratio, 4),
                    }
                )

    print(f"batch {args.batch}, {args.steps} steps; FLOPs of whole generations (torch FlopCounterMode)")
    print("| model | method | level | GFLOP / generation | theoretical (FLOPs) | theoretical (steps) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        print(
            f"| {r['model']} | {r['method']} | {r['level']} | {r['gflops_per_generation']:.2f} "
            f"(full {r['gflops_full_compute']:.2f}) | {r['speedup_flops']:.3f}x | {r['speedup_steps']:.3f}x "
            f"| {r['flops_over_steps']:.3f} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    header = {"batch": args.batch, "steps": args.steps, "counter": "torch.utils.flop_counter.FlopCounterMode"}
    header.update(machine_info())
    args.json.write_text(json.dumps({"header": header, "records": records}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
