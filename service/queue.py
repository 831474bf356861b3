"""The job queue: the one seam between the HTTP API and the workers that run generations.

Both sides talk only to `JobQueue`:

* the API (`service/routers/`) calls `submit`, `get`, `wait`, `list`, `cancel`, `delete`,
  `get_artifact`, `depth`, `ping`;
* a worker (`service/worker.py`, embedded in `lesa serve` or standalone as `lesa worker`) calls
  `claim_batch`, `set_progress`, `is_cancelled`, `complete`, `fail`; one that sends webhooks also
  `next_events`, `ack_event` (the outbox).

`InProcessJobQueue` (below) keeps everything in this process's memory: the default for
`lesa serve`, where the worker is an asyncio task of the same event loop. A Redis Streams
implementation (`service/redis_queue.py`) implements the same interface so that one API tier can
feed many worker processes; everything that crosses the interface is therefore serialisable:
`Job` and its parts are pydantic models (`model_dump_json` / `model_validate_json`) and outputs
are plain `bytes` keyed by a file name.

Contract details every implementation must honour (the tests in tests/test_service_queue.py
exercise them on `InProcessJobQueue`, and can be pointed at another implementation):

* Job ids are opaque strings, unique, URL-safe (`job_<hex>`); `created_at` etc. are Unix seconds.
* Status moves only forward: queued -> in_progress -> completed | failed | cancelled, or
  queued -> cancelled. A terminal job never changes again: `complete`/`fail`/`set_progress` on a
  cancelled job are silently ignored (a worker that finishes after a cancel must not resurrect
  it), so results are written idempotently.
* Idempotency: `submit(spec, idempotency_key=k)` twice with the same key returns the first job
  (no second generation) for as long as that job is kept.
* Backpressure: when `max_backlog` jobs are queued (not yet claimed), `submit` raises
  `QueueFull(retry_after_s)`; the API turns it into 429 + `Retry-After`. With
  `max_jobs_per_owner`, an owner (API key) with that many live jobs (queued or running) gets
  `TooManyJobs` (a `QueueFull`) instead: one key cannot fill the queue for everyone.
* Unavailability: a backend that cannot be reached raises `QueueUnavailable`; the API turns it
  into 503, `/readyz` reports it via `ping`.
* Priority: a job's `spec.priority` is "high", "normal" or "low". By default a worker takes the
  oldest job of the highest priority that has one queued: a higher class always goes first
  (strictly: a steady stream of "high" jobs holds the others back; their `queue_timeout_s` bounds
  the wait). With `priority_aging_s` a job goes before any job one class higher submitted more
  than that many seconds after it (`line_time`), so no class starves. `queue_position` counts the
  jobs a worker takes before this one, higher classes included.
* Batching: `claim_batch` returns jobs that share one `batch_key` (same model, kind, size,
  frames, steps, level, method, guidance, priority: a high-priority job never waits for a
  batch filled with lower ones), never more than `max_batch` samples in total unless a
  single job alone is larger (a job is never split), waiting at most `max_wait_ms` after the first
  job for compatible ones to arrive. (The in-process queue opens that window only when there is
  concurrency to exploit, so a lone client does not pay it; other backends may do the same.)
* Expiry: finished jobs (and their artifacts) are kept until `expires_at`, then forgotten.
* Uploads: a spec's `JobSpec.UPLOADS` (an edit's image and mask) reach the worker through
  `claim_batch`, and anyone else through `get_uploads`; `submit`, `get`, `wait` and `list` leave
  them out of the spec (`without_uploads`), since pollers and event streams read a job over and over.
  An image job's are forgotten when it ends; a video's are kept with it (a remix reuses its first frame).
* Outbox: with `outbox` set (a worker that sends webhooks sets it on its queue), every job end
  that `complete` / `fail` records, and every job given up after too many deliveries, is also kept
  as a `JobEvent` in the same step, until `ack_event`: the end and its event exist together or
  not at all. A cancel makes none (the client did it).
"""

from __future__ import annotations

import abc
import asyncio
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

# Shadow-checked PSNRs kept per LESA level (`record_quality`): what "auto" judges a level by once
# it has enough of them (LESA_AUTO_LIVE_MIN_CHECKS); the oldest drop out as new checks come.
QUALITY_WINDOW = 32

