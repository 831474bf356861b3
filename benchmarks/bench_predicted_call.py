"""What a predicted step costs inside a real generation, next to a full step, and where it goes.

`bench_step_cost.py` times one call in isolation; this times every transformer call of whole
batch-8 generations of a reference model at one level (both CFG branches), so caches, memos and
the sampler are as a user meets them. Per method: median full and predicted call, the forecast's
share of a predicted call, and the whole generation's wall / theoretical speed-up (fastest
generation of the round-robin repeats against full compute's; sampler overhead included).
Also counts the page faults of each generation (memory the allocator gave back and took again;
`--allocator default` measures without `lesa_core/allocator.py`). Prints a table and writes JSON.

    python benchmarks/bench_predicted_call.py --model digits-image --level 5x
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import lesa_core.hooks
from lesa_core.allocator import retain_freed_memory
from lesa_core.benchmark import default_prompts, machine_info
from lesa_core.forecasters import BranchHistory, ForecastContext, Forecaster
from lesa_models import load_pipeline
from lesa_models.cli import resolve_acceleration


class TimedForecaster(Forecaster):
    """Delegates to a method's forecaster and adds up the seconds its forecasts take."""

    def __init__(self, inner: Forecaster) -> None:
        self.inner, self.keeps, self.name = inner, inner.keeps, inner.name
        self.seconds = 0.0

    def observe(self, memory: BranchHistory, step: int, hidden: torch.Tensor, full: bool) -> None:
        self.inner.observe(memory, step, hidden, full)

    def forecast(self, memory: BranchHistory, step: int, context: ForecastContext) -> torch.Tensor:
        started = time.perf_counter()
        out = self.inner.forecast(memory, step, context)
        self.seconds += time.perf_counter() - started
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-image")
    parser.add_argument("--level", default="5x")
    parser.add_argument("--methods", default="reuse,lesa")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per method (after one warm-up)")
    parser.add_argument(
        "--json", type=Path, default=None, help="default benchmarks/results/<model>/predicted_call_<level>.json"
    )
    parser.add_argument(
        "--allocator",
        choices=("retain", "default"),
        default="retain",
        help="retain: freed memory kept for reuse, as the service and the lesa commands run "
        "(lesa_core/allocator.py); default: the C library's own behaviour, for comparison",
    )
    args = parser.parse_args()
    if args.allocator == "retain":
        retain_freed_memory()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    prompts = default_prompts(pipe.kind, args.batch)
    seeds = list(range(1000, 1000 + args.batch))
    width, height = pipe.sizes[0]

    calls: list[float] = []
    started: list[float] = []
    pipe.transformer.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    pipe.transformer.register_forward_hook(lambda *_: calls.append(time.perf_counter() - started.pop()))
    make_forecaster = lesa_core.hooks.make_forecaster
    timed: list[TimedForecaster] = []

    def timed_forecaster(*a, **k) -> Forecaster:
        timed.append(TimedForecaster(make_forecaster(*a, **k)))
        return timed[-1]

    lesa_core.hooks.make_forecaster = timed_forecaster
    methods = ["none", *args.methods.split(",")]
    caches = {m: None if m == "none" else resolve_acceleration(pipe, args.level, 50, method=m) for m in methods}
    seen: dict[str, dict[str, list[float]]] = {
        m: {"wall": [], "full": [], "predicted": [], "forecast": [], "faults": []} for m in methods
    }
    try:
        for repeat in range(args.repeats + 1):  # round-robin, so the machine's drift hits every method alike
            for method, cache in caches.items():
                schedule = cache.schedule if cache is not None else None
                calls.clear()
                timed.clear()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                pipe(prompts, seeds=seeds, height=height, width=width, num_inference_steps=50, cache=cache)
                if repeat == 0:
                    continue  # warm-up: the first request on a schedule folds the predictor's tables
                acc = seen[method]
                acc["wall"].append(time.perf_counter() - t0)
                acc["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
                branches = len(calls) // 50
                for i, seconds in enumerate(calls):
                    acc["full" if schedule is None or schedule.is_full(i // branches) else "predicted"].append(seconds)
                acc["forecast"] += [f.seconds for f in timed]
    finally:
        lesa_core.hooks.make_forecaster = make_forecaster
    records = []
    for method, acc in seen.items():
        schedule = caches[method].schedule if caches[method] is not None else None
        predicted = acc["predicted"]
        records.append(
            {
                "method": method,
                "generation_s": min(acc["wall"]),
                "full_call_ms": statistics.median(acc["full"]) * 1e3,
                "predicted_call_ms": statistics.median(predicted) * 1e3 if predicted else None,
                "forecast_ms_per_predicted_call": (
                    statistics.mean(acc["forecast"]) / (len(predicted) / args.repeats) * 1e3 if predicted else None
                ),
                "full_steps": schedule.num_full if schedule is not None else 50,
                # pages the kernel had to map (and zero) again: memory freed and reallocated
                "page_faults_per_generation": statistics.median(acc["faults"]),
            }
        )

    base = records[0]
    print(
        f"{args.model} at {args.level}, batch {args.batch}, 50 steps; {machine_info()['cpu']}, 1 thread, "
        f"allocator {args.allocator}"
    )
    print(
        "| method | generation | full call | predicted call | of which forecast | predicted / full "
        "| wall / theoretical | calls only | page faults |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        theoretical = 50 / r["full_steps"]
        r["speedup_wall"] = base["generation_s"] / r["generation_s"]
        r["wall_over_theoretical"] = r["speedup_wall"] / theoretical
        r["predicted_over_full"] = r["predicted_call_ms"] / r["full_call_ms"] if r["predicted_call_ms"] else None
        # the same ratio from the call medians alone (no sampler; steadier than whole generations here)
        full, predicted = r["full_steps"], 50 - r["full_steps"]
        r["calls_over_theoretical"] = full / (full + predicted * (r["predicted_over_full"] or 0.0))
        pred = "-" if r["predicted_call_ms"] is None else f"{r['predicted_call_ms']:.3f} ms"
        fc = "-" if r["forecast_ms_per_predicted_call"] is None else f"{r['forecast_ms_per_predicted_call']:.3f} ms"
        ratio = "-" if r["predicted_over_full"] is None else f"{r['predicted_over_full'] * 100:.2f}%"
        print(
            f"| {r['method']} | {r['generation_s'] * 1e3:.0f} ms | {r['full_call_ms']:.2f} ms | {pred} | {fc} | {ratio} "
            f"| {r['wall_over_theoretical']:.3f} | {r['calls_over_theoretical']:.3f} "
            f"| {r['page_faults_per_generation']:.0f} |"
        )
    out = args.json or Path("benchmarks/results") / args.model / f"predicted_call_{args.level}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "model": args.model,
        "level": args.level,
        "batch": args.batch,
        "repeats": args.repeats,
        "allocator": args.allocator,
        **machine_info(),
    }
    out.write_text(json.dumps({"header": header, "records": records}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
