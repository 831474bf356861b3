"""`lesa worker`: a standalone worker process that takes batches from the Redis queue.

Run as many as there are GPUs, on any nodes, all pointed at the same `LESA_REDIS_URL`:

    LESA_REDIS_URL=redis://redis:6379/0 LESA_DEVICE=cuda lesa worker

Each process loads the models (`LESA_WEIGHTS_DIR`, `LESA_MODELS`, like `lesa serve`), warms them
up, then runs `service.worker.Worker` against `RedisJobQueue`. It serves its own small HTTP
endpoint (`LESA_WORKER_METRICS_PORT`, default 9101) for Prometheus and for orchestrator probes:

* `/metrics`  the worker's `lesa_*` metrics (generation time, batch size, steps, speed-up, ...)
  plus `lesa_workers_ready` and, per model's stream, `lesa_queue_stream_lag` / `lesa_queue_stream_pending`;
* `/healthz`  200 while the event loop is alive (a hung loop answers 503, so a liveness probe
  restarts the process; its jobs are then reclaimed by other workers);
* `/readyz`   200 once models are loaded and Redis answers.

SIGTERM / SIGINT: stop claiming, finish the batch in hand, hand delivered-but-unstarted jobs back
to the other workers, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Gauge

from lesa_core.cli import positive_int
from service.cli import SHADOW_HELP
from service.metrics import Metrics
from service.queue import QueueUnavailable
from service.redis_queue import RedisJobQueue, RedisQueueSettings, default_worker_name
from service.settings import Settings
from service.tracing import make_tracer
from service.webhooks import webhook_sender

log = logging.getLogger("lesa.worker")

LOOP_STALL_S = 60.0  # /healthz fails when the event loop has not ticked for this long
READY_POLL_S = 2.0


class WorkerProbe:
    """State shared between the worker's event loop and its HTTP probe thread."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # Same style as service/metrics.py; lives on the worker's registry only (the API has none).
        self.workers_ready = Gauge(
            "lesa_workers_ready",
            "1 when this worker process has its models loaded and reaches the queue",
            registry=metrics.registry,
        )
        self.models_loaded = False
        self.queue_ok = False
        self.last_tick = time.monotonic()
        # The stream as KEDA sees it (refreshed with the readiness poll): worth a panel next to
        # the queue depth when deciding how many workers to run.
        self.stream_lag = Gauge(
            "lesa_queue_stream_lag",
            "a model's stream entries not yet delivered to any worker (consumer-group lag; KEDA scales on it)",
            ["model"],
            registry=metrics.registry,
        )
        self.stream_pending = Gauge(
            "lesa_queue_stream_pending",
            "a model's jobs delivered to workers and not yet acknowledged (running, held, or awaiting reclaim)",
            ["model"],
            registry=metrics.registry,
        )
        # Read at scrape time, so /metrics never lags behind /readyz.
        self.workers_ready.set_function(lambda: 1.0 if self.ready else 0.0)
        metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)

    def show_streams(self, stats: dict[str, dict[str, int | None]]) -> None:
        """Export these models' stream gauges, and only these: a model whose stream is gone (Redis
        lost its data) has no backlog to report."""
        for gauge in (self.stream_pending, self.stream_lag):
            gauge.clear()
        for model, stream in stats.items():
            self.stream_pending.labels(model).set(stream["pending"] or 0)
            if stream["lag"] is not None:
                self.stream_lag.labels(model).set(stream["lag"])

    @property
    def ready(self) -> bool:
        return self.models_loaded and self.queue_ok

    def alive(self) -> bool:
        return time.monotonic() - self.last_tick < LOOP_STALL_S


def _handler(probe: WorkerProbe) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, probe.metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = probe.alive()
                self._send(200 if ok else 503, b"ok\n" if ok else b"event loop stalled\n")
            elif path == "/readyz":
                ok = probe.ready
                body = f"models_loaded={probe.models_loaded} queue_ok={probe.queue_ok}\n".encode()
                self._send(200 if ok else 503, body)
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base-class signature
            pass  # one line per Prometheus scrape would drown the worker's log

    return Handler


def start_probe_server(probe: WorkerProbe, host: str, port: int) -> ThreadingHTTPServer:
    try:
        server = ThreadingHTTPServer((host, port), _handler(probe))
    except OSError as error:  # e.g. a second worker on this host with the default port
        from lesa_core.cli import CliError

        raise CliError(
            f"cannot serve the worker's /metrics on {host}:{port}: {error.strerror or error}; give each worker "
            "on a host its own --metrics-port (LESA_WORKER_METRICS_PORT), or 0 for none"
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="lesa-worker-http", daemon=True).start()
    return server


async def _watch(queue: RedisJobQueue, probe: WorkerProbe, stop: asyncio.Event) -> None:
    """Keep the probe's view of Redis and the loop fresh; export the backlog too."""
    while not stop.is_set():
        probe.last_tick = time.monotonic()
        try:
            await queue.ping()
            probe.metrics.queue_depth.set(await queue.depth())
            probe.show_streams(await queue.stream_stats())
            probe.queue_ok = True
        except QueueUnavailable as error:
            if probe.queue_ok:
                log.warning("queue unavailable: %s", error)
            probe.queue_ok = False
            probe.show_streams({})  # unknown while Redis is away: a stale backlog would page as unserved
        except Exception:  # noqa: BLE001 - the probe loop must outlive any one odd reply
            log.exception("queue check failed")
            probe.queue_ok = False
        try:
            await asyncio.wait_for(stop.wait(), READY_POLL_S)
        except TimeoutError:
            pass