JobKind = Literal["image", "video"]
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")  # the order workers take them in


class JobStatus(StrEnum):
    """Lifecycle of a job; the values are the OpenAI video statuses plus `cancelled`."""

    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


class JobSpec(BaseModel):
    """What to generate, fully resolved by the API (no defaults left for the worker to guess).

    The API validates the request against the model catalogue and fills every field, so a worker
    in another process runs exactly what the client was promised (and the response can echo it).
    """

    kind: JobKind
    model: str
    prompt: str
    n: int = Field(1, ge=1, description="number of samples (images) this job produces")
    width: int
    height: int
    num_frames: int | None = None  # videos only
    fps: int | None = None  # videos only: playback rate of the encoded file
    num_inference_steps: int
    guidance_scale: float
    level: str  # resolved acceleration level ("none", "2x", ...): never "auto" here
    method: str  # resolved method ("none", "reuse", "taylorseer", "lesa")
    seed: int  # sample i uses seed + i
    output_format: str = "png"  # images: png | jpeg | webp; videos: mp4
    output_compression: int | None = None  # JPEG / WEBP quality 0-100 (None: JPEG 95, WEBP lossless)
    user: str | None = None
    # Previews of the image while it denoises (a streamed request's `partial_images`, 0-3); any
    # value batches with any other: each job gets its own.
    partial_images: int = Field(0, ge=0, le=3)
    priority: Priority = "normal"
    # Given pixels (`lesa_core.pipeline_types.Reference`), per job, so such jobs batch with any other:
    # an edit's image or a video's first frame (base64 PNG at the job's size), where it is
    # kept at every step (a mask as a PNG, white = keep; None: an image keeps nothing, a video its
    # first frame), and the step up to which the whole image follows it (an edit's strength).
    # The two PNGs are `UPLOADS`: the queue keeps them apart from the rest of the spec.
    reference_image: str | None = None
    reference_keep: str | None = None
    reference_follow_until: int = Field(0, ge=0)
    # Provenance, not what to generate (so never part of batch_key):
    owner: str | None = None  # a hash of the caller's API key (None without auth): only the owner sees the job
    request_hash: str | None = None  # fingerprint of the request body an Idempotency-Key came with
    raised_from: str | None = None  # the level asked for, when the API raised it under load (max_acceleration)
    remixed_from: str | None = None  # the video job whose settings and seed this one reran with a new prompt
    requested_acceleration: str | None = None  # what the request asked for ("auto", "5x"; the default if none)
    quality: str | None = None  # an image request's OpenAI `quality` as asked (echoed; it may have chosen the level)
    queue_timeout_s: float | None = None  # not started this long after created_at: fails, never runs
    trace_context: dict[str, str] | None = None  # W3C trace headers of the request (service/tracing.py)

    # Fields that can be MBs (a 1024x1024 RGB image as base64): the queue stores them beside the
    # job, and every read but a worker's claim leaves them out (`JobQueue.get_uploads`).
    UPLOADS: ClassVar[tuple[str, ...]] = ("reference_image", "reference_keep")

    def uploads(self) -> dict[str, str]:
        """The `UPLOADS` this job has."""
        return {name: value for name in self.UPLOADS if (value := getattr(self, name)) is not None}

    def without_uploads(self) -> JobSpec:
        """This spec as `get`, `list` and `wait` give it (itself if it has no uploads)."""
        return self.model_copy(update=dict.fromkeys(self.UPLOADS)) if self.uploads() else self

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can run as one batched generation (one pipeline call)."""
        return (
            self.kind,
            self.model,
            self.width,
            self.height,
            self.num_frames,
            self.num_inference_steps,
            self.level,
            self.method,
            self.guidance_scale,
            self.priority,
        )


class JobError(BaseModel):
    code: str = Field(description="machine-readable cause, e.g. `generation_failed`, `timeout`")
    message: str


class OutputRef(BaseModel):
    """One stored output file of a job; its bytes come from `JobQueue.get_artifact`."""

    name: str  # e.g. "0.png", "video.mp4", "thumbnail.png"
    content_type: str
    index: int = 0  # which sample of the job it belongs to
    variant: str = "primary"  # "primary" | "thumbnail" | "spritesheet" (videos)


class JobResult(BaseModel):
    outputs: list[OutputRef]
    # What actually ran, for the response's `lesa` object: level, method, full/predicted steps,
    # realised speed-up, generation/queue timings, seeds, batch size.
    lesa: dict[str, Any] = Field(default_factory=dict)


class Job(BaseModel):
    id: str
    spec: JobSpec
    status: JobStatus = JobStatus.queued
    progress: int = Field(0, ge=0, le=100, description="percent of denoising steps done")
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    error: JobError | None = None
    result: JobResult | None = None
    idempotency_key: str | None = None
    worker_id: str | None = None
    attempts: int = 0  # deliveries to a worker (Redis re-delivers after a crash)
    partials: int = 0  # partial images stored so far (`JobQueue.get_partial`, indices 0..partials-1)
    # Queued jobs of its model ahead of it (0: next), as `get` / `list` read it; None unless queued.
    queue_position: int | None = None


class QueueError(Exception):
    """Base of the errors the API maps to HTTP statuses."""


class QueueFull(QueueError):
    """The backlog limit is reached: answer 429 with `Retry-After: retry_after_s`."""

    def __init__(self, retry_after_s: int, message: str = "the job queue is full") -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class TooManyJobs(QueueFull):
    """The job's owner already has `max_jobs_per_owner` jobs queued or running."""


