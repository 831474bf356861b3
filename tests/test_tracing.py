"""OpenTelemetry traces (`service/tracing.py`): one trace from the caller's `traceparent` through
the API and the queue to the worker's run of the job, with what ran; a failed job's run span is
an error. Spans go to the SDK's in-memory exporter."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from service_support import make_engine, settings, wait_for

from service.app import create_app
from service.tracing import make_tracer

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


@pytest.fixture
def traced() -> tuple[TestClient, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = settings()
    with TestClient(
        create_app(s, engine=make_engine(s, step_delay=0.005), tracer=provider.get_tracer("test"))
    ) as client:
        yield client, exporter


def test_a_request_is_one_trace_from_the_caller_through_the_queue_to_the_worker(traced) -> None:
    client, exporter = traced
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    body = {"prompt": "a seven", "n": 2, "acceleration": "5x", "num_inference_steps": 8, "priority": "high"}
    response = client.post("/v1/images/generations", json=body, headers=headers)
    assert response.status_code == 200, response.text
    job_id = response.json()["lesa"]["job_id"]
    client.get("/metrics")  # not traced
    spans = {s.name: s for s in exporter.get_finished_spans()}
    # the fake pipeline does not time its stages: one `pipeline` stage, then the PNG encoding
    stages = ["lesa.stage.pipeline", "lesa.stage.encode_output"]
    assert set(spans) == {"POST /v1/images/generations", "lesa.job.queued", "lesa.job.run", *stages}
    server, queued, run = spans["POST /v1/images/generations"], spans["lesa.job.queued"], spans["lesa.job.run"]
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {CALLER_TRACE}
    assert server.kind == SpanKind.SERVER and format(server.parent.span_id, "016x") == CALLER_SPAN
    assert server.attributes["http.route"] == "/v1/images/generations"
    assert server.attributes["http.response.status_code"] == 200
    assert queued.parent.span_id == run.parent.span_id == server.context.span_id
    assert queued.end_time <= run.start_time <= run.end_time <= server.end_time
    assert run.attributes["lesa.job_id"] == job_id and run.attributes["lesa.level"] == "5x"
    assert run.attributes["lesa.full_steps"] == 4 and run.attributes["lesa.predicted_steps"] == 4
    assert run.attributes["lesa.samples"] == 2 and run.attributes["lesa.status"] == "completed"
    assert run.attributes["lesa.priority"] == queued.attributes["lesa.priority"] == "high"
    assert run.status.status_code == StatusCode.UNSET
    # the stages: children of the run, end to end inside it, as long as the job says they took
    pipeline, encode = spans[stages[0]], spans[stages[1]]
    assert pipeline.parent.span_id == encode.parent.span_id == run.context.span_id
    assert run.start_time <= pipeline.start_time < pipeline.end_time == encode.start_time < encode.end_time
    assert encode.end_time <= run.end_time
    stage_ms = response.json()["lesa"]["stage_ms"]
    assert list(stage_ms) == ["pipeline", "encode_output"]
    assert (pipeline.end_time - pipeline.start_time) / 1e6 == pytest.approx(stage_ms["pipeline"], abs=0.01)


def test_a_failed_job_is_an_error_span(traced) -> None:
    client, exporter = traced
    job = client.post("/v1/images/jobs", json={"prompt": "explode"}).json()
    assert wait_for(client, f"/v1/images/jobs/{job['id']}", {"failed"})["status"] == "failed"
    (run,) = [s for s in exporter.get_finished_spans() if s.name == "lesa.job.run"]
    assert run.status.status_code == StatusCode.ERROR and "generation_failed" in run.status.description
    (server,) = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/images/jobs"]
    assert run.context.trace_id == server.context.trace_id  # no caller context: the API started the trace


def test_a_job_that_timed_out_in_the_queue_is_an_error_span(traced) -> None:
    client, exporter = traced
    blocker = client.post("/v1/images/jobs", json={"prompt": "busy", "num_inference_steps": 100}).json()  # 0.5 s
    late = client.post("/v1/images/jobs", json={"prompt": "late", "queue_timeout_s": 0.001}).json()
    # failed by the API when the client looked (the worker is busy): its wait is the error, no run
    assert wait_for(client, f"/v1/images/jobs/{late['id']}", {"failed"})["error"]["code"] == "queue_timeout"
    wait_for(client, f"/v1/images/jobs/{blocker['id']}", {"completed"})
    spans = exporter.get_finished_spans()
    runs = {s.attributes["lesa.job_id"]: s for s in spans if s.name == "lesa.job.run"}
    (waited,) = [s for s in spans if s.name == "lesa.job.queued" and s.attributes["lesa.job_id"] == late["id"]]
    assert waited.status.status_code == StatusCode.ERROR and "queue_timeout" in waited.status.description
    (post,) = [s for s in spans if s.name == "POST /v1/images/jobs" and s.context.span_id == waited.parent.span_id]
    assert late["id"] not in runs and runs[blocker["id"]].status.status_code == StatusCode.UNSET


def test_tracing_is_off_unless_asked_and_exports_where_the_otel_variables_say() -> None:
    assert type(make_tracer(settings(), "lesa-api")).__name__ == "NoOpTracer"
    tracer = make_tracer(settings(tracing="otlp"), "lesa-api")
    assert tracer.resource.attributes["service.name"] == "lesa-api"
