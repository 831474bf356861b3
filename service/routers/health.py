"""Probes and metrics: `/healthz` (alive), `/readyz` (models loaded + warm, queue reachable), `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import ServicesDep
from service.queue import QueueUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: models loaded and warmed up, queue reachable")
async def readyz(services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    if services.startup_error:
        checks["models"] = f"failed: {services.startup_error}"
    elif services.engine is None:
        checks["models"] = "loading"
    elif not services.engine.ready:
        checks["models"] = "warming up"
    else:
        checks["models"] = "ok"
    if services.queue is None:
        checks["queue"] = "not configured"
    else:
        try:
            await services.queue.ping()
            checks["queue"] = "ok"
        except QueueUnavailable as error:
            checks["queue"] = f"unavailable: {error}"
    ready = all(v == "ok" for v in checks.values())
    services.metrics.ready.set(1 if ready else 0)
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


# Load balancers often probe with HEAD: same answers, kept out of the schema (one operation each).
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    if services.queue is not None:
        try:
            services.metrics.queue_depth.set(await services.queue.depth())
        except QueueUnavailable:
            pass  # keep the last value: the scrape itself must not fail
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