class QueueUnavailable(QueueError):
    """The queue backend cannot be reached (e.g. Redis down): answer 503. Its message says so
    whole ("the job queue (Redis at ...) is unavailable: ..."): the API shows it as is."""


class UnknownCursor(QueueError):
    """`list(after=...)` names a job that is gone (deleted, expired) or was never listed: job ids
    carry no creation time, so there is no position to continue from. The API answers 400 naming
    `after`; an empty last page instead ended a client's paging silently, jobs left unlisted."""


@dataclass(frozen=True)
class JobEvent:
    """A job's end, kept by the queue's outbox until a sender has delivered it."""

    job_id: str
    kind: str  # the job's JobKind
    status: str  # "completed" or "failed"
    at: float  # when the job ended (Unix seconds)
    receipt: str = ""  # the backend's handle for `ack_event`

    @property
    def id(self) -> str:
        """The event's id: one per job end, the same on every delivery (receivers de-duplicate by it)."""
        return f"evt_{self.job_id}"


# How far apart the classes are when priority is strict (`priority_aging_s` None): longer than any
# job waits, so every higher-class job goes first. Unix times stay far below it, and float64 still
# resolves a few microseconds at this size.
STRICT_PRIORITY_S = 1e10


def line_time(priority: Priority, created_at: float, aging_s: float | None) -> float:
    """When a queued job counts as submitted, for the order workers take jobs in (earliest first).

    Its creation time, moved `aging_s` earlier per class above "normal" and later per class below:
    a job goes before any job one class higher submitted more than `aging_s` after it, so no class
    waits for ever behind steady traffic of a higher one. None: strict priority."""
    step = STRICT_PRIORITY_S if aging_s is None else aging_s
    return created_at + (PRIORITIES.index(priority) - 1) * step


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def queue_timeout_error(job: Job, waited: float) -> JobError:
    """The error of a job that waited longer than its `queue_timeout_s` for a worker."""
    limit = job.spec.queue_timeout_s or 0.0
    return JobError(
        code="queue_timeout",
        message=f"no worker was free within queue_timeout_s ({limit:g} s; it waited {waited:.1f} s): it never ran",
    )


