"""Accelerated edits against the same edits at full compute, on both reference models (held-out seeds).

Given pixels (`lesa_core.pipeline_types.Reference`) go back into the sample after every step, but
a predicted step's forecast never reads the sample: what it knows of them comes from the full
steps. This measures what that costs, per method and level, on edits of generated samples (each
edit runs from its own seed, 10000 above its source's):

    inpaint      digits-image: keep the top half of "the number d", redraw the rest to the same prompt
    sdedit       digits-image: strength 0.6 (no mask) into another digit, "the number (d + 3) % 10"
    variation    digits-image: strength 0.5 (no mask) without a prompt (the model's unconditional
                 prediction, as `POST /v1/images/variations` runs): judged by the source's digit
    first_frame  digits-video: a clip from the first frame of another clip with the same prompt
                 ("digit d moving <direction>": a frame such a clip can start from)

For each: PSNR against the full-compute edit of the same seed, the share the evaluator reads as
the prompt's digit (and, for clips, the prompt's direction), whether kept pixels came back
exactly (null where none are kept), how far the edits moved from their sources (`moved`: the mean
absolute difference on the [0, 1] scale), and the wall speed-up of the whole batch-8 run against full compute in the same run (the
fastest of round-robin repeats of each). Prints a table per model, writes JSON and a PNG grid per
edit to benchmarks/results/<model>/edits/ (rows: the source, full compute, then each method and
level; columns: the first seeds, or a clip's frames).

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
from lesa_core.benchmark import digit_hits, direction_hits, labelled_grid, machine_info, parse_seeds, psnr_per_sample
from lesa_core.given_images import VARIATION_STRENGTH
from lesa_core.pipeline_types import Reference, reference_steps
from lesa_models import load_pipeline
from lesa_models.cli import resolve_acceleration

BATCH = 8
EDIT_SEED_OFFSET = 10000  # an edit's seed: its source's + this (held out too)
DIRECTIONS = ("right", "left", "up", "down")
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
        given = None if reference is None else reference.select(part)
        started = time.perf_counter()
        result = pipe(prompts[part], seeds=seeds[part], num_inference_steps=steps, cache=cache, reference=given, **size)
        seconds += time.perf_counter() - started
        out.append(result.samples)
    return np.concatenate(out), seconds


Edit = tuple[list[str], Reference, list[str]]  # prompts, given pixels, prompts the evaluator judges by


def edits_for(pipe, seeds: list[int], steps: int) -> tuple[np.ndarray, dict[str, Edit]]:
    """A model's sources, and its edits by name."""
    digits = [s % 10 for s in seeds]
    if pipe.kind == "image":
        source_prompts = [f"the number {d}" for d in digits]
        sources, _ = run(pipe, source_prompts, seeds, None, None, steps)
        top = np.zeros(sources.shape, bool)
        top[:, : sources.shape[1] // 2] = True
        nothing = np.zeros(sources.shape, bool)
        other = [f"the number {(d + 3) % 10}" for d in digits]
        return sources, {
            "inpaint": (source_prompts, Reference(sources, top, [0] * len(seeds)), source_prompts),
            "sdedit": (other, Reference(sources, nothing, [reference_steps(0.6, steps)] * len(seeds)), other),
            "variation": (
                [""] * len(seeds),
                Reference(sources, nothing, [reference_steps(VARIATION_STRENGTH, steps)] * len(seeds)),
                source_prompts,
            ),
        }
    prompts = [f"digit {d} moving {DIRECTIONS[i % 4]}" for i, d in enumerate(digits)]
    sources, _ = run(pipe, prompts, seeds, None, None, steps)
    first = np.zeros(sources.shape, bool)
    first[:, 0] = True
    return sources, {"first_frame": (prompts, Reference(sources, first, [0] * len(seeds)), prompts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-image,digits-video")
    parser.add_argument("--seeds", default="2000-2031")
    parser.add_argument("--levels", default="5x,6.25x")
    parser.add_argument("--methods", default=METHODS, help="of reuse, taylorseer1, taylorseer2, lesa")
    parser.add_argument("--steps", type=int, default=50, help="LESA's bundles are trained for 50")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each variant (the fastest is kept)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="writes <out>/<model>/edits/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = parse_seeds(args.seeds)
    edit_seeds = [s + EDIT_SEED_OFFSET for s in seeds]
    levels, steps = args.levels.split(","), args.steps
    variants = [("none", "none")] + [(m, lv) for lv in levels for m in args.methods.split(",")]
    for model in args.models.split(","):
        pipe = load_pipeline(model)
        sources, edits = edits_for(pipe, seeds, steps)
        out = args.out / model / "edits"
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for name, (prompts, reference, judged_by) in edits.items():
            outputs: dict[tuple[str, str], np.ndarray] = {}
            best: dict[tuple[str, str], float] = {}
            # round-robin repeats, the fastest of each kept: the machine's drift hits every variant alike
            for _ in tqdm(range(args.repeats), desc=f"{model} {name}"):
                for method, level in variants:
                    cache = None if method == "none" else cache_for(pipe, method, level, steps)
                    samples, seconds = run(pipe, prompts, edit_seeds, cache, reference, steps)
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
                        "agreement": float(np.mean(digit_hits(pipe.kind, samples, judged_by))),
                        "direction_agreement": (
                            float(np.mean(direction_hits(samples, judged_by))) if pipe.kind == "video" else None
                        ),
                        "kept_exact": (
                            bool(np.array_equal(samples[reference.keep], reference.samples[reference.keep]))
                            if reference.keep.any()
                            else None
                        ),
                        "moved": float(np.abs(samples - sources).mean()),
                        "seconds": seconds,
                        "speedup_wall": full_s / seconds,
                        "speedup_theoretical": theoretical(level, steps),
                    }
                )
                rows[f"{method} {level}" if method != "none" else "full compute"] = samples
            if pipe.kind == "image":  # the first seeds
                columns = [f"seed {s}" for s in edit_seeds[:8]]
                cells = {(i, j): r[j] for i, r in enumerate(rows.values()) for j in range(len(columns))}
            else:  # the first clip, frame by frame
                columns = [f"frame {f}" for f in range(sources.shape[1])]
                cells = {(i, j): r[0, j] for i, r in enumerate(rows.values()) for j in range(len(columns))}
            labelled_grid(list(rows), columns, cells, 6).save(out / f"{name}_grid.png")
        header = {"model": model, "steps": steps, "batch": BATCH, "seeds": args.seeds, "repeats": args.repeats,
                  "edit_seed_offset": EDIT_SEED_OFFSET, **machine_info()}  # fmt: skip
        (out / "edits.json").write_text(json.dumps({"header": header, "records": records}, indent=2) + "\n")
        print(f"{model}, {len(seeds)} held-out seeds, {steps} steps, batch {BATCH}; {header['cpu']}")
        print("| edit | method | level | PSNR vs full edit (min) | digit read as prompted | direction | kept pixels "
              "exact | moved | wall speed-up | theoretical |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in records:
            psnr = "-" if r["psnr_vs_full"] is None else f"{r['psnr_vs_full']:.1f} dB ({r['psnr_min']:.1f})"
            direction = "-" if r["direction_agreement"] is None else f"{r['direction_agreement'] * 100:.0f}%"
            kept = {None: "-", True: "yes", False: "no"}[r["kept_exact"]]
            print(
                f"| {r['edit']} | {r['method']} | {r['level']} | {psnr} | {r['agreement'] * 100:.0f}% | {direction} "
                f"| {kept} | {r['moved']:.3f} | {r['speedup_wall']:.2f}x | {r['speedup_theoretical']:.2f}x |"
            )
        print(f"wrote {out / 'edits.json'} and the grids beside it")
    return 0


def theoretical(level: str, steps: int) -> float:
    if level == "none":
        return 1.0
    schedule = lesa_core.level_schedule(level, steps)
    return schedule.num_steps / schedule.num_full


if __name__ == "__main__":
    raise SystemExit(main())
