"""Job webhooks (`service/webhooks.py`): signed as OpenAI signs its own, so the official client
verifies them; retried with the same event id; sent by another worker when the one that
recorded the job died first (real Redis); required secret. The receiver is a real HTTP
server (stdlib, a thread of this process)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import test_service_queue as contract
from fastapi.testclient import TestClient
from openai import OpenAI
from pydantic import ValidationError
from service_support import free_port, make_engine, settings, wait_for
from test_redis_support import REDIS_URL, cleanup_prefix, needs_redis, new_prefix

from service.app import create_app
from service.metrics import Metrics
from service.queue import InProcessJobQueue, JobEvent, JobResult
from service.redis_queue import RedisJobQueue
from service.webhooks import WebhookSender

SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHM="  # base64 of "secret-key-for-tests"


@contextmanager
def receiver(fail_first: int = 0) -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A webhook receiver answering 500 to its first `fail_first` requests, then 204."""
    received: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(500 if len(received) <= fail_first else 204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks", received
    finally:
        server.shutdown()
        thread.join(timeout=10)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def verified(headers: dict[str, str], body: bytes) -> dict:
    """The event, after the official openai client has checked its signature."""
    OpenAI(api_key="unused", webhook_secret=SECRET).webhooks.verify_signature(body, headers)
    return json.loads(body)


def test_job_ends_are_posted_signed_as_openai_signs_its_webhooks() -> None:
    with receiver() as (url, received):
        s = settings(webhook_url=url, webhook_secret=SECRET)
        with TestClient(create_app(s, engine=make_engine(s))) as client:
            video = client.post("/v1/videos", json={"prompt": "a five", "num_frames": 4}).json()
            assert wait_for(client, f"/v1/videos/{video['id']}", {"completed"})["status"] == "completed"
            wait_until(lambda: len(received) == 1)
            event = verified(*received[0])
            assert event["type"] == "video.completed" and event["data"] == {"id": video["id"]}
            assert event["object"] == "event" and event["id"] == received[0][0]["webhook-id"]

            failed = client.post("/v1/images/jobs", json={"prompt": "explode"}).json()
            wait_for(client, f"/v1/images/jobs/{failed['id']}", {"failed"})
            wait_until(lambda: len(received) == 2)
            event = verified(*received[1])
            assert event["type"] == "image.job.failed" and event["data"] == {"id": failed["id"]}
            metrics = client.get("/metrics").text
            assert 'lesa_webhooks_total{outcome="delivered",type="video.completed"} 1.0' in metrics
            # A forged or altered event does not verify.
            headers, body = received[0]
            with pytest.raises(Exception, match="signature"):
                verified(headers, body.replace(video["id"].encode(), b"video_forged"))


def test_a_refused_event_is_retried_with_the_same_id_then_given_up() -> None:
    metrics = Metrics()
    event = JobEvent("job_123", "video", "completed", at=1764280000.5)

    async def send(url: str) -> bool:
        sender = WebhookSender(url, SECRET, metrics, attempts=3, first_backoff_s=0.01)
        try:
            return await sender.deliver(event)
        finally:
            await sender.aclose()

    with receiver(fail_first=2) as (url, received):
        assert asyncio.run(send(url)) is True
        assert len(received) == 3 and {h["webhook-id"] for h, _ in received} == {"evt_job_123"}
        assert all(verified(h, b)["data"] == {"id": "job_123"} for h, b in received)
        assert verified(*received[0])["created_at"] == 1764280000  # when the job ended
    with receiver(fail_first=99) as (url, received):
        assert asyncio.run(send(url)) is False
        assert len(received) == 3
    counts = [
        metrics.registry.get_sample_value("lesa_webhooks_total", {"type": "video.completed", "outcome": outcome})
        for outcome in ("delivered", "failed")
    ]
    assert counts == [1.0, 1.0]


@needs_redis
def test_an_event_its_worker_took_and_never_delivered_is_sent_by_another_worker() -> None:
    """Worker "a" recorded a job's end (and so its event), took the event and was killed before
    delivering it: worker "b"'s sender delivers it, under the same webhook-id, once its lease ran out."""
    prefix = new_prefix()

    async def scenario(url: str) -> str:
        a, b = RedisJobQueue(REDIS_URL, prefix=prefix), RedisJobQueue(REDIS_URL, prefix=prefix)
        a.outbox = True
        job = await a.submit(contract.spec(kind="video"))
        await a.claim_batch("a", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert await a.complete(job.id, JobResult(outputs=[]), {})
        assert len(await a.next_events("a", limit=10, timeout_s=1, lease_s=0.5)) == 1  # then "a" dies
        sender, stopping = WebhookSender(url, SECRET, lease_s=0.5), asyncio.Event()
        sending = asyncio.create_task(sender.run(b, "b", stopping))
        deadline = time.monotonic() + 10
        while not await _outbox_empty(b) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stopping.set()
        await sending
        await sender.aclose()
        await a.close()
        await b.close()
        return job.id

    try:
        with receiver() as (url, received):
            job_id = asyncio.run(scenario(url))
            assert len(received) == 1
            event = verified(*received[0])
            assert event["id"] == f"evt_{job_id}" and event["type"] == "video.completed"
            assert event["data"] == {"id": job_id}
    finally:
        cleanup_prefix(prefix)


async def _outbox_empty(queue: RedisJobQueue) -> bool:
    """Nothing left to send: no event in the stream, none taken and unacknowledged."""
    return await queue._redis.xlen(queue.k_outbox) == 0


def test_webhook_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="needs LESA_WEBHOOK_SECRET"):
        settings(webhook_url="http://127.0.0.1:9/hooks")
    with pytest.raises(ValidationError, match="http:// or https://"):
        settings(webhook_url="ftp://example/hooks", webhook_secret=SECRET)
    with pytest.raises(ValidationError, match="after whsec_ must come base64"):  # not at the first event
        settings(webhook_url="http://127.0.0.1:9/hooks", webhook_secret="whsec_not base64!")


def test_a_dead_receiver_neither_stops_deliveries_silently_nor_holds_up_a_stop() -> None:
    """Every try fails (nothing listens; an invalid URL too): each event is counted as failed, and a
    worker stopping while its deliveries back off between tries leaves at once."""
    metrics = Metrics()
    for url in (f"http://127.0.0.1:{free_port()}/hooks", "http://[::1/hooks"):
        sender = WebhookSender(url, SECRET, metrics, attempts=2, first_backoff_s=0.01)
        assert asyncio.run(sender.deliver(JobEvent("job_1", "image", "completed", at=1.0))) is False
        asyncio.run(sender.aclose())
    assert (
        metrics.registry.get_sample_value("lesa_webhooks_total", {"type": "image.job.completed", "outcome": "failed"})
        == 2
    )

    async def stop_while_backing_off() -> float:
        queue = InProcessJobQueue()
        queue.outbox = True
        for i in range(2):
            job = await queue.submit(contract.spec(seed=i))
            await queue.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
            await queue.complete(job.id, JobResult(outputs=[]), {})
        sender = WebhookSender(f"http://127.0.0.1:{free_port()}/hooks", SECRET, attempts=20, first_backoff_s=10.0,
                               max_in_flight=1)  # fmt: skip
        stopping = asyncio.Event()
        sending = asyncio.create_task(sender.run(queue, "w", stopping))
        await asyncio.sleep(0.5)  # the first event is backing off, the second waits for room
        stopping.set()
        started = time.monotonic()
        await sending
        await sender.aclose(wait_s=0.1)
        return time.monotonic() - started

    assert asyncio.run(stop_while_backing_off()) < 2.0
