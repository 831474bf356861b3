"""Serving benchmark: what the HTTP server adds per request, and what dynamic batching buys.

1. Overhead: the same image request through a real `uvicorn` server (a subprocess, as
   deployed) against `Engine.run_batch` called directly in this process, alternated request by
   request so background load hits both alike. Measured twice: on the real model (what a user
   sees) and on a zero-cost "null" pipeline (isolates the server path: HTTP, validation, queue,
   worker hand-off, encoding, base64, JSON).
2. Throughput: images/s at 1, 4 and 8 concurrent closed-loop clients against servers started
   with `max_batch` 1 and 8 (same model, steps and guidance), with latency percentiles and the
   mean batch size the worker actually formed (from the server's own /metrics).

    python benchmarks/bench_server.py                  # digits-image, 8 steps, CFG on
    python benchmarks/bench_server.py --steps 4 --rounds 2 --overhead-requests 20   # quicker

Prints a table and writes JSON to benchmarks/results/bench_server.json (`--json PATH`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from lesa_core.benchmark import portable_path  # noqa: E402 - after the path insert
from lesa_core.pipeline_types import PipelineInfo  # noqa: E402 - after the path insert, for a checkout without install

NULL_MODEL = "null-image"
THREADS: list[int | None] = [None]  # --torch-threads, for this process and the servers it starts


# ------------------------------------------------------------------------ null (zero-cost) model


class NullPipe:
    """The pipeline call contract with no compute: measures everything around the model."""

    info = PipelineInfo(
        name=NULL_MODEL, kind="image", sizes=[(16, 16)], num_frames=[1], default_steps=8, default_guidance=4.0,
        min_steps=1, max_steps=100, hidden_size=8, transformer_class="Null",
    )  # fmt: skip

    def __call__(self, prompts, *, seeds, height, width, num_frames=None, num_inference_steps=8,
                 guidance_scale=None, cache=None, callback=None):  # fmt: skip
        import numpy as np

        from lesa_models import GenerationCancelled, GenerationOutput

        for step in range(1, num_inference_steps + 1):
            if callback is not None and callback(step, num_inference_steps) is False:
                raise GenerationCancelled(f"cancelled after step {step}")
        samples = np.stack([np.random.default_rng(s).random((height, width), dtype=np.float32) for s in seeds])
        return GenerationOutput(samples=samples, stats={})


def build_engine(settings: Any, null: bool) -> Any:
    from service.engine import Engine, entry_from_pipeline

    if not null:
        engine = Engine.load(settings)
        engine.warmup()
        return engine
    engine = Engine(settings, {NULL_MODEL: entry_from_pipeline(NullPipe())})
    engine.ready = True
    return engine


def make_settings(model: str, max_batch: int, max_wait_ms: float, port: int = 0, null: bool = False) -> Any:
    # torch_threads: on shared cores, one intra-op thread per process avoids the oversubscription
    # that makes 2-thread OpenMP regions collapse under load (measured ~8x slower here).
    from service.settings import Settings

    return Settings(
        _env_file=None, port=port, models="" if null else model, max_batch=max_batch, max_wait_ms=max_wait_ms,
        warmup=True, warmup_steps=4, default_level="none", max_backlog=10_000, log_level="warning",
        torch_threads=THREADS[0],
    )  # fmt: skip


def serve(args: argparse.Namespace) -> None:
    """`--serve`: run one server (the subprocess the benchmark talks to)."""
    import uvicorn

    from service.app import create_app

    settings = make_settings(args.model, args.max_batch_serve, args.max_wait_ms, args.port, args.null)
    engine = build_engine(settings, null=True) if args.null else None
    app = create_app(settings, engine=engine)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------------------- client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: argparse.Namespace, max_batch: int, null: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, __file__, "--serve", "--port", str(self.port), "--model", args.model,
                   "--max-batch-serve", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
                   "--torch-threads", str(args.torch_threads)]  # fmt: skip
        if null:
            command.append("--null")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(command, env=env, cwd=ROOT)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server (max_batch={max_batch}) did not become ready")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def batch_stats(self) -> tuple[float, float]:
        """(sum, count) of the server's lesa_batch_size histogram."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = sum(float(v) for v in re.findall(r"^lesa_batch_size_sum\{[^}]*\} (\S+)$", text, re.M))
        count = sum(float(v) for v in re.findall(r"^lesa_batch_size_count\{[^}]*\} (\S+)$", text, re.M))
        return total, count


