"""Why a variation's default strength is 0.5 (`lesa_core.given_images.VARIATION_STRENGTH`).

A variation redraws an image without a prompt: its first (1 - strength) of the steps follow the
image, the rest are the model's unconditional prediction. Too low a strength gives the image back;
too high loses what it shows. On digits-image, for each strength: the share of variations the
evaluator reads as their source's digit, and how much the variations of one source differ from
each other (mean absolute difference of every pair, on the [0, 1] scale), beside the same edits
prompted with the source's digit. Full compute, 50 steps.

    python benchmarks/bench_variation_strength.py    # ~3 min on 2 CPU cores; writes JSON, prints a table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lesa_core.benchmark import machine_info
from lesa_core.pipeline_types import Reference, reference_steps
from lesa_models import load_pipeline
from lesa_models.evaluator import classify_digits

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strengths", default="0.4,0.5,0.6,0.7,0.8")
    parser.add_argument("--per-source", type=int, default=8, help="variations of each of the 10 sources")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/digits-image/edits/variation_strength.json")
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pipe = load_pipeline("digits-image")
    size = dict(height=16, width=16, num_inference_steps=args.steps)
    sources = pipe([f"a handwritten {d}" for d in DIGITS], seeds=list(range(10)), **size).samples
    seeds = list(range(100, 100 + args.per_source))
    records = []
    runs = [(s, p) for s in (float(x) for x in args.strengths.split(",")) for p in ("none", "the digit")]
    for strength, prompt in tqdm(runs, desc="strengths"):
        kept, spread = [], []
        for digit in range(10):
            n = len(seeds)
            given = Reference(np.repeat(sources[digit : digit + 1], n, 0), np.zeros((n, 16, 16), bool),
                              [reference_steps(strength, args.steps)] * n)  # fmt: skip
            prompts = [""] * n if prompt == "none" else [f"a handwritten {DIGITS[digit]}"] * n
            out = pipe(prompts, seeds=seeds, reference=given, **size).samples
            kept.append(float((classify_digits(out) == digit).mean()))
            pairs = np.abs(out[:, None] - out[None]).mean(axis=(2, 3))[np.triu_indices(n, 1)]
            spread.append(float(pairs.mean()))
        records.append({"strength": strength, "prompt": prompt, "digit_kept": float(np.mean(kept)),
                        "spread": float(np.mean(spread))})  # fmt: skip
    header = {"model": "digits-image", "steps": args.steps, "sources": 10, "per_source": args.per_source,
              "source_seeds": "0-9", "variation_seeds": f"{seeds[0]}-{seeds[-1]}", **machine_info()}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"header": header, "records": records}, indent=2) + "\n")
    print("| strength | prompt | source's digit kept | spread between variations |")
    print("| --- | --- | --- | --- |")
    for r in records:
        print(f"| {r['strength']:g} | {r['prompt']} | {r['digit_kept'] * 100:.0f}% | {r['spread']:.3f} |")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
