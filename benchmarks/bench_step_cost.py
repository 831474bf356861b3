"""Cost of a predicted step vs a full step, per method, on a 3.8M-parameter DiT.

A predicted step still runs the embeddings, the forecast and the final layer; the realised
speed-up stays close to the theoretical one only if that is a few percent of a full step.
Target: a LESA predicted step costs <= 5% of a full step at batch 8.

    python benchmarks/bench_step_cost.py [--repeats 20] [--json benchmarks/results/step_cost.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel

from lesa_core import CacheConfig, CacheSchedule, PredictorConfig, StagePredictor, enable_cache, new_generation

NUM_STEPS = 50
TIMES = torch.linspace(1, 0, NUM_STEPS + 1)


def build_model() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=8,
        num_layers=8,
        sample_size=32,
        patch_size=2,
        norm_num_groups=4,
    )
    return model.eval()


def time_step(model, x, labels, method: str, predictor, repeats: int, taylor_order: int = 1) -> float:
    """Median seconds of one denoising call at step 10: full for 'none', predicted otherwise."""
    full_steps = range(NUM_STEPS) if method == "none" else [0, 1, 2, 3, 5, 7, 9]
    schedule = CacheSchedule.from_full_steps(NUM_STEPS, full_steps)
    config = CacheConfig(
        method=method,
        schedule=None if method == "none" else schedule,
        predictor=predictor,
        taylor_order=taylor_order,
    )
    if method == "lesa":
        predictor.config.schedule = schedule.to_dict()
        predictor.schedule = schedule
    enable_cache(model, config)
    samples = []
    with torch.inference_mode():
        for _ in range(repeats):
            new_generation(model, TIMES)
            for step in range(11):
                t = torch.full((x.shape[0],), float(TIMES[step]) * 1000)
                start = time.perf_counter()
                model(hidden_states=x, timestep=t, class_labels=labels, return_dict=False)
                if step == 10:
                    samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results/step_cost.json")
    args = parser.parse_args()

    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    predictor = StagePredictor(PredictorConfig(schedule=CacheSchedule.every_step(NUM_STEPS).to_dict())).eval()
    records = []
    for batch in (1, 8):
        x = torch.randn(batch, 4, 32, 32)
        labels = torch.zeros(batch, dtype=torch.long)
        full = time_step(model, x, labels, "none", None, args.repeats)
        for method, order in (("reuse", 1), ("taylorseer", 1), ("taylorseer", 2), ("lesa", 1)):
            predicted = time_step(model, x, labels, method, predictor, args.repeats, order)
            name = f"{method}-o{order}" if method == "taylorseer" else method
            records.append(
                {
                    "batch": batch,
                    "method": name,
                    "full_step_ms": full * 1e3,
                    "predicted_step_ms": predicted * 1e3,
                    "ratio": predicted / full,
                }
            )
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"DiT with {params / 1e6:.2f}M parameters, 256 tokens, on {machine}")
    print("| batch | method | full step (ms) | predicted step (ms) | predicted / full |")
    print("| --- | --- | --- | --- | --- |")
    for r in records:
        print(
            f"| {r['batch']} | {r['method']} | {r['full_step_ms']:.2f} | {r['predicted_step_ms']:.3f} | {r['ratio']:.3f} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine, "params": params, "records": records}, indent=2))


if __name__ == "__main__":
    main()
