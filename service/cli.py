"""`lesa serve` (HTTP API, with an embedded worker by default) and `lesa worker` (a standalone
worker taking batches from the shared Redis queue). Configuration: `LESA_*` env vars / `.env`
(see service/settings.py); the flags here override the most common ones."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any


def add_commands(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the OpenAI-compatible image/video API",
        description="Start the HTTP API (FastAPI + uvicorn). By default an in-process queue and worker run "
        "inside it; with LESA_REDIS_URL set it enqueues into Redis for `lesa worker` processes.",
    )
    serve.add_argument("--host", help="interface to bind (default: LESA_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: LESA_PORT or 8000)")
    serve.add_argument("--models", help="comma-separated models to serve (default: every bundled model)")
    serve.add_argument("--max-batch", type=int, help="most samples per batched generation (LESA_MAX_BATCH)")
    serve.add_argument("--no-worker", action="store_true", help="API only: leave generation to `lesa worker`")
    serve.set_defaults(func=run_serve)

    worker = subparsers.add_parser(
        "worker",
        help="run a generation worker on the shared (Redis) queue",
        description="Take batches of jobs from the queue at LESA_REDIS_URL and run them on this machine's "
        "device. Stops gracefully on SIGTERM/SIGINT after the current batch.",
    )
    worker.add_argument("--models", help="comma-separated models this worker serves")
    worker.add_argument("--max-batch", type=int, help="most samples per batched generation (LESA_MAX_BATCH)")
    worker.set_defaults(func=run_worker)


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
    from service.settings import Settings

    overrides = {k: v for k, v in extra.items() if v is not None}
    if getattr(args, "models", None):
        overrides["models"] = args.models
    if getattr(args, "max_batch", None):
        overrides["max_batch"] = args.max_batch
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    settings = _settings(args, host=args.host, port=args.port, embedded_worker=False if args.no_worker else None)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from lesa_core.cli import CliError

    settings = _settings(args)
    if not settings.redis_url:
        raise CliError(
            "a standalone worker needs the shared queue: set LESA_REDIS_URL (without it, `lesa serve` "
            "runs its own embedded worker)"
        )
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_worker_main(settings))
    return 0


async def _worker_main(settings: Any) -> None:
    from service.app import make_queue
    from service.engine import Engine
    from service.metrics import Metrics
    from service.worker import Worker

    engine = await asyncio.to_thread(Engine.load, settings)
    if settings.warmup:
        await asyncio.to_thread(engine.warmup)
    engine.ready = True
    queue = make_queue(settings)
    worker = Worker(queue, engine, Metrics(), max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        await queue.close()
