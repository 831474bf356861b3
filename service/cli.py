"""`lesa serve` (HTTP API, with an embedded worker by default) and, from service/worker_cli.py,
`lesa worker` (a standalone worker on the shared Redis queue). Configuration: `LESA_*` env vars /
`.env` (see service/settings.py); the flags here override the most common ones."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from typing import Any

from lesa_core.cli import positive_int

SHADOW_HELP = "share of accelerated jobs rerun at full compute when idle, to export their PSNR (LESA_SHADOW_FRACTION)"


def add_commands(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the OpenAI-compatible image/video API",
        description="Start the HTTP API (FastAPI + uvicorn). By default an in-process queue and worker run "
        "inside it; with LESA_REDIS_URL set it enqueues into Redis for `lesa worker` processes.",
    )
    serve.add_argument("--host", help="interface to bind (default: LESA_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: LESA_PORT or 8000)")
    serve.add_argument(
        "--models",
        help="comma-separated models to serve (default: every model deploy/models.toml enables on this node)",
    )
    serve.add_argument("--max-batch", type=positive_int, help="most samples per batched generation (LESA_MAX_BATCH)")
    serve.add_argument("--no-worker", action="store_true", help="API only: leave generation to `lesa worker`")
    serve.add_argument("--shadow-fraction", type=float, help=SHADOW_HELP)
    serve.set_defaults(func=run_serve, allocator_from_settings=True)

    # `lesa worker` lives next to the Redis queue it needs (service/worker_cli.py).
    from service.worker_cli import add_worker_command

    add_worker_command(subparsers)


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
    from service.settings import Settings

    overrides = {k: v for k, v in extra.items() if v is not None}
    if getattr(args, "models", None):
        overrides["models"] = args.models
    if getattr(args, "max_batch", None):
        overrides["max_batch"] = args.max_batch
    return Settings(**overrides)


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before any model loads: a busy port fails in
    milliseconds, not after loading and warming every model (and starting a worker)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app

    settings = _settings(
        args, host=args.host, port=args.port, embedded_worker=False if args.no_worker else None,
        shadow_fraction=args.shadow_fraction,
    )  # fmt: skip
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.embedded_worker and not settings.redis_url:
        print(
            "lesa serve: --no-worker (LESA_EMBEDDED_WORKER=false) needs LESA_REDIS_URL: with the in-process "
            "queue no worker could ever take the jobs",
            file=sys.stderr,
        )
        return 2
    if settings.models:  # a typo must stop the command, not leave a server that is never ready
        from lesa_core.production import read_config

        known = read_config(settings.models_config).models
        unknown = [m for m in settings.model_list if m not in known]
        if unknown:
            print(f"lesa serve: unknown model(s) {', '.join(unknown)}; configured: {', '.join(known)}", file=sys.stderr)
            return 2
    try:
        sock = listen(settings.host, settings.port)
    except OSError as error:
        print(
            f"lesa serve: cannot listen on {settings.host}:{settings.port}: {error.strerror or error} "
            "(another server there? choose --port or LESA_PORT)",
            file=sys.stderr,
        )
        return 2
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop(reason: str) -> None:  # from the loading task, on the server's event loop
        failure.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_startup_failure=stop)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        timeout_keep_alive=settings.keep_alive_s,
    )  # fmt: skip
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if failure:  # a typo in the config, weights not cached, no CUDA: say it and exit, don't idle unready
        print(f"lesa serve: could not load the models: {failure[0]}", file=sys.stderr)
        return 1
    return 0
