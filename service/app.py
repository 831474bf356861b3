"""`create_app`: the FastAPI application, with its engine, queue and metrics injected.

Start-up order (the lifespan): the HTTP server answers `/healthz` at once; models and bundles
load and warm up in a background thread; then the embedded worker starts and `/readyz` turns
200. Generation endpoints answer 503 + Retry-After until then, so an orchestrator can route
traffic by readiness. Shutdown stops the worker after its current batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from opentelemetry.trace import Tracer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deps import RESPONSE_HEADERS, Services, require_api_key
from service.errors import ApiError
from service.metrics import Metrics
from service.queue import InProcessJobQueue, JobQueue, QueueFull, QueueUnavailable
from service.routers import health, images, models, playground, videos
from service.settings import Settings
from service.tracing import finish_server_span, make_tracer, server_span
from service.webhooks import webhook_sender
from service.worker import Worker

log = logging.getLogger("lesa.app")

DESCRIPTION = """
OpenAI-compatible image and video generation on Diffusion Transformers accelerated by LESA
(learnable stage-aware predictors, CVPR 2026): most denoising steps skip every transformer block
and a small trained predictor forecasts the skipped hidden state.

Every generation request takes an `acceleration` level (see `GET /v1/models` for each level's
measured quality card) and reports what ran in its `lesa` object: full and predicted steps, the
realised speed-up, queue and generation times, and the seed.

Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`, with `param` naming
the offending field.
"""


def make_queue(settings: Settings) -> JobQueue:
    queue: JobQueue
    if settings.redis_url:
        from service.redis_queue import RedisJobQueue  # type: ignore[import-not-found]

        queue = RedisJobQueue.from_settings(settings)
    else:
        queue = InProcessJobQueue(
            max_backlog=settings.max_backlog,
            result_ttl_s=settings.result_ttl_s,
            max_jobs_kept=settings.max_jobs_kept,
            max_jobs_per_owner=settings.max_jobs_per_key,
            priority_aging_s=settings.priority_aging_s,
        )
    # The API ends jobs too (one whose queue_timeout_s passed while it waited): announced like the
    # workers' ends when webhooks are on.
    queue.outbox = settings.webhook_url is not None
    return queue


async def _start(services: Services, run_worker: bool) -> None:
    """Load + warm the engine off the event loop, then start the embedded worker."""
    settings = services.settings
    try:
        if services.engine is None:
            from service.engine import Engine

            t0 = time.perf_counter()
            if settings.redis_url and not run_worker:
                # API tier of a Redis deployment: validate against the catalogue, load no weights.
                engine = await asyncio.to_thread(Engine.catalogue, settings)
            else:
                engine = await asyncio.to_thread(Engine.load, settings)
            log.info("models ready in %.1fs: %s", time.perf_counter() - t0, ", ".join(engine.models))
            services.engine = engine
        engine = services.engine
        if not engine.ready:
            if settings.warmup:
                t0 = time.perf_counter()
                await asyncio.to_thread(engine.warmup)
                log.info("warm-up done in %.1fs", time.perf_counter() - t0)
            engine.ready = True
    except Exception as error:  # noqa: BLE001 - reported by /readyz and 503s, the process stays up
        services.startup_error = f"{type(error).__name__}: {error}"
        log.error("start-up failed: %s", services.startup_error)
        log.debug("start-up failure", exc_info=error)
        services.metrics.errors.labels(type="startup").inc()
        if services.on_startup_failure is not None:
            services.on_startup_failure(services.startup_error)
        return
    if run_worker and services.queue is not None:
        services.worker = Worker(
            services.queue, services.engine, services.metrics,
            max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms, worker_id="embedded",
            shadow_fraction=settings.shadow_fraction, models=list(services.engine.models),
            webhooks=webhook_sender(settings, services.metrics), tracer=services.tracer,
        )  # fmt: skip
        services.background.append(asyncio.create_task(services.worker.run(), name="lesa-worker"))
    services.metrics.ready.set(1)


# Probes and scrapes (about one a second from a Kubernetes pair of pods): counted, they drowned the
# requests users make in the error-rate alert and the dashboard's request panels.
UNCOUNTED_ENDPOINTS = frozenset({"/healthz", "/readyz", "/metrics"})
# Routes whose multipart forms carry image files: `LESA_MAX_UPLOAD_BYTES` bounds those forms.
UPLOAD_PATHS = frozenset({"/v1/images/edits", "/v1/images/jobs", "/v1/videos"})


class LimitsAndMetricsMiddleware:
    """Pure ASGI (no per-request task like BaseHTTPMiddleware): body-size limit, request metrics,
    the request's trace span (`service/tracing.py`) and the headers handlers leave in
    `RESPONSE_HEADERS` (a 429's own headers win).

    Oversize bodies get 413 from the declared Content-Length before anything is read; bodies
    without one (chunked) are buffered up to the limit and cut off there. The limit is
    `LESA_MAX_BODY_BYTES`, or `LESA_MAX_UPLOAD_BYTES` for a multipart form on a route that takes
    image files (`UPLOAD_PATHS`).
    """

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")
        await JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.services.settings
        headers = dict(scope["headers"])
        limit = settings.max_body_bytes
        if scope["path"] in UPLOAD_PATHS and headers.get(b"content-type", b"").lower().startswith(
            b"multipart/form-data"
        ):
            limit = max(limit, settings.max_upload_bytes)
        started = time.perf_counter()
        status = [500]
        extra_headers: dict[str, str] = {}  # what handlers add (`RESPONSE_HEADERS`): rate-limit state
        RESPONSE_HEADERS.set(extra_headers)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if extra_headers:
                    names = {name.lower() for name, _ in message.get("headers", [])}
                    added = [(k.encode(), v.encode()) for k, v in extra_headers.items() if k.encode() not in names]
                    message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        declared = headers.get(b"content-length")
        with server_span(self.services.tracer, scope) as span:
            try:
                await self._limited(scope, receive, send_wrapper, limit, declared)
            finally:
                route = scope.get("route")
                endpoint = getattr(route, "path", None) or "unmatched"
                metrics = self.services.metrics
                if endpoint not in UNCOUNTED_ENDPOINTS:
                    metrics.requests.labels(endpoint, scope["method"], str(status[0])).inc()
                    metrics.request_latency.labels(endpoint).observe(time.perf_counter() - started)
                finish_server_span(span, scope["method"], endpoint, status[0])

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int, declared: bytes | None) -> None:
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, receive, send, limit)
        elif declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # Chunked upload: buffer it up to the limit here (FastAPI would turn an error
            # raised while it reads the body into a generic 400), then replay it.
            messages: list[Message] = []
            size = 0
            while True:
                message = await receive()
                messages.append(message)
                size += len(message.get("body", b""))
                if size > limit:
                    await self._too_large(scope, receive, send, limit)
                    return
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break

            async def replay() -> Message:
                return messages.pop(0) if messages else await receive()

            await self.app(scope, replay, send)
        else:
            await self.app(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 list -> one OpenAI-style 400 naming the first offending field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    if tuple(first.get("loc", ()))[:1] == ("header",) and loc:  # "idempotency-key": named as clients send it
        header = "-".join(word.capitalize() for word in loc[0].split("-"))
        code = "invalid_" + loc[0].replace("-", "_")  # as the handler's own checks of it say
        return ApiError(400, f"the {header} header: {first.get('msg', 'invalid value')}", param=header, code=code)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, "the body is not valid JSON", code="invalid_json")
    if not loc and tuple(first.get("loc", ())) == ("body",):  # the body as a whole, not a field of it
        if kind == "missing":
            return ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
        return ApiError(400, "the body must be a JSON object, sent with Content-Type: application/json",
                        code="invalid_json")  # fmt: skip
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif kind == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg"))
    return ApiError(400, message, param=param, code="missing_field" if kind == "missing" else "invalid_value")


_ERRORS_BY_STATUS = {
    "400": "invalid request: `error.param` names the field",
    "401": "missing or invalid API key (only when `LESA_API_KEYS` is set)",
    "403": 'priority "high" asked with an API key not in `LESA_HIGH_PRIORITY_KEYS` (`priority_not_allowed`)',
    "404": "not found: unknown or expired id",
    "413": "request body larger than `LESA_MAX_BODY_BYTES`",
    "422": "the Idempotency-Key came before with another body (`idempotency_key_reused`)",
    "503": "the models are loading or the job queue is unavailable; see Retry-After",
}


def _document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document says what this server sends: FastAPI documents a 422 on every route,
    but `_validation_error` answers bad input with a 400 ErrorResponse; a secured route can answer
    401, one with an id in its path 404, one with a body 413 (the limits middleware), one taking an
    Idempotency-Key 422 (`submit`), and every /v1 route 503 until the models are loaded."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            responses.pop("422", None)  # FastAPI's validation shape, never sent
            headers = {p["name"].lower() for p in op.get("parameters", []) if p["in"] == "header"}
            statuses = [
                "400" if op.get("requestBody") or op.get("parameters") else None,
                "401" if op.get("security") else None,
                "404" if "{" in path else None,
                "413" if method in ("post", "put", "patch") and op.get("requestBody") else None,
                "503" if path.startswith("/v1/") else None,
                "422" if "idempotency-key" in headers else None,
                "403" if "idempotency-key" in headers else None,  # the routes that submit jobs
            ]
            for status in filter(None, statuses):
                documented = responses.setdefault(status, {"description": _ERRORS_BY_STATUS[status]})
                documented.setdefault("content", error)
    for unused in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(unused, None)
    return schema


def create_app(
    settings: Settings | None = None,
    *,
    engine: Any = None,
    queue: JobQueue | None = None,
    metrics: Metrics | None = None,
    tracer: Tracer | None = None,
    run_worker: bool | None = None,
    on_startup_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app. Pass `engine`/`queue`/`metrics`/`tracer` to inject them (tests, benchmarks);
    otherwise they are built from `settings` at start-up. `run_worker` (default
    `settings.embedded_worker`) runs a worker in this process. If loading the models fails, the
    app stays up answering 503 with the reason (what an orchestrator wants) and calls
    `on_startup_failure(reason)` (`lesa serve` uses it to exit)."""
    settings = settings or Settings()
    services = Services(
        settings=settings, metrics=metrics or Metrics(), queue=queue, engine=engine,
        on_startup_failure=on_startup_failure, tracer=tracer or make_tracer(settings, "lesa-api"),
    )  # fmt: skip
    embedded = settings.embedded_worker if run_worker is None else run_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services.queue is None:
            services.queue = make_queue(settings)
        services.background.append(asyncio.create_task(_start(services, embedded), name="lesa-start"))
        try:
            yield
        finally:
            if services.worker is not None:
                services.worker.stop()
            for task in services.background:
                try:
                    await asyncio.wait_for(task, timeout=30)
                except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down anyway
                    task.cancel()
            await services.queue.close()

    # FastAPIOffline: FastAPI whose /docs and /redoc serve Swagger UI and ReDoc from the package,
    # not a CDN (blank pages on an air-gapped node otherwise)
    app = FastAPIOffline(
        title="LESA serving",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.services = services
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document_errors(build_openapi())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        # Errors by type = the error code clients see; a failed generation or a job that timed out
        # in the queue is counted once, by the worker that saw it (the sync request reporting it is
        # not a second error).
        if exc.code not in ("generation_failed", "queue_timeout"):
            services.metrics.errors.labels(type=exc.code or f"http_{exc.status}").inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # not UTF-8, say
            return await api_error(
                request,
                ApiError(400, "the body is not valid JSON (not UTF-8, or nested too deeply)", code="invalid_json"),
            )
        # Starlette's own errors: a missing route, a method not allowed, a form it cannot parse
        codes = {404: "not_found", 405: "method_not_allowed", 400: "invalid_body"}
        error = ApiError(exc.status_code, str(exc.detail), code=codes.get(exc.status_code))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return await api_error(
            request,
            ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                     headers={"Retry-After": str(exc.retry_after_s)}),
        )  # fmt: skip

    @app.exception_handler(QueueUnavailable)
    async def queue_down(request: Request, exc: QueueUnavailable) -> JSONResponse:
        return await api_error(
            request,
            ApiError(503, str(exc), type="server_error", code="queue_unavailable",
                     headers={"Retry-After": "5"}),
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Never a traceback to the client: the log has it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        services.metrics.errors.labels(type="internal").inc()
        error = ApiError(500, "internal server error", type="server_error", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    auth = [Depends(require_api_key)]
    app.include_router(images.router, dependencies=auth)
    app.include_router(videos.router, dependencies=auth)
    app.include_router(models.router, dependencies=auth)
    app.include_router(health.router)
    app.include_router(playground.router, dependencies=auth)
    app.include_router(playground.page)  # GET /: the browser playground
    app.mount(playground.STATIC_URL, playground.static_files(), name="static")
    app.add_middleware(LimitsAndMetricsMiddleware, services=services)
    if settings.cors_origin_list:  # outermost: its headers go on every answer, a 413 or 401 too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Range", "traceparent", "tracestate"],
            # what a web app reads: when to retry, the job behind a stream, a download's name and range
            expose_headers=["Retry-After", "X-Job-Id", "Content-Disposition", "Content-Range", "ETag"],
            max_age=600,
        )
    return app
