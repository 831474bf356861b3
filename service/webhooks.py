"""Job webhooks: a signed POST to `LESA_WEBHOOK_URL` when a video or an image job ends.

The event is OpenAI's webhook shape, signed as OpenAI signs its own (the Standard Webhooks scheme),
so a receiver verifies it with the official client unmodified:

    OpenAI(webhook_secret=SECRET).webhooks.verify_signature(body, headers)

    {"id": "evt_job_...", "object": "event", "created_at": 1764280000, "type": "video.completed",
     "data": {"id": "job_..."}}

Types: `video.completed`, `video.failed`, `image.job.completed`, `image.job.failed` (a cancel is
the client's own act: no event). `created_at` is when the job ended. Headers: `webhook-id` (the
event id: one per job end, the same on every retry and redelivery, for de-duplication),
`webhook-timestamp` (Unix seconds), `webhook-signature` (`v1,` + base64 of HMAC-SHA256 over
`{id}.{timestamp}.{body}`; the key is the secret's base64 after `whsec_`, or its bytes).

Delivery is at least once. A worker with a sender sets its queue's `outbox`: the script that
records a job's end also keeps the event (`JobQueue.next_events`), so the two exist together or
not at all. Every such worker runs `WebhookSender.run`, which takes events from the outbox, POSTs
each until a 2xx answer (a non-2xx answer or a transport error is retried with exponential
back-off, up to `LESA_WEBHOOK_ATTEMPTS` tries) and then acknowledges it. An event whose sender
dies is handed to another worker's sender once its lease (`lease_s`: every try and wait, plus a
margin) runs out; on Redis that includes events of a worker killed mid-delivery or before it
began. Each outcome is counted in `lesa_webhooks_total`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING

import httpx

from service.queue import JobEvent, JobQueue, QueueUnavailable

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.settings import Settings

log = logging.getLogger("lesa.webhooks")

EVENT_TYPES = {
    ("video", "completed"): "video.completed",
    ("video", "failed"): "video.failed",
    ("image", "completed"): "image.job.completed",
    ("image", "failed"): "image.job.failed",
}
LEASE_MARGIN_S = 30.0


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
    """Delivers a queue's job events (its outbox) to one URL, several at a time; never raises."""

    def __init__(
        self,
        url: str,
        secret: str,
        metrics: Metrics | None = None,
        *,
        attempts: int = 5,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = 10.0,
        max_in_flight: int = 16,
        lease_s: float | None = None,
    ) -> None:
        self.url, self.secret, self.metrics = url, secret, metrics
        self.attempts, self.first_backoff_s, self.max_backoff_s = attempts, first_backoff_s, max_backoff_s
        self.max_in_flight = max_in_flight
        # Another sender takes an event over only once this one has had time for all its tries.
        waits = sum(self._backoff(attempt) for attempt in range(1, attempts))
        self.lease_s = lease_s if lease_s is not None else waits + attempts * timeout_s + LEASE_MARGIN_S
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self._tasks: set[asyncio.Task[None]] = set()
        if metrics is not None:  # every series from 0, so that increase() sees the first failure
            for event_type in EVENT_TYPES.values():
                for outcome in ("delivered", "failed"):
                    metrics.webhooks.labels(event_type, outcome)

    def _backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** (attempt - 1))

    async def run(self, queue: JobQueue, consumer: str, stopping: asyncio.Event) -> None:
        """Deliver `queue`'s events as `consumer` until `stopping` is set (the worker's stop)."""
        down = False
        while not stopping.is_set():
            if len(self._tasks) >= self.max_in_flight:
                # (or until the stop: a dead receiver's retries must not hold up a worker's exit)
                stop = asyncio.ensure_future(stopping.wait())
                await asyncio.wait({*self._tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                continue
            try:
                events = await queue.next_events(
                    consumer, limit=self.max_in_flight - len(self._tasks), timeout_s=1.0, lease_s=self.lease_s
                )
            except QueueUnavailable as error:
                if not down:
                    log.warning("webhooks paused: %s", error)
                down = True
                await asyncio.sleep(1.0)
                continue
            except Exception:  # noqa: BLE001 - a bug here must not end every later delivery
                log.exception("webhook outbox read failed; retrying in 1 s")
                await asyncio.sleep(1.0)
                continue
            down = False
            for event in events:
                task = asyncio.get_running_loop().create_task(self._send(queue, event), name=f"webhook-{event.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, queue: JobQueue, event: JobEvent) -> None:
        await self.deliver(event)
        try:
            await queue.ack_event(event)
        except QueueUnavailable:
            pass  # its lease runs out and it is delivered again, under the same webhook-id

    async def deliver(self, event: JobEvent) -> bool:
        """POST one event until a 2xx answer or out of attempts; True if delivered."""
        event_type = EVENT_TYPES.get((event.kind, event.status))
        if event_type is None:
            return False
        body = json.dumps(
            {"id": event.id, "object": "event", "created_at": int(event.at), "type": event_type,
             "data": {"id": event.job_id}},
            separators=(",", ":"),
        ).encode()  # fmt: skip
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self._backoff(attempt))
            timestamp = int(time.time())  # signed per try: a receiver refuses stale timestamps
            headers = {
                "content-type": "application/json",
                "webhook-id": event.id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.secret, event.id, timestamp, body),
            }
            try:
                response = await self._client.post(self.url, content=body, headers=headers)
            except Exception as error:  # noqa: BLE001 - HTTPError, and an invalid URL (InvalidURL is not one)
                problem = f"{type(error).__name__}: {error}"
                continue
            if response.is_success:
                self._count(event_type, "delivered")
                return True
            problem = f"HTTP {response.status_code}"
        log.warning(
            "webhook %s for %s not delivered after %d tries: %s", event_type, event.job_id, self.attempts, problem
        )
        self._count(event_type, "failed")
        return False

    def _count(self, event_type: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.webhooks.labels(event_type, outcome).inc()

    async def aclose(self, wait_s: float = 10.0) -> None:
        """Give deliveries in flight `wait_s` to finish (a worker shutting down), then close. What
        is still unacknowledged stays in the outbox for another sender (on Redis)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=wait_s)
        for task in set(self._tasks):
            task.cancel()
        await self._client.aclose()
