"""Which stage expert's forecasts cost the most? LESA with one stage's forecasts replaced by TaylorSeer.

For a model and level, on held-out seeds, runs the committed LESA bundle as is, with the
forecasts of some stages (0: t > 0.9, 1: 0.5 < t <= 0.9, 2: t <= 0.5) replaced by TaylorSeer
order 1, and blended with TaylorSeer; prints mean MSE / PSNR vs full compute (with and without
the worst LESA seed) and writes JSON.

    python benchmarks/bench_stage_mix.py --model digits-image --level 5x
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import lesa_core.hooks
from lesa_core import CacheConfig, StagePredictor, level_schedule
from lesa_core.benchmark import default_prompts, machine_info, parse_seeds
from lesa_core.forecasters import BranchHistory, ForecastContext, LesaForecaster, extrapolate_full_points
from lesa_models import load_pipeline

VARIANTS: dict[str, dict] = {
    "lesa": {},
    "taylorseer1 at stage 0": {"taylor_stages": (0,)},
    "taylorseer1 at stages 0, 1": {"taylor_stages": (0, 1)},
    "taylorseer1 at stage 2": {"taylor_stages": (2,)},
    "taylorseer1 everywhere": {"taylor_stages": (0, 1, 2)},
    "0.7 lesa + 0.3 taylorseer1": {"blend": 0.3},
    "0.5 lesa + 0.5 taylorseer1": {"blend": 0.5},
}


class StageMixForecaster(LesaForecaster):
    def __init__(self, predictor: StagePredictor, taylor_stages: tuple[int, ...] = (), blend: float = 0.0) -> None:
        super().__init__(predictor)
        self.taylor_stages, self.blend = set(taylor_stages), blend

    def forecast(self, memory: BranchHistory, step: int, context: ForecastContext) -> torch.Tensor:
        taylor = extrapolate_full_points(memory.full_points, step, 1)
        if self.predictor.stage(float(context.timesteps[step])) in self.taylor_stages:
            return taylor
        lesa = super().forecast(memory, step, context)
        return lesa if not self.blend else (1 - self.blend) * lesa + self.blend * taylor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-image")
    parser.add_argument("--level", default="5x")
    parser.add_argument("--seeds", default="1000-1031")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON (default benchmarks/results/<model>/stage_mix_<level>.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    seeds = parse_seeds(args.seeds)
    prompts = default_prompts(pipe.info.kind, len(seeds))
    width, height = pipe.info.sizes[0]
    schedule = level_schedule(args.level)
    predictor = StagePredictor.from_pretrained(pipe.root / "predictors" / args.level)

    def generate(cache: CacheConfig | None) -> np.ndarray:
        return np.concatenate(
            [
                pipe(prompts[i : i + 8], seeds=seeds[i : i + 8], height=height, width=width, cache=cache).samples
                for i in range(0, len(seeds), 8)
            ]
        )

    reference = generate(None)
    rows, worst = [], None
    make_forecaster = lesa_core.hooks.make_forecaster
    try:
        for name, options in VARIANTS.items():
            # enable_cache builds its forecaster through this name: hand it the mixed one
            lesa_core.hooks.make_forecaster = lambda *a, _o=options, **k: StageMixForecaster(predictor, **_o)
            samples = generate(CacheConfig(method="lesa", schedule=schedule, predictor=predictor))
            mse = ((samples - reference) ** 2).reshape(len(seeds), -1).mean(1)
            worst = int(np.argmax(mse)) if worst is None else worst  # LESA's worst seed, fixed for every row
            rows.append(
                {
                    "variant": name,
                    "mse": float(mse.mean()),
                    "mse_without_worst": float(np.delete(mse, worst).mean()),
                    "psnr": float(np.mean(-10 * np.log10(np.maximum(mse, 1e-10)))),
                    "psnr_worst_seed": float(-10 * np.log10(max(mse[worst], 1e-10))),
                }
            )
    finally:
        lesa_core.hooks.make_forecaster = make_forecaster
    worst_seed = seeds[worst]
    print(f"{args.model} {args.level}, seeds {args.seeds}; LESA's worst seed: {worst_seed}")
    print(f"| variant | mean MSE | without seed {worst_seed} | PSNR dB | seed {worst_seed} PSNR |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['mse']:.2e} | {r['mse_without_worst']:.2e} | {r['psnr']:.2f} | {r['psnr_worst_seed']:.1f} |"
        )
    out = args.out or Path("benchmarks/results") / args.model / f"stage_mix_{args.level}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"model": args.model, "level": args.level, "seeds": args.seeds, "worst_seed": worst_seed}
    out.write_text(json.dumps({"header": {**header, "machine": machine_info()}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
