"""Traces (OpenTelemetry): one trace per request, from the HTTP call through the queue to the
worker that ran it, on whatever node that was.

Off unless `LESA_TRACING` says otherwise: `otlp` exports over OTLP/HTTP to the collector the SDK's
standard variables name (`OTEL_EXPORTER_OTLP_ENDPOINT`, default http://localhost:4318;
`OTEL_EXPORTER_OTLP_HEADERS`, ...; `OTEL_SERVICE_NAME` overrides `lesa-api` / `lesa-worker`),
`console` prints each span as JSON (a quick look without a collector).

Spans of one request:

    POST /v1/images/generations      API, server span (a caller's `traceparent` header is its parent)
      lesa.job.queued                from the submit to a worker's start
      lesa.job.run                   the worker's batch for this job, with what ran (level, method,
                                     full / predicted steps, batch size, realised speed-up, weights'
                                     revision, predictor); status ERROR with the job's error when it
                                     failed
        lesa.stage.encode_prompts    the batched generation's stages, one after the other (as the
        lesa.stage.denoise           job's `lesa.stage_ms` reports them): text encoder, sampling
        lesa.stage.decode            loop, latents to pixels, PNG / MP4 encoding
        lesa.stage.encode_output

The context crosses the queue in `JobSpec.trace_context` (W3C `traceparent`), so with Redis the
worker's spans land in the API's trace. The worker records a job's spans from its stored record
once the batch is over (one read per job, only with tracing on).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

if TYPE_CHECKING:
    from service.queue import Job
    from service.settings import Settings

UNTRACED_PATHS = ("/healthz", "/readyz", "/metrics")  # probes and scrapes: no trace worth keeping


def make_tracer(settings: Settings, service_name: str) -> Tracer:
    """The tracer `LESA_TRACING` asks for; a no-op one when it is off."""
    if settings.tracing == "off":
        return trace.NoOpTracer()
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if settings.tracing == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter: Any = OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))  # flushed at exit (TracerProvider's atexit)
    return provider.get_tracer("lesa")


def is_on(tracer: Tracer) -> bool:
    return not isinstance(tracer, trace.NoOpTracer)


def current_context() -> dict[str, str] | None:
    """The current span's context as W3C headers, to travel with a job; None outside a recorded span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


@contextmanager
def server_span(tracer: Tracer, scope: dict[str, Any]) -> Iterator[Any]:
    """The span of one HTTP request (its caller's `traceparent` as parent). The caller names it
    once routing knows the route template (`finish_server_span`)."""
    if not is_on(tracer) or scope["path"] in UNTRACED_PATHS:
        yield None
        return
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    with tracer.start_as_current_span(
        scope["method"], context=propagate.extract(headers), kind=SpanKind.SERVER, record_exception=False
    ) as span:
        span.set_attribute("http.request.method", scope["method"])
        yield span


def finish_server_span(span: Any, method: str, route: str, status: int) -> None:
    if span is None:
        return
    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _queued_span(tracer: Tracer, job: Job) -> Any:
    """`job`'s wait in the queue, started (the caller ends it), in the trace its request began."""
    parent = propagate.extract(job.spec.trace_context or {})
    queued = tracer.start_span("lesa.job.queued", context=parent, start_time=_ns(job.created_at))
    queued.set_attributes({"lesa.job_id": job.id, "lesa.model": job.spec.model, "lesa.priority": job.spec.priority})
    return queued


def record_queue_timeout(tracer: Tracer, job: Job) -> None:
    """The wait of a job no worker took before its `queue_timeout_s` (the API failed it): its
    `lesa.job.queued` span, an error; it has no run."""
    queued = _queued_span(tracer, job)
    if job.error is not None:
        queued.set_status(Status(StatusCode.ERROR, f"{job.error.code}: {job.error.message}"))
    queued.end(end_time=_ns(max(job.completed_at or time.time(), job.created_at)))


def record_job(tracer: Tracer, job: Job, worker_id: str, started_at: float) -> None:
    """`job`'s spans in its own trace: its wait in the queue and this worker's run of it (from
    `started_at`, when this worker took it, to the stored end, or now if it has none)."""
    parent = propagate.extract(job.spec.trace_context or {})
    spec = job.spec
    _queued_span(tracer, job).end(end_time=_ns(max(started_at, job.created_at)))

    run = tracer.start_span("lesa.job.run", context=parent, start_time=_ns(started_at))
    attributes: dict[str, Any] = {
        "lesa.job_id": job.id, "lesa.kind": spec.kind, "lesa.model": spec.model, "lesa.level": spec.level,
        "lesa.method": spec.method, "lesa.steps": spec.num_inference_steps, "lesa.samples": spec.n,
        "lesa.worker": worker_id, "lesa.status": job.status.value, "lesa.attempt": job.attempts,
        "lesa.priority": spec.priority,
    }  # fmt: skip
    stats = job.result.lesa if job.result is not None else {}
    for key in (
        "full_steps",
        "predicted_steps",
        "batch_size",
        "realised_speedup",
        "generation_ms",
        "model_revision",
        "predictor",
    ):
        if stats.get(key) is not None:
            attributes[f"lesa.{key}"] = stats[key]
    run.set_attributes(attributes)
    if job.error is not None and job.status.value == "failed":
        run.set_status(Status(StatusCode.ERROR, f"{job.error.code}: {job.error.message}"))
    stage_start = stats.get("generation_started_at")
    if isinstance(stage_start, int | float):
        inside_run = trace.set_span_in_context(run)
        for stage, ms in (stats.get("stage_ms") or {}).items():
            span = tracer.start_span(f"lesa.stage.{stage}", context=inside_run, start_time=_ns(stage_start))
            span.set_attributes({"lesa.job_id": job.id, "lesa.stage": stage})
            stage_start += ms / 1000.0
            span.end(end_time=_ns(stage_start))
    run.end(end_time=_ns(job.completed_at or time.time()))
