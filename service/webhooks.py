"""Job webhooks: a signed POST to `LESA_WEBHOOK_URL` when a video or an image job ends.

The event is OpenAI's webhook shape, signed as OpenAI signs its own (the Standard Webhooks scheme),
so a receiver verifies it with the official client unmodified:

    OpenAI(webhook_secret=SECRET).webhooks.verify_signature(body, headers)

    {"id": "evt_...", "object": "event", "created_at": 1764280000, "type": "video.completed",
     "data": {"id": "video_..."}}

Types: `video.completed`, `video.failed`, `image.job.completed`, `image.job.failed` (a cancel is
the client's own act: no event). Headers: `webhook-id` (the event id, the same on every retry, for
de-duplication), `webhook-timestamp` (Unix seconds), `webhook-signature` (`v1,` + base64 of
HMAC-SHA256 over `{id}.{timestamp}.{body}`; the key is the secret's base64 after `whsec_`, or its
bytes). A non-2xx answer or a transport error is retried with exponential back-off, up to
`LESA_WEBHOOK_ATTEMPTS` tries; each outcome is counted in `lesa_webhooks_total`.

Sent by the worker that recorded the job's end, after the record is stored; a worker killed
between the two loses that event (the job itself is never lost: a receiver that missed one
can still GET the job).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.queue import Job
    from service.settings import Settings

log = logging.getLogger("lesa.webhooks")

EVENT_TYPES = {
    ("video", "completed"): "video.completed",
    ("video", "failed"): "video.failed",
    ("image", "completed"): "image.job.completed",
    ("image", "failed"): "image.job.failed",
}


def sign(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header for one delivery."""
    key = base64.b64decode(secret[len("whsec_") :]) if secret.startswith("whsec_") else secret.encode()
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def webhook_sender(settings: Settings, metrics: Metrics) -> WebhookSender | None:
    """The sender `LESA_WEBHOOK_URL` asks for, or None."""
    if not settings.webhook_url or settings.webhook_secret is None:
        return None
    secret = settings.webhook_secret.get_secret_value()
    return WebhookSender(settings.webhook_url, secret, metrics, attempts=settings.webhook_attempts)


class WebhookSender:
    """Delivers job events in the background; `notify` never raises and never blocks the worker."""

    def __init__(
        self,
        url: str,
        secret: str,
        metrics: Metrics | None = None,
        *,
        attempts: int = 5,
        first_backoff_s: float = 1.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.url, self.secret, self.metrics = url, secret, metrics
        self.attempts, self.first_backoff_s = attempts, first_backoff_s
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self._tasks: set[asyncio.Task[bool]] = set()

    def notify(self, job: Job, outcome: str) -> None:
        """Send the event for `job` ending with `outcome` ("completed" or "failed")."""
        event_type = EVENT_TYPES.get((job.spec.kind, outcome))
        if event_type is None:
            return
        task = asyncio.get_running_loop().create_task(self.deliver(event_type, job.id), name=f"webhook-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, event_type: str, object_id: str) -> bool:
        """POST one event until a 2xx answer or out of attempts; True if delivered."""
        event_id = f"evt_{secrets.token_hex(12)}"
        body = json.dumps(
            {"id": event_id, "object": "event", "created_at": int(time.time()), "type": event_type,
             "data": {"id": object_id}},
            separators=(",", ":"),
        ).encode()  # fmt: skip
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.first_backoff_s * 2 ** (attempt - 1))
            timestamp = int(time.time())  # signed per try: a receiver refuses stale timestamps
            headers = {
                "content-type": "application/json",
                "webhook-id": event_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.secret, event_id, timestamp, body),
            }
            try:
                response = await self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as error:
                problem = f"{type(error).__name__}: {error}"
                continue
            if response.is_success:
                self._count(event_type, "delivered")
                return True
            problem = f"HTTP {response.status_code}"
        log.warning("webhook %s for %s not delivered after %d tries: %s", event_type, object_id, self.attempts, problem)
        self._count(event_type, "failed")
        return False

    def _count(self, event_type: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.webhooks.labels(event_type, outcome).inc()

    async def aclose(self, wait_s: float = 10.0) -> None:
        """Give events in flight `wait_s` to arrive (a worker shutting down), then close."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait_s)
        for task in set(self._tasks):
            task.cancel()
        await self._client.aclose()
