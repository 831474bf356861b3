"""Redis queue benchmark: the API tier plus 1 or 2 `lesa worker` processes on the reference image
model, at 8 and 32 concurrent clients, with max_batch 1 vs 8; and the queue's own overhead per job.

    python benchmarks/bench_queue.py                 # full grid (2 x 2 x 2 configurations)
    python benchmarks/bench_queue.py --quick         # fewer requests per client

What runs: a real API process (`create_app` + uvicorn, the code `lesa serve` runs) with
LESA_REDIS_URL set and no embedded worker, N real worker processes (`python -m service.worker_cli`,
i.e. `lesa worker`) loading `digits-image` from the package weights, and a real Redis (default
127.0.0.1:6379, a fresh key prefix, deleted afterwards). Clients send synchronous
`POST /v1/images/generations` requests (acceleration `none`, `--steps` denoising steps, distinct
seeds) back to back. Reported per configuration: throughput (images/s), latency p50/p95/p99, mean
batch size, mean queue wait and generation time (from each response's `lesa` object).

Queue overhead per job: submit -> claim -> complete -> wait, one job at a time with no generation,
for RedisJobQueue vs the in-process queue (what Redis adds to every job).

Results: a table on stdout and JSON in benchmarks/results/bench_queue.json. Numbers depend on the
machine and on what else runs on it: the JSON records CPU count and load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODEL = "digits-image"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Process:
    def __init__(self, args: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.log = log
        self.port = port
        with open(log, "wb") as handle:
            self.popen = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)

    def wait_ready(self, path: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.log.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.log.name}: {path} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def env_for(redis_url: str, prefix: str, max_batch: int, max_wait_ms: float) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        LESA_REDIS_URL=redis_url,
        LESA_REDIS_PREFIX=prefix,
        LESA_MODELS=MODEL,
        LESA_MAX_BATCH=str(max_batch),
        LESA_MAX_WAIT_MS=str(max_wait_ms),
        LESA_MAX_BACKLOG="10000",
        LESA_LOG_LEVEL="warning",
        # Two or three processes share the CPU cores: one torch thread each avoids oversubscription.
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    return env


async def run_clients(url: str, clients: int, per_client: int, steps: int) -> dict[str, Any]:
    latencies: list[float] = []
    lesa: list[dict[str, Any]] = []
    errors: dict[str, int] = {}

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for i in range(per_client):
            body = {
                "prompt": f"a {index % 10}",
                "model": MODEL,
                "num_inference_steps": steps,
                "acceleration": "none",
                "seed": index * 1000 + i,
            }
            started = time.perf_counter()
            response = await http.post("/v1/images/generations", json=body)
            elapsed = time.perf_counter() - started
            if response.status_code == 200:
                latencies.append(elapsed)
                lesa.append(response.json()["lesa"])
            else:
                errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - started
    return {
        "requests": clients * per_client,
        "ok": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "throughput_img_s": round(len(latencies) / wall, 3),
        "latency_s": {f"p{int(q * 100)}": round(percentile(latencies, q), 3) for q in (0.5, 0.95, 0.99)},
        "mean_batch_size": round(statistics.fmean(x["batch_size"] for x in lesa), 2) if lesa else None,
        "mean_queue_ms": round(statistics.fmean(x["queue_ms"] for x in lesa), 1) if lesa else None,
        "mean_generation_ms": round(statistics.fmean(x["generation_ms"] for x in lesa), 1) if lesa else None,
    }


def bench_grid(args: argparse.Namespace, redis_url: str, logs: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for workers in args.workers:
        for max_batch in args.max_batch:
            prefix = "lesabench-" + secrets.token_hex(4)
            env = env_for(redis_url, prefix, max_batch, args.max_wait_ms)
            api_port = free_port()
            api = Process(
                [sys.executable, str(Path(__file__).resolve()), "_serve", str(api_port)],
                {**env, "LESA_EMBEDDED_WORKER": "false", "LESA_WARMUP": "false"},
                logs / f"api-{workers}w-{max_batch}b.log",
                api_port,
            )
            pool = []
            for i in range(workers):
                port = free_port()
                pool.append(
                    Process(
                        [
                            sys.executable,
                            "-m",
                            "service.worker_cli",
                            "--name",
                            f"bench{i}",
                            "--metrics-port",
                            str(port),
                        ],
                        env,
                        logs / f"worker{i}-{workers}w-{max_batch}b.log",
                        port,
                    )
                )
            try:
                api.wait_ready("/readyz")
                for worker in pool:
                    worker.wait_ready("/readyz")
                url = f"http://127.0.0.1:{api_port}"
                # One small round first: connections, first-batch allocations.
                asyncio.run(run_clients(url, workers, 1, args.steps))
                for clients in args.clients:
                    result = asyncio.run(run_clients(url, clients, args.per_client, args.steps))
                    row = {"workers": workers, "max_batch": max_batch, "clients": clients, **result}
                    rows.append(row)
                    print(format_row(row), flush=True)
            finally:
                for worker in pool:
                    worker.stop()
                api.stop()
                cleanup(redis_url, prefix)
    return rows


async def queue_overhead(redis_url: str, jobs: int) -> dict[str, Any]:
    from service.queue import InProcessJobQueue, JobResult, JobSpec, OutputRef
    from service.redis_queue import RedisJobQueue

    spec = JobSpec(
        kind="image", model=MODEL, prompt="a 7", width=16, height=16, num_inference_steps=4,
        guidance_scale=1.0, level="none", method="none", seed=0,
    )  # fmt: skip
    result = JobResult(outputs=[OutputRef(name="0.png", content_type="image/png")], lesa={})
    png = b"\x89PNG" + b"\x00" * 300  # the size of a 16x16 reference-model PNG
    out: dict[str, Any] = {}
    prefix = "lesabench-" + secrets.token_hex(4)
    for name, queue in (
        ("in_process", InProcessJobQueue(max_backlog=10_000)),
        ("redis", RedisJobQueue(redis_url, prefix=prefix, max_backlog=10_000)),
    ):
        samples: list[float] = []
        for i in range(jobs + 10):
            started = time.perf_counter()
            job = await queue.submit(spec)
            (claimed,) = await queue.claim_batch("bench", max_batch=1, max_wait_ms=0, timeout_s=5)
            await queue.set_progress(claimed.id, 50)
            await queue.is_cancelled(claimed.id)
            await queue.complete(claimed.id, result, {"0.png": png})
            done = await queue.wait(job.id, 5)
            await queue.get_artifact(job.id, "0.png")
            assert done is not None and done.status.terminal
            if i >= 10:  # warm-up: connections, script loading
                samples.append((time.perf_counter() - started) * 1000)
        await queue.close()
        out[name] = {
            "jobs": jobs,
            "ms_per_job": {f"p{int(q * 100)}": round(percentile(samples, q), 3) for q in (0.5, 0.95, 0.99)},
            "mean_ms": round(statistics.fmean(samples), 3),
        }
    cleanup(redis_url, prefix)
    out["redis_added_ms_p50"] = round(out["redis"]["ms_per_job"]["p50"] - out["in_process"]["ms_per_job"]["p50"], 3)
    return out


def cleanup(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    client.close()


HEADER = (
    f"{'workers':>7} {'max_batch':>9} {'clients':>7} {'ok':>5} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} "
    f"{'p99 s':>7} {'batch':>6} {'queue ms':>9} {'gen ms':>8}"
)


def format_row(row: dict[str, Any]) -> str:
    lat = row["latency_s"]
    return (
        f"{row['workers']:>7} {row['max_batch']:>9} {row['clients']:>7} {row['ok']:>5} "
        f"{row['throughput_img_s']:>7.2f} {lat['p50']:>7.2f} {lat['p95']:>7.2f} {lat['p99']:>7.2f} "
        f"{row['mean_batch_size'] or 0:>6.2f} {row['mean_queue_ms'] or 0:>9.0f} {row['mean_generation_ms'] or 0:>8.0f}"
    )


def _serve(port: int) -> None:
    """The API as `lesa serve` runs it (settings from LESA_* in the environment)."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    uvicorn.run(create_app(Settings(port=port)), host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_serve":
        _serve(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("LESA_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--per-client", type=int, default=4, help="requests each client sends back to back")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--overhead-jobs", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="2 requests per client, 100 overhead jobs")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_queue.json")
    args = parser.parse_args()
    if args.quick:
        args.per_client, args.overhead_jobs = 2, 100

    logs = Path(tempfile.mkdtemp(prefix="bench_queue_"))  # process logs: not results, not committed
    print(f"process logs in {logs}", flush=True)
    load_before = os.getloadavg()
    overhead = asyncio.run(queue_overhead(args.redis_url, args.overhead_jobs))
    print(
        f"queue overhead per job (submit, claim, progress, complete, wait, fetch): "
        f"in-process p50 {overhead['in_process']['ms_per_job']['p50']:.3f} ms, "
        f"Redis p50 {overhead['redis']['ms_per_job']['p50']:.3f} ms "
        f"(p95 {overhead['redis']['ms_per_job']['p95']:.3f} ms)",
        flush=True,
    )
    print(HEADER, flush=True)
    rows = bench_grid(args, args.redis_url, logs)
    report = {
        "benchmark": "bench_queue",
        "model": MODEL,
        "steps": args.steps,
        "acceleration": "none",
        "per_client": args.per_client,
        "max_wait_ms": args.max_wait_ms,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "queue_overhead": overhead,
        "runs": rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
