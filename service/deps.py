"""What the routers depend on, injected through FastAPI's `Depends` (tests swap any part).

`Services` is built once per app by `create_app` and stored on `app.state`; routers never
import module-level singletons, so several apps (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from opentelemetry import trace
from opentelemetry.trace import Tracer
from pydantic import BaseModel

from service import tracing
from service.engine import theoretical_speedup
from service.errors import ApiError, shown
from service.links import signed_owner, signing_key
from service.metrics import Metrics
from service.queue import (
    Job,
    JobQueue,
    JobSpec,
    JobStatus,
    QueueFull,
    QueueUnavailable,
    TooManyJobs,
    queue_timeout_error,
)
from service.rate_limits import Charge, RateLimiter, job_costs
from service.settings import Settings
from service.tracing import current_context


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    queue: JobQueue | None = None
    engine: Any = None  # service.engine.Engine once loaded
    worker: Any = None
    startup_error: str | None = None
    on_startup_failure: Callable[[str], None] | None = None
    background: list[Any] = field(default_factory=list)
    tracer: Tracer = field(default_factory=trace.NoOpTracer)

    @property
    def ready(self) -> bool:
        return self.engine is not None and bool(getattr(self.engine, "ready", False)) and self.queue is not None


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread
# pool, and those thread hops were most of the server's per-request overhead under load.


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


# Declares the scheme to OpenAPI (/docs gets its Authorize button); the check is require_api_key's,
# so a missing key is this API's 401 body, not FastAPI's 403.
_BEARER = HTTPBearer(auto_error=False, description="an API key of `LESA_API_KEYS` (needed only when it is set)")


async def require_api_key(
    request: Request,
    services: ServicesDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None,
) -> None:
    """Bearer auth on /v1/*, only when `LESA_API_KEYS` is set (off for the local demo)."""
    keys = services.settings.api_key_set
    if not keys:
        return
    owner = signed_owner(signing_key(keys), request)  # a link the API handed out (service/links.py)
    if owner is not None:
        request.state.signed_owner = owner
        return
    token = _bearer_token(request)
    # compare_digest: no timing side channel on how much of a key matched
    # compared as bytes: compare_digest refuses non-ASCII str, which made such a token a 500
    given = token.encode("utf-8", "surrogateescape")
    if not token or not any(hmac.compare_digest(given, k.encode()) for k in keys):
        raise ApiError(
            401,
            "missing or invalid API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def get_owner(request: Request, services: ServicesDep) -> str | None:
    """Who owns the jobs this request creates or reads: a hash of its API key, None without auth.

    Jobs and Idempotency-Keys are per owner, so one key's clients never see another key's
    prompts, results or video list (the key itself is never stored)."""
    if not services.settings.api_key_set:
        return None
    if getattr(request.state, "signed_owner", None) is not None:  # a signed link: its owner's job
        return request.state.signed_owner
    return key_owner(_bearer_token(request))


def key_owner(key: str) -> str:
    """The owner id of an API key's jobs (what they record instead of the key)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)  # asked on every "high" request: derived once per key set
def _owners_of(keys: frozenset[str]) -> frozenset[str]:
    return frozenset(key_owner(k) for k in keys)


OwnerDep = Annotated[str | None, Depends(get_owner)]


async def require_ready(services: ServicesDep) -> Services:
    """Generation endpoints need loaded models: 503 (retry later) while starting or broken."""
    if services.startup_error is not None:
        raise ApiError(503, f"server failed to start: {services.startup_error}", type="server_error",
                       code="not_ready")  # fmt: skip
    if not services.ready:
        raise ApiError(503, "models are still loading; retry shortly", type="server_error", code="not_ready",
                       headers={"Retry-After": "5"})  # fmt: skip
    return services


ReadyDep = Annotated[Services, Depends(require_ready)]
# per owner and job kind (see `submit`); its length is checked with the other request fields
IdempotencyKey = Annotated[
    str | None,
    Header(max_length=255, description="Retrying with the same key returns the same job instead of a new one."),
]


Body = TypeVar("Body", bound=BaseModel)


LIVE_QUALITY_REFRESH_S = 5.0  # how stale the shadow-check figures "auto" judges levels by may be


async def refresh_live_quality(services: Services) -> None:
    """Give the engine the queue's latest shadow-check figures, at most every LIVE_QUALITY_REFRESH_S
    (one read for every API process's view; the queue is what the workers write them to)."""
    engine, queue = services.engine, services.queue
    if not services.settings.auto_live_min_checks or queue is None:
        return
    now = time.monotonic()
    if now - engine.live_psnr_at < LIVE_QUALITY_REFRESH_S:
        return
    keys = [(name, level) for name, entry in engine.models.items() for level in entry.bundles]
    try:
        live = await queue.live_quality(keys)
    except QueueUnavailable:
        return  # judged by the figures it had; the request itself meets the outage next
    engine.set_live_quality(live, now)


async def resolve_for_load(services: Services, body: Body, resolve: Callable[[Body], JobSpec]) -> JobSpec:
    """The request's job; when the queue is long (LESA_LOAD_QUEUE_DEPTH) and the request allows it
    (`max_acceleration`), the same job at that faster level, so it waits less instead of more.

    The engine validated `max_acceleration` with the request, so resolving at it cannot fail here.
    """
    await refresh_live_quality(services)  # "auto" judges levels by them
    spec = resolve(body)
    max_level = getattr(body, "max_acceleration", None)
    if max_level is None:
        return spec
    assert services.queue is not None
    try:
        busy = await services.queue.depth([spec.model]) >= services.settings.load_queue_depth
    except QueueUnavailable as down:
        raise unavailable(services, down) from None
    if not busy:
        return spec
    fast = resolve(body.model_copy(update={"acceleration": max_level, "seed": spec.seed}))
    steps = spec.num_inference_steps
    if theoretical_speedup(fast.level, steps) <= theoretical_speedup(spec.level, steps):
        return spec  # e.g. 2x and 5x both run 4 full steps of 8: nothing to gain
    return fast.model_copy(update={"raised_from": spec.level})  # counted by `submit` once it is a job


async def with_given_pixels(
    services: Services,
    spec: JobSpec,
    image: bytes,
    mask: bytes | None = None,
    strength: float | None = None,
    *,
    variation: bool = False,
) -> JobSpec:
    """`Engine.given_pixels` in a thread: decoding and resizing a large photo takes up to a second
    (4096x4096: 0.5-0.9 s here), which on the event loop stalled every other request, poll and
    event stream meanwhile. Once per request, after its level is resolved."""
    return await asyncio.to_thread(services.engine.given_pixels, spec, image, mask, strength, variation=variation)


async def submit(
    services: Services,
    spec: JobSpec,
    owner: str | None,
    idempotency_key: str | None = None,
    request: BaseModel | None = None,
) -> Job:
    """Enqueue `owner`'s job, mapping backpressure and backend failures to 429 / 503.

    An Idempotency-Key is scoped to its owner and to the job kind (an image key never finds a
    video), and remembers the request it came with: the same key with another body is a 422,
    not the first job's result (IETF draft-ietf-httpapi-idempotency-key-header).
    """
    assert services.queue is not None
    high_keys = services.settings.high_priority_key_set
    if spec.priority == "high" and high_keys and owner not in _owners_of(high_keys):
        raise ApiError(403, 'priority "high" is reserved to some API keys (LESA_HIGH_PRIORITY_KEYS); this key may '
                       'ask for "normal" or "low"', param="priority", code="priority_not_allowed")  # fmt: skip
    spec = spec.model_copy(update={"owner": owner, "trace_context": current_context()})
    charge = await charge_rate_limits(services, spec)
    try:
        job, made = await _enqueue(services, spec, idempotency_key, request)
    except BaseException:
        if charge is not None:  # no job was made: the key keeps its budget
            await _refund(services, spec)
        raise
    if charge is not None:
        if not made:  # an Idempotency-Key's replay: its job was charged when it was made
            await _refund(services, spec)
        elif (headers := RESPONSE_HEADERS.get()) is not None:
            headers.update(charge.headers())
    return job


async def _enqueue(
    services: Services, spec: JobSpec, idempotency_key: str | None, request: BaseModel | None
) -> tuple[Job, bool]:
    """`submit`'s job, and whether this call made it (False: a replay of its Idempotency-Key)."""
    assert services.queue is not None
    owner = spec.owner
    scoped_key = None
    if idempotency_key is not None:
        if not idempotency_key.strip():
            raise ApiError(400, "the Idempotency-Key header is empty: send a unique key per request, or no header",
                           param="Idempotency-Key", code="invalid_idempotency_key")  # fmt: skip
        body = request.model_dump_json() if request is not None else spec.model_dump_json()
        spec = spec.model_copy(update={"request_hash": hashlib.sha256(body.encode()).hexdigest()[:32]})
        scoped_key = f"{owner or '-'}|{spec.kind}|{idempotency_key}"
    submitted_at = time.time()
    try:
        job = await services.queue.submit(spec, idempotency_key=scoped_key)
        if (
            job.created_at < submitted_at  # a replay of the key ...
            and job.spec.request_hash == spec.request_hash
            and job.error is not None
            and job.error.code == "queue_timeout"  # ... whose job never ran: the retry runs it
            and await services.queue.delete(job.id)
        ):
            job = await services.queue.submit(spec, idempotency_key=scoped_key)
    except TooManyJobs as full:
        limit = services.settings.max_jobs_per_key
        raise ApiError(
            429,
            f"too many jobs: {full} (LESA_MAX_JOBS_PER_KEY={limit}); retry after {full.retry_after_s} s, "
            "once one of them has finished",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(full.retry_after_s)},
        ) from None
    except QueueFull as full:
        raise ApiError(
            429,
            f"the server is busy ({full}); retry after {full.retry_after_s} s",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(full.retry_after_s)},
        ) from None
    except QueueUnavailable as down:
        raise unavailable(services, down) from None
    if job.spec.request_hash != spec.request_hash:
        raise ApiError(
            422,
            f"Idempotency-Key {idempotency_key!r} was already used for a different request (job {job.id}); "
            "send a new key for a new request",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    made = job.created_at >= submitted_at  # else a replay of its Idempotency-Key
    if spec.raised_from is not None and made:
        services.metrics.load_raised.labels(spec.model, spec.level).inc()
    return job, made


# The headers a request's answer carries besides its body (the rate limits' x-ratelimit-*): the
# middleware puts a fresh dict here for each request and adds what the handlers left in it.
RESPONSE_HEADERS: ContextVar[dict[str, str] | None] = ContextVar("lesa_response_headers", default=None)


def rate_limiter(services: Services) -> RateLimiter:
    assert services.queue is not None
    settings = services.settings
    limits = {"requests": settings.requests_per_minute_per_key, "steps": settings.steps_per_minute_per_key}
    return RateLimiter(limits, services.queue)


async def charge_rate_limits(services: Services, spec: JobSpec) -> Charge | None:
    """Charge the job to its owner's per-minute budgets (`service/rate_limits.py`); None without
    limits or without an owner. 429 with Retry-After once a budget is spent, 400 for a job that costs
    more than a whole minute's budget."""
    limiter = rate_limiter(services)
    if not limiter.enabled or spec.owner is None:
        return None
    costs = job_costs(spec)
    for name, per_minute in limiter.limits.items():
        if costs[name] > per_minute:
            raise ApiError(400, f"this request costs {costs[name]:g} {name} (full steps x images), more than this "
                           f"API key's {per_minute} per minute (LESA_{name.upper()}_PER_MINUTE_PER_KEY): ask for "
                           "fewer images, fewer steps or a higher acceleration", param="n" if spec.n > 1 else
                           "acceleration", code="request_too_large")  # fmt: skip
    try:
        charge = await limiter.charge(spec.owner, costs)
    except QueueUnavailable as down:
        raise unavailable(services, down) from None
    if not charge.allowed:
        retry = max(1, math.ceil(charge.retry_after_s))
        refused_by = [s for s in charge.limits if s.retry_after_s > 0]
        for state in refused_by:
            services.metrics.rate_limited.labels(state.name).inc()
        spent = ", ".join(f"{s.limit} {s.name}" for s in refused_by)
        raise ApiError(429, f"rate limit reached: this API key may spend {spent} per minute; retry after {retry} s",
                       type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(retry), **charge.headers()})  # fmt: skip
    return charge


async def _refund(services: Services, spec: JobSpec) -> None:
    assert spec.owner is not None
    try:
        await rate_limiter(services).refund(spec.owner, job_costs(spec))
    except QueueUnavailable:
        pass  # the request fails anyway; the budget fills again within a minute


async def cancel(services: Services, job: Job) -> Job:
    """Cancel a live job and count it, here and only here (not by each worker that held it); returns
    its record after the cancel."""
    assert services.queue is not None
    # Counted only by the call the queue says cancelled it: two DELETEs of one job (a client
    # retrying, two API replicas) can both have read it live, and both used to count it.
    if await services.queue.cancel(job.id):
        services.metrics.jobs.labels(job.spec.model, "cancelled").inc()
    return await services.queue.get(job.id) or job


# How often a request waiting for its job checks whether its client is still there.
DISCONNECT_POLL_S = 0.5
Disconnected = Callable[[], Awaitable[bool]]  # `Request.is_disconnected`


async def client_gone(services: Services, job: Job, *, keep: bool) -> ApiError:
    """What to do when the client of a request waiting for `job` went away: cancel the job, since
    nobody can collect its result (the openai client retries a timed-out request as a new one, and
    each abandoned try used to run to the end), unless `keep` (the request had an Idempotency-Key:
    its retry collects this job). The error is for the log: nobody reads the answer."""
    if keep:
        return ApiError(499, f"the client went away; job {job.id} continues (Idempotency-Key)", code="client_closed")
    await cancel(services, job)
    return ApiError(499, f"the client went away; job {job.id} was cancelled", code="client_closed")


async def wait_while_connected(
    services: Services, job: Job, timeout_s: float, disconnected: Disconnected, *, keep: bool = False
) -> Job:
    """`job`'s record once it is terminal or `timeout_s` has passed; raises 499 (`client_gone`) if
    the client goes away first, 503 if the queue is down."""
    assert services.queue is not None
    deadline = time.monotonic() + timeout_s
    try:
        while not job.status.terminal:
            if await disconnected():
                raise await client_gone(services, job, keep=keep)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            latest = await services.queue.wait(job.id, min(DISCONNECT_POLL_S, remaining))
            if latest is None:  # deleted meanwhile (another request cancelled, then deleted it)
                raise ApiError(409, f"job {job.id} was cancelled and deleted", code="cancelled",
                               extra={"job_id": job.id}, headers={"x-should-retry": "false"})  # fmt: skip
            job = await fail_if_late(services, latest)
    except QueueUnavailable as down:
        raise unavailable(services, down) from None
    return job


def failed_job_error(job: Job) -> ApiError:
    """What a request waiting for `job` answers when the job failed: 503 + Retry-After when it
    never ran (`queue_timeout`: a retry may find a free worker), else 500 with the job's error."""
    message = job.error.message if job.error else "generation failed"
    if job.error is not None and job.error.code == "queue_timeout":
        retry = str(math.ceil(job.spec.queue_timeout_s or 1))
        return ApiError(503, message, type="server_error", code="queue_timeout", extra={"job_id": job.id},
                        headers={"Retry-After": retry})  # fmt: skip
    return ApiError(500, message, type="server_error", code="generation_failed", extra={"job_id": job.id})


def unavailable(services: Services, error: Exception) -> ApiError:
    return ApiError(503, str(error), type="server_error", code="queue_unavailable",
                    headers={"Retry-After": "5"})  # fmt: skip


async def read_job(services: Services, job_id: str) -> Job | None:
    """A job as the API shows it (`queue.get`), failed first if it is still queued past its
    `queue_timeout_s`: workers judge a job when they take it, and a client polling or waiting for
    one must not wait on for a worker instead (it asked for an error in time)."""
    assert services.queue is not None
    job = await services.queue.get(job_id)
    return await fail_if_late(services, job) if job is not None else None


async def fail_if_late(services: Services, job: Job) -> Job:
    """`job`, or its record failed with `queue_timeout` if it waited for a worker past its deadline."""
    assert services.queue is not None
    limit = job.spec.queue_timeout_s
    waited = time.time() - job.created_at
    if job.status != JobStatus.queued or limit is None or waited <= limit:
        return job
    failed = await services.queue.fail_queued(job.id, queue_timeout_error(job, waited))
    record = await services.queue.get(job.id) or job
    if failed:  # counted and traced once, by whoever failed it
        services.metrics.jobs.labels(job.spec.model, "failed").inc()
        services.metrics.errors.labels(type="queue_timeout").inc()
        tracing.record_queue_timeout(services.tracer, record)
    return record


async def get_job(services: Services, job_id: str, kind: str, owner: str | None, param: str = "id") -> Job:
    """`owner`'s job of this kind, or 404 (another owner's job is answered as unknown)."""
    try:
        job = await read_job(services, job_id)
    except QueueUnavailable as down:
        raise unavailable(services, down) from None
    if job is None or job.spec.kind != kind or job.spec.owner != owner:
        raise ApiError(404, f"no {kind} job {shown(job_id)} (unknown or expired)", param=param, code="not_found")
    return job