def _load_engine(settings: Settings, qsettings: RedisQueueSettings) -> Any:
    if qsettings.worker_engine:
        module_name, _, attr = qsettings.worker_engine.partition(":")
        return getattr(importlib.import_module(module_name), attr)(settings)
    from service.engine import Engine

    return Engine.load(settings)


async def run_worker(settings: Settings, qsettings: RedisQueueSettings, name: str) -> int:
    from service.worker import Worker

    metrics = Metrics()
    probe = WorkerProbe(metrics)
    server = None
    if qsettings.worker_metrics_port:
        server = start_probe_server(probe, qsettings.worker_metrics_host, qsettings.worker_metrics_port)
        log.info("worker %s: /metrics /healthz /readyz on port %d", name, server.server_address[1])

    queue = RedisJobQueue.from_settings(qsettings)
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(queue, probe, stop))
    worker: Worker | None = None
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.info("worker %s: signal %d, finishing the current batch then exiting", name, signum)
        queue.draining = True  # claim_batch stops taking work and hands back what it holds
        stop.set()
        if worker is not None:
            worker.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        t0 = time.perf_counter()
        engine = await asyncio.to_thread(_load_engine, settings, qsettings)
        if settings.warmup and not stop.is_set():
            await asyncio.to_thread(engine.warmup)
        engine.ready = True
        probe.models_loaded = True
        log.info("worker %s: models %s ready in %.1fs", name, ", ".join(engine.models), time.perf_counter() - t0)
        if not stop.is_set():
            worker = Worker(
                queue, engine, metrics, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                worker_id=name, shadow_fraction=settings.shadow_fraction, models=list(engine.models),
                webhooks=webhook_sender(settings, metrics), tracer=make_tracer(settings, "lesa-worker"),
            )  # fmt: skip
            await worker.run()
    finally:
        stop.set()
        probe.models_loaded = False
        await watcher
        await queue.release(name)
        await queue.close()
        if server is not None:
            server.shutdown()
    log.info("worker %s: stopped after %d batches", name, worker.batches_run if worker else 0)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    overrides = {
        key: value
        for key, value in (
            ("redis_url", args.redis_url),
            ("max_batch", args.max_batch),
            ("max_wait_ms", args.max_wait_ms),
            ("device", args.device),
            ("models", args.models),
            ("shadow_fraction", args.shadow_fraction),
        )
        if value is not None
    }
    qoverrides = {k: v for k, v in overrides.items() if k in RedisQueueSettings.model_fields}
    if args.metrics_port is not None:
        qoverrides["worker_metrics_port"] = args.metrics_port
    if args.name is not None:
        qoverrides["worker_name"] = args.name
    settings = Settings(**overrides)
    qsettings = RedisQueueSettings(**qoverrides)
    if not qsettings.redis_url:
        from lesa_core.cli import CliError

        raise CliError("no Redis to take jobs from: set LESA_REDIS_URL or pass --redis-url")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    return asyncio.run(run_worker(settings, qsettings, qsettings.worker_name or default_worker_name()))


def add_worker_command(subparsers: Any) -> None:
    """Register `lesa worker` (called from service/cli.py's `add_commands`)."""
    parser = subparsers.add_parser(
        "worker",
        help="run a worker that takes batches from the Redis queue",
        description="Load the models, then take batches of jobs from the Redis queue (LESA_REDIS_URL) "
        "until SIGTERM. Every option defaults to its LESA_* environment variable.",
    )
    parser.add_argument("--redis-url", help="redis://host:port/db (LESA_REDIS_URL)")
    parser.add_argument("--max-batch", type=positive_int, help="most samples per batched generation (LESA_MAX_BATCH)")
    parser.add_argument("--max-wait-ms", type=float, help="wait for compatible jobs (LESA_MAX_WAIT_MS)")
    parser.add_argument("--device", help='"cpu", "cuda", "cuda:1", "auto" (LESA_DEVICE)')
    parser.add_argument("--models", help="comma-separated model names (LESA_MODELS)")
    parser.add_argument("--metrics-port", type=int, help="/metrics, /healthz, /readyz; 0 = off (9101)")
    parser.add_argument("--name", help="consumer name in the stream group (default: host-pid-random)")
    parser.add_argument("--shadow-fraction", type=float, help=SHADOW_HELP)
    parser.set_defaults(func=_cmd_worker, allocator_from_settings=True)


if __name__ == "__main__":  # `python -m service.worker_cli` = `lesa worker`
    import sys

    main_parser = argparse.ArgumentParser(prog="lesa")
    add_worker_command(main_parser.add_subparsers(dest="command", required=True))
    parsed = main_parser.parse_args(["worker", *sys.argv[1:]])
    sys.exit(parsed.func(parsed))