class JobQueue(abc.ABC):
    """Interface shared by the API and the workers. All methods are coroutines.

    Implementations must be safe to call concurrently from many API requests and (for shared
    backends) many worker processes. Methods raise `QueueUnavailable` when the backend is down.
    """

    # ---- API side -------------------------------------------------------------------------

    @abc.abstractmethod
    async def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> Job:
        """Enqueue a new job and return it (status `queued`).

        With `idempotency_key`, a second submit with the same key returns the existing job
        instead of enqueuing another. Raises `QueueFull` when `max_backlog` jobs are waiting, and
        `TooManyJobs` when `spec.owner` has `max_jobs_per_owner` live jobs (0: no limit; jobs
        without an owner have none).
        """

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The job's current record, or None if unknown or expired; a queued one with its
        `queue_position` (as `list` gives them)."""

    @abc.abstractmethod
    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """Wait until the job is terminal or `timeout_s` passes; return its record then.

        The caller checks `job.status.terminal` to tell completion from timeout. Returns None if
        the job is unknown.
        """

    @abc.abstractmethod
    async def list(
        self,
        *,
        kind: JobKind | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
        owner: str | None = None,
    ) -> tuple[list[Job], bool]:
        """`owner`'s jobs ordered by creation time, cursor-paginated like OpenAI lists.

        `after` is a job id: return the jobs that come after it in `order`; raises `UnknownCursor`
        if that job is gone. Returns the page and whether more jobs follow it. Jobs of other owners
        are never listed (None is the owner of every job when authentication is off).
        """

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; returns whether this call cancelled it.

        A queued job is never run. A running job is marked `cancelled` at once; its worker sees
        `is_cancelled` at the next denoising step and stops (or, in a batch with other live jobs,
        drops this job's outputs). Cancelling a terminal or unknown job changes nothing and returns
        False: of two racing cancels of one job exactly one returns True, the one the API counts.
        """

    @abc.abstractmethod
    async def fail_queued(self, job_id: str, error: JobError) -> bool:
        """Fail a job no worker has taken yet (its `queue_timeout_s` passed while it waited);
        returns whether this call failed it (False if unknown, taken or ended meanwhile)."""

    @abc.abstractmethod
    async def delete(self, job_id: str) -> bool:
        """Forget a terminal job and its artifacts. Returns False if unknown or still live."""

    @abc.abstractmethod
    async def spend(
        self, budgets: Sequence[str], per_unit_s: Sequence[float], costs: Sequence[float], window_s: float
    ) -> tuple[bool, list[float]]:
        """Rate-limit buckets kept with the queue's state (GCRA, `service/rate_limits.py`): move each
        budget's theoretical arrival time (at least now) on by cost x per_unit_s, on every budget or,
        if one would end more than `window_s` ahead of now, on none (negative costs, refunds, always
        apply). Returns whether it did, and how far each time is (would be) ahead of now."""

    @abc.abstractmethod
    async def get_uploads(self, job_id: str) -> dict[str, str]:
        """The job's `JobSpec.UPLOADS` that `get` / `list` / `wait` leave out ({} if it has none,
        or is unknown or expired)."""

    @abc.abstractmethod
    async def get_artifact(self, job_id: str, name: str) -> bytes | None:
        """Bytes of one output (`OutputRef.name`) of a completed job, or None."""

    @abc.abstractmethod
    async def get_partial(self, job_id: str, index: int) -> bytes | None:
        """Partial image `index` of a job (encoded like its outputs), or None."""

    @abc.abstractmethod
    async def depth(self, models: Collection[str] | None = None) -> int:
        """Number of jobs waiting to be claimed (the backlog), of `models` or of all."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return if the backend is usable; raise `QueueUnavailable` otherwise."""

    # ---- worker side ----------------------------------------------------------------------

    @abc.abstractmethod
    async def claim_batch(
        self,
        worker_id: str,
        *,
        max_batch: int,
        max_wait_ms: float,
        timeout_s: float,
        models: Collection[str] | None = None,
    ) -> list[Job]:
        """Claim the oldest queued job plus compatible ones (same `JobSpec.batch_key()`).

        Waits up to `timeout_s` for a first job (returns [] if none came), then up to
        `max_wait_ms` more for compatible jobs while the batch holds fewer than `max_batch`
        samples. Claimed jobs are `in_progress` with `started_at`, `worker_id` set. With `models`,
        only jobs for those models (what this worker has loaded); the others stay for workers that
        serve them.

        May be cancelled (a worker shutting down while idle): a cancelled claim must not lose
        jobs it had already taken (give them back, or leave them for redelivery).
        """

    @abc.abstractmethod
    async def set_progress(self, job_id: str, progress: int) -> None:
        """Record progress (0-100) of a running job; ignored once the job is terminal."""

    @abc.abstractmethod
    async def add_partial(self, job_id: str, index: int, data: bytes) -> None:
        """Store partial image `index` of a running job (ignored unless `in_progress`); kept as long
        as the job. A re-delivered job starts again from no partials."""

    @abc.abstractmethod
    async def is_cancelled(self, job_id: str) -> bool:
        """True once `cancel` was called for the job, or once its record is gone (DELETE on a
        cancelled job forgets it while the worker may still be on it): checked between steps."""

    @abc.abstractmethod
    async def complete(self, job_id: str, result: JobResult, artifacts: dict[str, bytes]) -> bool:
        """Store outputs and mark completed (sets `expires_at`); ignored if already terminal.

        Returns whether this call stored the result: False for a duplicate delivery that lost the
        race (or a job cancelled meanwhile), which workers must not count as a completion."""

    @abc.abstractmethod
    async def fail(self, job_id: str, error: JobError) -> bool:
        """Mark failed with a client-safe message; ignored if already terminal. Returns whether
        this call recorded the failure (as `complete`)."""

    # Called by `claim_batch` with a job it gave up on after `max_deliveries` deliveries (the
    # backend marks it failed itself): lets a worker count that failure. Backends without
    # re-delivery never call it.
    on_gave_up: Callable[[Job], None] | None = None

    # ---- outbox (webhooks) ----------------------------------------------------------------

    # Set by a worker that sends webhooks: job ends it records are then kept as JobEvents.
    outbox: bool = False

    @abc.abstractmethod
    async def next_events(self, consumer: str, *, limit: int, timeout_s: float, lease_s: float) -> list[JobEvent]:
        """Up to `limit` undelivered job events, oldest first, waiting up to `timeout_s` for one.

        An event handed to a consumer that does not `ack_event` it within `lease_s` (it died, or
        hangs) is handed out again, to whichever consumer asks: delivery is at least once.
        """

    @abc.abstractmethod
    async def ack_event(self, event: JobEvent) -> None:
        """`event` was delivered (or given up on): never hand it out again."""

    # ---- online quality (shadow checks) ---------------------------------------------------

    @abc.abstractmethod
    async def record_quality(self, model: str, level: str, psnrs: Sequence[float]) -> None:
        """Keep the PSNRs (vs full compute, at the quality card's settings) of a LESA level's shadow
        check: the latest `QUALITY_WINDOW` per (model, level), seen by every API process."""

    @abc.abstractmethod
    async def live_quality(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], list[float]]:
        """The kept PSNRs of each (model, level) in `keys` that has any, newest first."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release in memory
        """Release connections; the default has nothing to release."""


class InProcessJobQueue(JobQueue):
    """Everything in this process's memory, for one event loop (the server's).

    The embedded worker is an asyncio task in the same loop, so no locks are needed: every
    method runs between awaits without interleaving. Jobs are lost on restart (use Redis for
    durability).
    """

    def __init__(
        self,
        *,
        max_backlog: int = 256,
        result_ttl_s: float = 3600.0,
        max_jobs_kept: int = 1000,
        max_jobs_per_owner: int = 0,
        priority_aging_s: float | None = None,
    ):
        self.max_backlog = max_backlog
        self.max_jobs_per_owner = max_jobs_per_owner
        self.priority_aging_s = priority_aging_s
        self._live_by_owner: dict[str, set[str]] = {}
        self.result_ttl_s = result_ttl_s
        self.max_jobs_kept = max_jobs_kept
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # creation order
        self._pending: deque[str] = deque()
        self._artifacts: dict[str, dict[str, bytes]] = {}
        self._partials: dict[str, dict[int, bytes]] = {}
        self._by_key: dict[str, str] = {}
        self._done_events: dict[str, asyncio.Event] = {}
        self._arrival = asyncio.Event()  # set whenever a job is enqueued
        self._last_arrivals: deque[float] = deque(maxlen=2)  # monotonic times of the latest submits
        self._last_batch_jobs = 0  # jobs in the previous claimed batch
        # Seconds per claimed batch, smoothed: turns the backlog into a Retry-After estimate.
        self._batch_seconds = 1.0
        self._last_sweep = 0.0
        self._events: deque[JobEvent] = deque()  # the outbox; a consumer that takes one owns it
        self._event_arrival = asyncio.Event()
        self._quality: dict[tuple[str, str], deque[float]] = {}
        self._budgets: dict[str, float] = {}  # `spend`'s theoretical arrival times, by budget

    # ---- helpers --------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Forget expired jobs, and the oldest finished ones beyond `max_jobs_kept`.

        At most once a second: it scans every kept job, and runs on every API call.
        """
        now = time.time()
        if now - self._last_sweep < 1.0 and len(self._jobs) <= self.max_jobs_kept:
            return
        self._last_sweep = now
        expired = [j.id for j in self._jobs.values() if j.expires_at is not None and j.expires_at <= now]
        for job_id in expired:
            self._forget(job_id)
        if len(self._jobs) > self.max_jobs_kept:
            for job_id in [j.id for j in self._jobs.values() if j.status.terminal]:
                if len(self._jobs) <= self.max_jobs_kept:
                    break
                self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        self._artifacts.pop(job_id, None)
        self._partials.pop(job_id, None)
        self._done_events.pop(job_id, None)
        if job is not None and job.idempotency_key is not None:
            self._by_key.pop(job.idempotency_key, None)

    def _finish(self, job: Job, status: JobStatus) -> None:
        now = time.time()
        live = self._live_by_owner.get(job.spec.owner) if job.spec.owner is not None else None
        if live is not None:
            live.discard(job.id)
            if not live:  # one set per owner with live jobs, not per owner ever seen
                del self._live_by_owner[job.spec.owner]
        job.status = status
        job.completed_at = now
        job.expires_at = now + self.result_ttl_s
        if job.spec.kind != "video":  # an ended image's uploads are of no more use (videos: remix)
            job.spec = job.spec.without_uploads()
        if job.started_at is not None:
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (now - job.started_at)
        if self.outbox and status in (JobStatus.completed, JobStatus.failed):
            self._events.append(JobEvent(job.id, job.spec.kind, status.value, now))
            self._event_arrival.set()
        event = self._done_events.get(job.id)
        if event is not None:
            event.set()

    def _line_time(self, job: Job) -> float:
        return line_time(job.spec.priority, job.created_at, self.priority_aging_s)

    def _enqueue(self, job: Job) -> None:
        """Put a job in line by its `line_time` (after every job that counts as submitted no later),
        so the head of `_pending` is always the job to take next."""
        order = self._line_time(job)
        at = len(self._pending)
        while at > 0 and self._line_time(self._jobs[self._pending[at - 1]]) > order:
            at -= 1
        self._pending.insert(at, job.id)

    def _live(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        return None if job is None or job.status.terminal else job

    # ---- API side -------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, *, idempotency_key: str | None = None) -> Job:
        self._sweep()
        if idempotency_key is not None and idempotency_key in self._by_key:
            return self._positioned(self._jobs[self._by_key[idempotency_key]])
        if len(self._pending) >= self.max_backlog:
            # Time for the backlog to drain, assuming one batch at a time of one job each.
            raise QueueFull(math.ceil(len(self._pending) * self._batch_seconds))
        live = self._live_by_owner.setdefault(spec.owner, set()) if spec.owner is not None else None
        if live is not None and self.max_jobs_per_owner and len(live) >= self.max_jobs_per_owner:
            raise TooManyJobs(math.ceil(self._batch_seconds), f"{len(live)} jobs of this API key are queued or running")
        job = Job(id=new_job_id(), spec=spec, created_at=time.time(), idempotency_key=idempotency_key)
        if live is not None:
            live.add(job.id)
        self._jobs[job.id] = job
        self._done_events[job.id] = asyncio.Event()
        if idempotency_key is not None:
            self._by_key[idempotency_key] = job.id
        self._enqueue(job)
        self._last_arrivals.append(time.monotonic())
        self._arrival.set()
        return self._positioned(job)

    def _fresh(self, job_id: str) -> Job | None:
        """The job unless it has expired (checked per job: the full sweep is throttled)."""
        job = self._jobs.get(job_id)
        if job is not None and job.expires_at is not None and job.expires_at <= time.time():
            self._forget(job_id)
            return None
        return job

    async def get(self, job_id: str) -> Job | None:
        self._sweep()
        job = self._fresh(job_id)
        return self._positioned(job) if job is not None else None

    def _positioned(self, job: Job) -> Job:
        """The job as the API reads it: a copy without its uploads, a queued one with its place in
        line (the stored record has none)."""
        update: dict[str, Any] = {"spec": job.spec.without_uploads()}
        if job.status == JobStatus.queued:
            ahead = 0
            for job_id in self._pending:
                if job_id == job.id:
                    break
                ahead += self._jobs[job_id].spec.model == job.spec.model
            update["queue_position"] = ahead
        return job.model_copy(update=update)

    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        event = self._done_events.get(job_id)
        if event is not None and not job.status.terminal:
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                pass
        return self._positioned(self._jobs.get(job_id, job))

    async def list(
        self,
        *,
        kind: JobKind | None = None,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
        owner: str | None = None,
    ) -> tuple[list[Job], bool]:
        self._sweep()
        now = time.time()
        jobs = [
            j
            for j in self._jobs.values()
            if (kind is None or j.spec.kind == kind)
            and j.spec.owner == owner
            and (j.expires_at is None or j.expires_at > now)
        ]
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise UnknownCursor(after)
            jobs = jobs[ids.index(after) + 1 :]
        return [self._positioned(j) for j in jobs[:limit]], len(jobs) > limit

    async def cancel(self, job_id: str) -> bool:
        job = self._live(job_id)
        if job is None:
            return False
        if job_id in self._pending:  # (a job being gathered into a batch has left it already)
            self._pending.remove(job_id)
        self._finish(job, JobStatus.cancelled)
        return True

    async def delete(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None or not job.status.terminal:
            return False
        self._forget(job_id)
        return True

    async def spend(
        self, budgets: Sequence[str], per_unit_s: Sequence[float], costs: Sequence[float], window_s: float
    ) -> tuple[bool, list[float]]:
        now = time.time()
        tats = [max(self._budgets.get(b, 0.0), now) + c * u for b, c, u in zip(budgets, costs, per_unit_s, strict=True)]
        # (1e-6: times are Unix seconds as floats, whose sums miss a boundary by ~1e-7)
        spent = all(c <= 0 or t - now <= window_s + 1e-6 for t, c in zip(tats, costs, strict=True))
        if spent:
            self._budgets.update(zip(budgets, tats, strict=True))
            if len(self._budgets) > 10_000:  # forget budgets that are whole again
                self._budgets = {b: t for b, t in self._budgets.items() if t > now}
        return spent, [t - now for t in tats]

    async def get_uploads(self, job_id: str) -> dict[str, str]:
        self._sweep()
        job = self._fresh(job_id)
        return {} if job is None else job.spec.uploads()

    async def get_artifact(self, job_id: str, name: str) -> bytes | None:
        self._sweep()
        if self._fresh(job_id) is None:
            return None
        return self._artifacts.get(job_id, {}).get(name)

    async def get_partial(self, job_id: str, index: int) -> bytes | None:
        self._sweep()
        if self._fresh(job_id) is None:
            return None
        return self._partials.get(job_id, {}).get(index)

    async def depth(self, models: Collection[str] | None = None) -> int:
        if models is None:
            return len(self._pending)
        return sum(self._jobs[j].spec.model in models for j in self._pending)

    async def ping(self) -> None:
        return None

    # ---- worker side ----------------------------------------------------------------------

    def _first_pending(self, models: Collection[str] | None) -> str | None:
        return next((j for j in self._pending if models is None or self._jobs[j].spec.model in models), None)

    async def _wait_arrival(self, timeout_s: float) -> None:
        self._arrival.clear()
        try:
            await asyncio.wait_for(self._arrival.wait(), max(timeout_s, 0.0))
        except TimeoutError:
            pass

    async def claim_batch(
        self,
        worker_id: str,
        *,
        max_batch: int,
        max_wait_ms: float,
        timeout_s: float,
        models: Collection[str] | None = None,
    ) -> list[Job]:
        deadline = time.monotonic() + timeout_s
        while (head_id := self._first_pending(models)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await self._wait_arrival(remaining)

        self._pending.remove(head_id)
        head = self._jobs[head_id]
        batch, samples, key = [head], head.spec.n, head.spec.batch_key()

        def take_compatible() -> None:
            nonlocal samples
            for job_id in list(self._pending):
                if samples >= max_batch:
                    return
                job = self._jobs[job_id]
                if job.spec.batch_key() == key and samples + job.spec.n <= max_batch:
                    self._pending.remove(job_id)
                    batch.append(job)
                    samples += job.spec.n

        take_compatible()
        # Wait a little for compatible jobs only when there is room *and* there is concurrency to
        # gain from: the previous batch held several jobs, or another job arrived just before
        # this one. A lone client never pays the batching window (a fixed window cost it
        # max_wait_ms per request for nothing); under load the window opens on the first batch.
        now_m = time.monotonic()
        concurrent = self._last_batch_jobs > 1 or (
            len(self._last_arrivals) == 2 and self._last_arrivals[-1] - self._last_arrivals[0] <= max_wait_ms / 1000.0
        )
        wait_until = now_m + (max_wait_ms / 1000.0 if concurrent else 0.0)
        try:
            while samples < max_batch and (remaining := wait_until - time.monotonic()) > 0:
                await self._wait_arrival(remaining)
                take_compatible()
        except asyncio.CancelledError:
            # Shutting down mid-claim: put the jobs back in line, where they were.
            for job in batch:
                if job.status == JobStatus.queued:
                    self._enqueue(job)
            raise

        batch = [j for j in batch if j.status == JobStatus.queued]  # drop jobs cancelled meanwhile
        self._last_batch_jobs = len(batch)
        now = time.time()
        for job in batch:
            job.status = JobStatus.in_progress
            job.started_at = now
            job.worker_id = worker_id
            job.attempts += 1
        return batch

    async def set_progress(self, job_id: str, progress: int) -> None:
        job = self._live(job_id)
        if job is not None:
            job.progress = max(job.progress, min(100, max(0, int(progress))))

    async def add_partial(self, job_id: str, index: int, data: bytes) -> None:
        job = self._jobs.get(job_id)
        if job is not None and job.status == JobStatus.in_progress:
            self._partials.setdefault(job_id, {})[index] = data
            job.partials = max(job.partials, index + 1)

    async def is_cancelled(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is None or job.status == JobStatus.cancelled

    async def complete(self, job_id: str, result: JobResult, artifacts: dict[str, bytes]) -> bool:
        job = self._live(job_id)
        if job is None:
            return False
        self._artifacts[job_id] = dict(artifacts)
        job.result = result
        job.progress = 100
        self._finish(job, JobStatus.completed)
        return True

    async def fail(self, job_id: str, error: JobError) -> bool:
        job = self._live(job_id)
        if job is None:
            return False
        job.error = error
        self._finish(job, JobStatus.failed)
        return True

    async def fail_queued(self, job_id: str, error: JobError) -> bool:
        if job_id not in self._pending:  # taken (or being gathered into a batch: its worker judges it)
            return False
        self._pending.remove(job_id)
        return await self.fail(job_id, error)

    async def next_events(self, consumer: str, *, limit: int, timeout_s: float, lease_s: float) -> list[JobEvent]:
        # One process: a consumer that dies takes the whole queue with it, so there is no lease.
        if not self._events:
            self._event_arrival.clear()
            try:
                await asyncio.wait_for(self._event_arrival.wait(), timeout_s)
            except TimeoutError:
                return []
        return [self._events.popleft() for _ in range(min(limit, len(self._events)))]

    async def ack_event(self, event: JobEvent) -> None:
        pass  # taken events already left the outbox

    async def record_quality(self, model: str, level: str, psnrs: Sequence[float]) -> None:
        kept = self._quality.setdefault((model, level), deque(maxlen=QUALITY_WINDOW))
        kept.extendleft(float(p) for p in psnrs)

    async def live_quality(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], list[float]]:
        return {key: list(self._quality[key]) for key in keys if self._quality.get(key)}
