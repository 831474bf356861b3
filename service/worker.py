"""The worker loop: claim a batch of compatible jobs, run it in a thread, store the results.

The same class runs embedded in `lesa serve` (an asyncio task next to the HTTP server, with the
in-process queue) and standalone in `lesa worker` processes (with the Redis queue): it only
talks to the `JobQueue` interface and to the engine.

Per batch:
* the generation runs in a dedicated thread so the event loop keeps answering HTTP (and the
  progress/cancel monitor below keeps running);
* after every denoising step the thread records progress and asks whether to go on; a monitor
  coroutine publishes progress to the queue and polls cancellation flags. When every job of the
  batch is cancelled the next step callback returns False and the pipeline stops. A cancelled job
  sharing a batch with live ones just has its outputs dropped (the others must not pay for it);
* a batch of several jobs that fails is retried job by job, so one bad job (or an out-of-memory
  batch) does not fail its neighbours; a job that fails alone is marked failed with its message,
  and the worker keeps serving.

Online quality (`shadow_fraction`, LESA_SHADOW_FRACTION): that share of accelerated jobs (at the
step count and guidance of their level's quality card, where it has one: `Engine.shadow_eligible`) is rerun at
full compute after its result is stored, and the PSNR between the two is exported
(`lesa_shadow_psnr_db`) next to the level's quality card (`lesa_quality_card_psnr_db`), so drift
from what the benchmark measured is seen in production, not only offline. Checks run only when
no job is waiting (a claim came back empty), and a job that arrives meanwhile abandons the check
at its next step (counted as preempted); at most SHADOW_BACKLOG wait, further ones are dropped
and counted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Tracer

from lesa_core.pipeline_types import GenerationCancelled
from service import tracing
from service.metrics import Metrics
from service.queue import Job, JobError, JobQueue, JobResult, JobSpec, QueueUnavailable, queue_timeout_error
from service.webhooks import WebhookSender

log = logging.getLogger("lesa.worker")

CANCEL_POLL_S = 0.05  # how often a running batch checks its jobs' cancellation flags
PROGRESS_MIN_INTERVAL_S = 0.02
# Progress is republished unchanged this often: it carries the delivery's heartbeat (Redis), which
# must not stop while a batch sits at one percentage (a long VAE decode after the last step).
PROGRESS_REPEAT_S = 1.0
SHADOW_BACKLOG = 4  # accelerated jobs waiting for their shadow quality check
SHADOW_IDLE_S = 0.05


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        engine: Any,  # service.engine.Engine: run_batch, and quality_cards / shadow_* for the checks
        metrics: Metrics,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        worker_id: str | None = None,
        claim_timeout_s: float = 1.0,
        shadow_fraction: float = 0.0,
        models: Collection[str] | None = None,
        webhooks: WebhookSender | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """`models`: the models this worker can run (the engine's); it claims only their jobs, so
        pools serving different models can share one queue. None: any job (single-pool tests).
        `webhooks`: job ends this worker records are kept in the queue's outbox, and this worker's
        sender delivers the outbox's events (`service/webhooks.py`). `tracer`: records each job's
        spans in its request's trace (`service/tracing.py`)."""
        self.queue = queue
        self.engine = engine
        self.metrics = metrics
        queue.on_gave_up = self._gave_up
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_timeout_s = claim_timeout_s
        self.shadow_fraction = shadow_fraction
        self.models = sorted(models) if models is not None else None
        self.webhooks = webhooks
        self.tracer = tracer or trace.NoOpTracer()
        if webhooks is not None:
            queue.outbox = True
        self._shadows: deque[tuple[str, JobSpec, Any]] = deque()  # (job id, spec, its samples)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lesa-gen")
        self._stopping = asyncio.Event()
        self._claim_task: asyncio.Task[list[Job]] | None = None
        self.batches_run = 0

    def stop(self) -> None:
        """Finish the current batch, then leave `run` (graceful shutdown).

        A worker idle in `claim_batch` leaves at once: the claim is cancelled, and queues must
        give back whatever a cancelled claim had taken (see `JobQueue.claim_batch`).
        """
        self._stopping.set()
        if self._claim_task is not None and not self._claim_task.done():
            self._claim_task.cancel()

    async def run(self) -> None:
        log.info("worker %s: models=%s max_batch=%d max_wait_ms=%g shadow_fraction=%g", self.worker_id,
                 ",".join(self.models) if self.models is not None else "any", self.max_batch, self.max_wait_ms,
                 self.shadow_fraction)  # fmt: skip
        for model, level, method, psnr in self.engine.quality_cards():
            self.metrics.card_psnr.labels(model, level, method).set(psnr)
        for model in self.models or ():
            self.metrics.serves.labels(model).set(1)
        sending = None
        if self.webhooks is not None:
            sending = asyncio.create_task(self.webhooks.run(self.queue, self.worker_id, self._stopping))
        try:
            await self._loop()
        finally:
            for model in self.models or ():
                self.metrics.serves.labels(model).set(0)
            self._stopping.set()
            if sending is not None:
                await sending
                await self.webhooks.aclose()
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        down_since: float | None = None  # the queue backend's current outage, if any
        while not self._stopping.is_set():
            try:
                await self.run_once()
                if down_since is not None:
                    log.warning("job queue reachable again after %.0f s", time.monotonic() - down_since)
                    down_since = None
            except asyncio.CancelledError:
                raise
            except QueueUnavailable as error:  # Redis down: one warning and one error count per outage
                if down_since is None:
                    down_since = time.monotonic()
                    self.metrics.errors.labels(type="worker_loop").inc()
                    log.warning("%s; retrying every second", error)
                await asyncio.sleep(1.0)
            except Exception:  # noqa: BLE001 - a bug in the loop: retry, don't die
                self.metrics.errors.labels(type="worker_loop").inc()
                log.exception("worker loop error; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def run_once(self) -> int:
        """Claim and process at most one batch; returns how many jobs it held."""
        # With shadow checks pending, "idle" means no job within SHADOW_IDLE_S, not a whole claim timeout.
        timeout_s = min(self.claim_timeout_s, SHADOW_IDLE_S) if self._shadows else self.claim_timeout_s
        self._claim_task = asyncio.create_task(
            self.queue.claim_batch(
                self.worker_id,
                max_batch=self.max_batch,
                max_wait_ms=self.max_wait_ms,
                timeout_s=timeout_s,
                models=self.models,
            )
        )
        try:
            jobs = await self._claim_task
        except asyncio.CancelledError:
            if self._stopping.is_set():  # stop() while idle
                return 0
            raise
        finally:
            self._claim_task = None
        if not jobs:
            if self._shadows and not self._stopping.is_set():
                await self._shadow_check(*self._shadows.popleft())
            return 0
        await self.process(jobs)
        return len(jobs)

    async def process(self, jobs: Sequence[Job]) -> None:
        first = jobs[0].spec
        for job in jobs:
            if job.started_at is not None:
                self.metrics.queue_wait.labels(first.model, first.level, first.priority).observe(
                    max(0.0, job.started_at - job.created_at)
                )
        live = await self._fail_late(jobs)
        if len(live) < len(jobs):
            await self._trace([job for job in jobs if job not in live])
        jobs = live
        if not jobs:
            return
        self.metrics.in_flight.inc(len(jobs))
        try:
            try:
                await self._generate(jobs)
            except QueueUnavailable:
                # The queue failed, not the generation: storing a failure would fail the jobs for good
                # (or fail too). They stay pending and are redelivered once the queue is back.
                raise
            except Exception as error:  # noqa: BLE001
                if len(jobs) > 1:
                    log.warning("batch of %d failed (%s); retrying job by job", len(jobs), error)
                    for job in jobs:
                        await self._generate_or_fail([job])
                else:
                    await self._fail(jobs, error)
        finally:
            self.metrics.in_flight.dec(len(jobs))
            self.batches_run += 1
            await self._trace(jobs)

    async def _trace(self, jobs: Sequence[Job]) -> None:
        """Each job's spans, from its record as stored (its end, result or error)."""
        if not tracing.is_on(self.tracer):
            return
        for job in jobs:
            try:
                record = await self.queue.get(job.id)
            except QueueUnavailable:
                return  # spans are not worth waiting for Redis
            if record is not None:
                tracing.record_job(self.tracer, record, self.worker_id, job.started_at or time.time())

    async def _fail_late(self, jobs: Sequence[Job]) -> list[Job]:
        """The jobs to run: one first started after its `queue_timeout_s` fails instead, never run
        (its client would rather have an error than a late result)."""
        live = []
        for job in jobs:
            limit, waited = job.spec.queue_timeout_s, (job.started_at or time.time()) - job.created_at
            # A redelivered job was taken in time by a worker that died: the deadline was met, and
            # failing it now would lose work the client was promised. It runs again.
            if limit is None or waited <= limit or job.attempts > 1:
                live.append(job)
                continue
            if await self.queue.fail(job.id, queue_timeout_error(job, waited)):
                self.metrics.jobs.labels(job.spec.model, "failed").inc()
                self.metrics.errors.labels(type="queue_timeout").inc()
        return live

    def _gave_up(self, job: Job) -> None:
        """A job that no worker could finish in `max_deliveries` tries (each crashed or hung)."""
        log.error("job %s failed: %s", job.id, job.error.message if job.error else "max deliveries exceeded")
        self.metrics.errors.labels(type="max_deliveries_exceeded").inc()
        self.metrics.jobs.labels(job.spec.model, "failed").inc()

    async def _generate_or_fail(self, jobs: Sequence[Job]) -> None:
        try:
            await self._generate(jobs)
        except QueueUnavailable:
            raise  # as in process: not the jobs' failure
        except Exception as error:  # noqa: BLE001
            await self._fail(jobs, error)

    async def _fail(self, jobs: Sequence[Job], error: Exception) -> None:
        log.error("generation failed for %s: %s", ", ".join(j.id for j in jobs), error, exc_info=error)
        self.metrics.errors.labels(type="generation_failed").inc()
        message = f"generation failed: {type(error).__name__}: {error}"[:500]
        for job in jobs:
            # Counted only where the failure is recorded: not for a job cancelled meanwhile, nor
            # for a duplicate delivery whose twin already finished it.
            if await self.queue.fail(job.id, JobError(code="generation_failed", message=message)):
                self.metrics.jobs.labels(job.spec.model, "failed").inc()

    async def _generate(self, jobs: Sequence[Job]) -> None:
        loop = asyncio.get_running_loop()
        specs = [j.spec for j in jobs]
        cancelled: set[str] = set()
        stop_flag = threading.Event()  # read by the generation thread between steps
        progress_signal = asyncio.Event()
        latest: list[int] = [0, 1]  # (done, total) of the running generation

        last_signal = [0.0]

        def on_step(done: int, total: int) -> bool:
            # Runs in the generation thread: only cheap, thread-safe work here. Waking the event
            # loop costs a syscall and a context switch, so fast steps wake it at most every 20 ms
            # (the monitor polls anyway); slow steps, the ones users watch, wake it every step.
            latest[0], latest[1] = done, total
            now = time.monotonic()
            if now - last_signal[0] >= PROGRESS_MIN_INTERVAL_S:
                last_signal[0] = now
                loop.call_soon_threadsafe(progress_signal.set)
            return not stop_flag.is_set()

        stored: list[concurrent.futures.Future[None]] = []

        def on_partial(index: int, partial: int, data: bytes) -> None:
            # Generation thread: hand the partial image to the loop; it is stored before the
            # job completes (awaited below), so a stream never misses one that was made.
            stored.append(asyncio.run_coroutine_threadsafe(self.queue.add_partial(jobs[index].id, partial, data), loop))

        finished = False

        async def monitor() -> None:
            # Ends on the `finished` flag, not by cancellation: on Python 3.11 `wait_for` can
            # swallow a cancel that races with its inner wait completing, which would hang here.
            published, published_at = -1, 0.0
            down_since: float | None = None  # the queue's current outage: logged at its start and end
            while not finished:
                try:
                    await asyncio.wait_for(progress_signal.wait(), CANCEL_POLL_S)
                except TimeoutError:
                    pass
                progress_signal.clear()
                try:
                    for job in jobs:
                        if job.id not in cancelled and await self.queue.is_cancelled(job.id):
                            cancelled.add(job.id)
                    if len(cancelled) == len(jobs):
                        stop_flag.set()
                    # Keep 100 for "completed": the last step is not the end (encoding follows).
                    percent = min(99, int(100 * latest[0] / max(latest[1], 1)))
                    if percent != published or time.monotonic() - published_at >= PROGRESS_REPEAT_S:
                        for job in jobs:
                            if job.id not in cancelled:
                                await self.queue.set_progress(job.id, percent)
                        published, published_at = percent, time.monotonic()
                    if down_since is not None:
                        log.warning("batch %s: progress recorded again after %.1f s",
                                    [j.id for j in jobs], time.monotonic() - down_since)  # fmt: skip
                        down_since = None
                except QueueUnavailable as error:
                    # A blip must not end the watch: cancels, progress and the delivery's heartbeat
                    # (sent with progress) carry on at the next poll.
                    if down_since is None:
                        down_since = time.monotonic()
                        log.warning("batch %s: progress not recorded (%s); retrying at every step",
                                    [j.id for j in jobs], error)  # fmt: skip

        monitor_task = asyncio.create_task(monitor())
        started = time.time()
        partials = (on_partial,) if any(s.partial_images for s in specs) else ()
        try:
            results = await loop.run_in_executor(self._executor, self.engine.run_batch, specs, on_step, *partials)
        except Exception:
            if stop_flag.is_set():  # the pipeline stopped because every job was cancelled
                # (counted by the API that cancelled them: once, even if a job ran on two workers)
                log.info("batch %s cancelled at step %d/%d", [j.id for j in jobs], latest[0], latest[1])
                return
            raise
        finally:
            finished = True
            progress_signal.set()  # wake the monitor now rather than at its next poll
            try:
                await asyncio.wait_for(monitor_task, timeout=10 * CANCEL_POLL_S + 5)
            except (TimeoutError, Exception):  # noqa: BLE001 - the monitor only reports progress
                monitor_task.cancel()
        generation_s = time.time() - started
        for kind, seconds in (results[0].step_seconds if results else {}).items():
            histogram = self.metrics.step_time.labels(specs[0].model, specs[0].level, kind)
            for value in seconds:
                histogram.observe(value)
        stage_ms = results[0].lesa.get("stage_ms") if results else None
        for stage, ms in (stage_ms or {}).items():
            self.metrics.stage_time.labels(specs[0].model, specs[0].level, stage).observe(ms / 1000.0)
        for future in stored:
            try:
                await asyncio.wrap_future(future)
            except Exception as error:  # noqa: BLE001 - a lost preview must not fail the job
                log.warning("a partial image was not stored: %s: %s", type(error).__name__, error)
        self.metrics.batch_size.labels(first_model := specs[0].model).observe(sum(s.n for s in specs))
        self.metrics.generation_time.labels(first_model, specs[0].level).observe(generation_s)

        for job, result in zip(jobs, results, strict=True):
            spec = job.spec
            if job.id in cancelled or await self.queue.is_cancelled(job.id):
                continue  # its outputs are dropped; the API counted the cancellation
            now = time.time()
            lesa = dict(result.lesa)
            lesa.update(
                job_id=job.id,
                queue_ms=round(1000.0 * max(0.0, (job.started_at or started) - job.created_at), 2),
                total_ms=round(1000.0 * (now - job.created_at), 2),
            )
            if not await self.queue.complete(job.id, JobResult(outputs=result.outputs, lesa=lesa), result.artifacts):
                # A re-delivered job that another worker finished first (or cancelled meanwhile):
                # its result was discarded, so it is not a second completion in the metrics.
                log.info("job %s: result discarded (already finished elsewhere)", job.id)
                continue
            labels = (spec.model, spec.level)
            self.metrics.e2e_latency.labels(*labels).observe(now - job.created_at)
            self.metrics.steps.labels(*labels, "full").inc(spec.n * int(lesa.get("full_steps") or 0))
            self.metrics.steps.labels(*labels, "predicted").inc(spec.n * int(lesa.get("predicted_steps") or 0))
            if lesa.get("realised_speedup") is not None:
                self.metrics.speedup.labels(*labels, spec.method).observe(float(lesa["realised_speedup"]))
            self.metrics.jobs.labels(spec.model, "completed").inc()
            self._maybe_shadow(job.id, spec, result.samples)  # the spec as claimed: an ended job's has no uploads

    def _maybe_shadow(self, job_id: str, spec: JobSpec, samples: Any) -> None:
        if not self.shadow_fraction or samples is None or random.random() >= self.shadow_fraction:
            return
        if not self.engine.shadow_eligible(spec):
            return
        if len(self._shadows) >= SHADOW_BACKLOG:
            self.metrics.shadow_checks.labels(spec.model, spec.level, "dropped").inc()
            return
        self._shadows.append((job_id, spec, samples.copy()))  # a copy: the batch's array is freed

    async def _shadow_check(self, job_id: str, spec: JobSpec, samples: Any) -> None:
        """Rerun one accelerated job at full compute and export the PSNR between the two.

        Users come first: a job that arrives meanwhile (or a stop) abandons the check at the next
        denoising step, counted as `preempted`, so nobody waits for more than a step of it.
        """
        loop = asyncio.get_running_loop()
        abandon = threading.Event()

        async def watch() -> None:
            while not abandon.is_set():
                await asyncio.sleep(CANCEL_POLL_S)
                try:
                    if self._stopping.is_set() or await self.queue.depth(self.models) > 0:
                        abandon.set()
                except QueueUnavailable:
                    abandon.set()

        watcher = asyncio.create_task(watch())
        try:
            psnrs = await loop.run_in_executor(
                self._executor, self.engine.shadow_psnr, spec, samples, lambda *_: not abandon.is_set()
            )
        except GenerationCancelled:
            self.metrics.shadow_checks.labels(spec.model, spec.level, "preempted").inc()
            return
        except Exception as error:  # noqa: BLE001 - a failed check must not stop the worker
            log.warning("shadow check of job %s failed: %s: %s", job_id, type(error).__name__, error)
            self.metrics.shadow_checks.labels(spec.model, spec.level, "failed").inc()
            return
        finally:
            abandon.set()
            await watcher
        for psnr in psnrs:
            self.metrics.shadow_psnr.labels(spec.model, spec.level, spec.method).observe(psnr)
        self.metrics.shadow_checks.labels(spec.model, spec.level, "done").inc()
        if spec.method == "lesa":  # what "auto" judges the level by (LESA_AUTO_LIVE_MIN_CHECKS)
            try:
                await self.queue.record_quality(spec.model, spec.level, psnrs)
            except QueueUnavailable:
                log.warning("shadow check of job %s: the queue is down, its PSNR was not recorded", job_id)
        log.info("shadow check of job %s (%s %s %s, %d steps): PSNR vs full compute %s dB", job_id, spec.model,
                 spec.level, spec.method, spec.num_inference_steps, ", ".join(f"{p:.2f}" for p in psnrs))  # fmt: skip
