"""Job webhooks (`service/webhooks.py`): signed as OpenAI signs its own, so the official client
verifies them; retried with the same event id; required secret. The receiver is a real HTTP
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
from fastapi.testclient import TestClient
from openai import OpenAI
from pydantic import ValidationError
from service_support import make_engine, settings, wait_for

from service.app import create_app
from service.metrics import Metrics
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

    async def send(url: str) -> bool:
        sender = WebhookSender(url, SECRET, metrics, attempts=3, first_backoff_s=0.01)
        try:
            return await sender.deliver("video.completed", "video_123")
        finally:
            await sender.aclose()

    with receiver(fail_first=2) as (url, received):
        assert asyncio.run(send(url)) is True
        assert len(received) == 3 and len({h["webhook-id"] for h, _ in received}) == 1
        assert all(verified(h, b)["data"] == {"id": "video_123"} for h, b in received)
    with receiver(fail_first=99) as (url, received):
        assert asyncio.run(send(url)) is False
        assert len(received) == 3
    counts = [
        metrics.registry.get_sample_value("lesa_webhooks_total", {"type": "video.completed", "outcome": outcome})
        for outcome in ("delivered", "failed")
    ]
    assert counts == [1.0, 1.0]


def test_webhook_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="needs LESA_WEBHOOK_SECRET"):
        settings(webhook_url="http://127.0.0.1:9/hooks")
    with pytest.raises(ValidationError, match="http:// or https://"):
        settings(webhook_url="ftp://example/hooks", webhook_secret=SECRET)
