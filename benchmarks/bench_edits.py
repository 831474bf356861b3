"""Accelerated edits against the same edits at full compute, on digits-image (held-out seeds).

Given pixels (`lesa_core.pipeline_types.Reference`) go back into the sample after every step, but
a predicted step's forecast never reads the sample: what it knows of them comes from the full
steps. This measures what that costs, per method and level, on two edits of generated digits:

    inpaint   keep the top half of "the number d", redraw the bottom half to the same prompt
    sdedit    strength 0.6 (no mask), prompt another digit: "the number (d + 3) % 10"

For each: PSNR of the edited image against the full-compute edit of the same seed, the share the
evaluator reads as the prompt's digit, and the wall speed-up of the whole batch-8 run against
full compute in the same run (the fastest of round-robin repeats of each). Prints a table,
writes JSON and a PNG grid per edit (rows: the source, full compute, then each method and level;
columns: the first seeds).

    python benchmarks/bench_edits.py            # seeds 2000-2031 (training used < 1000)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import lesa_core
from lesa_core.benchmark import labelled_grid, machine_info, parse_seeds, psnr_per_sample
from lesa_core.pipeline_types import Reference, reference_steps
from lesa_models import load_pipeline
from lesa_models.cli import resolve_acceleration
from lesa_models.evaluator import classify_digits

MODEL = "digits-image"
BATCH = 8
METHODS = "reuse,taylorseer1,taylorseer2,lesa"


def cache_for(pipe, method: str, level: str, steps: int):
    if method.startswith("taylorseer"):
        return lesa_core.CacheConfig(
            method="taylorseer", schedule=lesa_core.level_schedule(level, steps), taylor_order=int(method[-1])
        )
    return resolve_acceleration(pipe, level, steps, method=method)


def run(pipe, prompts, seeds, cache, reference: Reference | None, steps: int) -> tuple[np.ndarray, float]:
    """Samples and wall seconds of batch-8 calls over every seed."""
    size = dict(height=pipe.sizes[0][1], width=pipe.sizes[0][0])
    out, seconds = [], 0.0
    for i in range(0, len(seeds), BATCH):
        part = slice(i, i + BATCH)
        given = None
        if reference is not None:
            given = Reference(reference.samples[part], reference.keep[part], list(reference.follow_until[part]))
        started = time.perf_counter()
        result = pipe(prompts[part], seeds=seeds[part], num_inference_steps=steps, cache=cache, reference=given, **size)
        seconds += time.perf_counter() - started
        out.append(result.samples)
    return np.concatenate(out), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="2000-2031")
    parser.add_argument("--levels", default="5x,6.25x")
    parser.add_argument("--methods", default=METHODS, help="of reuse, taylorseer1, taylorseer2, lesa")
    parser.add_argument("--steps", type=int, default=50, help="LESA's bundles are trained for 50")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each variant (the fastest is kept)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results") / MODEL / "edits")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    levels, steps = args.levels.split(","), args.steps
    pipe = load_pipeline(MODEL)
    digits = [s % 10 for s in seeds]
    sources, _ = run(pipe, [f"the number {d}" for d in digits], seeds, None, None, steps)
    top = np.zeros(sources.shape, bool)
    top[:, : sources.shape[1] // 2] = True
    edits = {
        "inpaint": ([f"the number {d}" for d in digits], digits, Reference(sources, top, [0] * len(seeds))),
        "sdedit": (
            [f"the number {(d + 3) % 10}" for d in digits],
            [(d + 3) % 10 for d in digits],
            Reference(sources, np.zeros(sources.shape, bool), [reference_steps(0.6, steps)] * len(seeds)),
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    variants = [("none", "none")] + [(m, lv) for lv in levels for m in args.methods.split(",")]
    for name, (prompts, wanted, reference) in edits.items():
        outputs: dict[tuple[str, str], np.ndarray] = {}
        best: dict[tuple[str, str], float] = {}
        # round-robin repeats, the fastest of each kept: the machine's drift hits every variant alike
        for _ in tqdm(range(args.repeats), desc=name):
            for method, level in variants:
                cache = None if method == "none" else cache_for(pipe, method, level, steps)
                samples, seconds = run(pipe, prompts, seeds, cache, reference, steps)
                outputs[(method, level)] = samples
                best[(method, level)] = min(seconds, best.get((method, level), float("inf")))
        full, full_s = outputs[("none", "none")], best[("none", "none")]
        rows = {"source": sources}
        for method, level in variants:
            samples, seconds = outputs[(method, level)], best[(method, level)]
            psnr = psnr_per_sample(samples, full)
            records.append(
                {
                    "edit": name,
                    "method": method,
                    "level": level,
                    "psnr_vs_full": float(np.mean(np.minimum(psnr, 100.0))) if method != "none" else None,
                    "psnr_min": float(np.min(psnr)) if method != "none" else None,
                    "agreement": float(np.mean(classify_digits(samples) == np.array(wanted))),
                    "kept_exact": bool(np.array_equal(samples[reference.keep], reference.samples[reference.keep])),
                    "seconds": seconds,
                    "speedup_wall": full_s / seconds,
                    "speedup_theoretical": theoretical(level, steps),
                }
            )
            rows[f"{method} {level}" if method != "none" else "full compute"] = samples
        shown = min(8, len(seeds))
        cells = {(i, j): samples[j] for i, samples in enumerate(rows.values()) for j in range(shown)}
        labelled_grid(list(rows), [f"seed {s}" for s in seeds[:shown]], cells, 6).save(args.out / f"{name}_grid.png")
    header = {"model": MODEL, "steps": steps, "batch": BATCH, "seeds": args.seeds, "repeats": args.repeats,
              **machine_info()}  # fmt: skip
    (args.out / "edits.json").write_text(json.dumps({"header": header, "records": records}, indent=2) + "\n")
    print(f"{MODEL}, {len(seeds)} held-out seeds, {steps} steps, batch {BATCH}; {header['cpu']}")
    print("| edit | method | level | PSNR vs full edit (min) | digit read as prompted | kept pixels exact | wall speed-up "
          "| theoretical |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        psnr = "-" if r["psnr_vs_full"] is None else f"{r['psnr_vs_full']:.1f} dB ({r['psnr_min']:.1f})"
        print(
            f"| {r['edit']} | {r['method']} | {r['level']} | {psnr} | {r['agreement'] * 100:.0f}% "
            f"| {'yes' if r['kept_exact'] else 'no'} | {r['speedup_wall']:.2f}x | {r['speedup_theoretical']:.2f}x |"
        )
    print(f"wrote {args.out / 'edits.json'} and the grids beside it")
    return 0


def theoretical(level: str, steps: int) -> float:
    if level == "none":
        return 1.0
    schedule = lesa_core.level_schedule(level, steps)
    return schedule.num_steps / schedule.num_full


if __name__ == "__main__":
    raise SystemExit(main())