def request_body(model: str, steps: int, seed: int) -> dict[str, Any]:
    return {"prompt": "a seven", "model": model, "num_inference_steps": steps, "seed": seed, "acceleration": "none"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure_overhead(args: argparse.Namespace, null: bool) -> dict[str, Any]:
    from service.schemas import ImageGenerationRequest

    model = NULL_MODEL if null else args.model
    settings = make_settings(args.model, 1, 0.0, null=null)
    engine = build_engine(settings, null)
    server = ServerProcess(args, max_batch=1, null=null)
    direct, http, floor = [], [], []
    try:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            # The null model is cheap: many more samples give a stable p50 of the server path alone.
            requests = args.overhead_requests * (5 if null else 1)
            for i in range(args.overhead_warmup + requests):
                body = request_body(model, args.steps, seed=i)
                spec = engine.resolve_image(ImageGenerationRequest(**body))
                t0 = time.perf_counter()
                engine.run_batch([spec])
                t1 = time.perf_counter()
                response = client.post("/v1/images/generations", json=body)
                t2 = time.perf_counter()
                response.raise_for_status()
                if i >= args.overhead_warmup:
                    direct.append((t1 - t0) * 1000.0)
                    http.append((t2 - t1) * 1000.0)
            # The floor any HTTP round trip pays here (client, loopback, uvicorn): context for "added".
            for _ in range(50):
                t0 = time.perf_counter()
                client.get("/healthz").raise_for_status()
                floor.append((time.perf_counter() - t0) * 1000.0)
    finally:
        server.stop()
    added = [h - d for h, d in zip(http, direct, strict=True)]
    return {
        "model": model,
        "requests": len(http),
        "direct_p50_ms": round(statistics.median(direct), 3),
        "http_p50_ms": round(statistics.median(http), 3),
        "added_p50_ms": round(statistics.median(http) - statistics.median(direct), 3),
        "added_paired_p50_ms": round(statistics.median(added), 3),
        "http_floor_healthz_p50_ms": round(statistics.median(floor), 3),
    }


async def closed_loop(url: str, model: str, steps: int, clients: int, per_client: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(k: int) -> None:
            for j in range(per_client):
                t0 = time.perf_counter()
                response = await http.post("/v1/images/generations", json=request_body(model, steps, 1000 * k + j))
                response.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return time.perf_counter() - t0, latencies


def measure_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every max_batch server runs at once and the points are interleaved, repeated
    `--repeats` times: background load on a shared machine then hits every configuration alike
    instead of whichever happened to run during a busy minute."""
    servers = {}
    try:
        for max_batch in args.max_batch:
            servers[max_batch] = ServerProcess(args, max_batch=max_batch)
        samples: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            for clients in args.concurrency:
                for max_batch, server in servers.items():
                    # One untimed round first: connections open, the worker is in its steady state.
                    asyncio.run(closed_loop(server.url, args.model, args.steps, clients, 1))
                    before = server.batch_stats()
                    # At least 8 timed requests per point, so the 1-client figure is not 3 samples.
                    rounds = max(args.rounds, -(-8 // clients))
                    wall, latencies = asyncio.run(closed_loop(server.url, args.model, args.steps, clients, rounds))
                    after = server.batch_stats()
                    batches = after[1] - before[1]
                    samples.setdefault((max_batch, clients), []).append({
                        "wall": wall, "latencies": latencies,
                        "mean_batch": (after[0] - before[0]) / batches if batches else None,
                    })  # fmt: skip
                    print(f"  [{repeat + 1}/{args.repeats}] max_batch={max_batch} clients={clients}: "
                          f"{len(latencies) / wall:.3f} images/s", flush=True)  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for (max_batch, clients), runs in sorted(samples.items()):
        rates = [len(r["latencies"]) / r["wall"] for r in runs]
        latencies = [x for r in runs for x in r["latencies"]]
        batches = [r["mean_batch"] for r in runs if r["mean_batch"] is not None]
        rows.append({
            "max_batch": max_batch, "clients": clients, "requests": len(latencies),
            "images_per_s": round(statistics.median(rates), 3), "images_per_s_runs": [round(v, 3) for v in rates],
            "p50_latency_s": round(percentile(latencies, 0.5), 3),
            "p95_latency_s": round(percentile(latencies, 0.95), 3),
            "mean_batch": round(statistics.mean(batches), 2) if batches else None,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-image")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per request")
    parser.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 8])
    parser.add_argument("--max-batch", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8])
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of the throughput grid")
    parser.add_argument("--rounds", type=int, default=3, help="requests per client per measurement")
    parser.add_argument("--overhead-requests", type=int, default=30)
    parser.add_argument("--overhead-warmup", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per process (0 = torch default)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_server.json")
    # internal: the server subprocess
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch-serve", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--null", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    THREADS[0] = args.torch_threads or None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.serve:
        serve(args)
        return 0

    import torch

    print(f"bench_server: {args.model}, {args.steps} steps, CPU {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip
    overhead = [measure_overhead(args, null=True), measure_overhead(args, null=False)]
    throughput = [] if args.skip_throughput else measure_throughput(args)

    print("\nServer overhead (HTTP via uvicorn subprocess vs Engine.run_batch in-process, p50)")
    print(
        "| model | requests | direct p50 ms | HTTP p50 ms | added p50 ms | added (paired) p50 ms | GET /healthz p50 ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in overhead:
        print(f"| {r['model']} | {r['requests']} | {r['direct_p50_ms']} | {r['http_p50_ms']} | "
              f"{r['added_p50_ms']} | {r['added_paired_p50_ms']} | {r['http_floor_healthz_p50_ms']} |")  # fmt: skip
    if throughput:
        print(f"\nThroughput, {args.model}, {args.steps} steps, max_wait_ms {args.max_wait_ms} (closed loop)")
        print("| max_batch | clients | requests | images/s (median of runs) | runs | p50 latency s | p95 latency s "
              "| mean batch |")  # fmt: skip
        print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
        for r in throughput:
            print(f"| {r['max_batch']} | {r['clients']} | {r['requests']} | {r['images_per_s']} | "
                  f"{', '.join(map(str, r['images_per_s_runs']))} | {r['p50_latency_s']} | {r['p95_latency_s']} | "
                  f"{r['mean_batch']} |")  # fmt: skip
        by = {(r["max_batch"], r["clients"]): r["images_per_s"] for r in throughput}
        for clients in args.concurrency:
            lo, hi = by.get((min(args.max_batch), clients)), by.get((max(args.max_batch), clients))
            if lo and hi:
                print(f"batching gain at {clients} clients: {hi / lo:.2f}x")
    result = {
        "benchmark": "bench_server",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
        "config": {
            k: portable_path(v, ROOT) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("serve", "port", "max_batch_serve", "null")
        },
        "overhead": overhead,
        "throughput": throughput,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
