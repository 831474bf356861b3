"""RedisJobQueue against the real Redis on 127.0.0.1:6379 (no workers, no HTTP: the queue's own
guarantees). Each test uses its own key prefix and deletes it afterwards."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_service_queue as contract
from redis.exceptions import ConnectionError as RedisConnectionError
from test_redis_support import REDIS_URL, cleanup_prefix, free_port, needs_redis, new_prefix, start_redis_server

from service.queue import JobError, JobResult, JobSpec, JobStatus, OutputRef, QueueFull, QueueUnavailable, UnknownCursor
from service.redis_queue import RedisJobQueue, RedisQueueSettings
from service.settings import Settings

pytestmark = needs_redis


@pytest.fixture
def prefix() -> Iterator[str]:
    p = new_prefix()
    yield p
    cleanup_prefix(p)


def spec(**overrides: object) -> JobSpec:
    return contract.spec(**overrides)


def result(tag: str) -> JobResult:
    return JobResult(outputs=[OutputRef(name="0.png", content_type="image/png")], lesa={"tag": tag})


def test_jobqueue_contract_holds_for_redis(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same contract tests the in-process queue passes (tests/test_service_queue.py)."""
    counter = iter(range(1000))
    monkeypatch.setattr(
        contract, "make_queue", lambda **kw: RedisJobQueue(REDIS_URL, prefix=f"{prefix}-{next(counter)}", **kw)
    )
    for name in dir(contract):
        if name.startswith("test_"):
            getattr(contract, name)()


def test_redelivery_after_visibility_timeout_first_result_wins_then_max_deliveries(prefix: str) -> None:
    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=0.3, max_deliveries=2)
        job = await q.submit(spec())
        (first,) = await q.claim_batch("a", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert first.attempts == 1 and first.worker_id == "a"
        # "a" goes silent (no progress heartbeat): after the timeout "b" is handed the same job.
        assert await q.claim_batch("b", max_batch=1, max_wait_ms=0, timeout_s=0.1) == []
        await q.set_progress(job.id, 42)  # "a" got 42% of the way before going silent
        await q.add_partial(job.id, 0, b"a's preview")
        await asyncio.sleep(0.4)
        (second,) = await q.claim_batch("b", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert second.id == job.id and second.attempts == 2 and second.worker_id == "b"
        assert second.progress == 0 and second.partials == 0  # "b" starts it again from the first step
        # Both deliveries finish: the first stored result wins, the late one is only acknowledged.
        # (complete() says which call stored it: workers count only that one as a completion)
        assert await q.complete(job.id, result("b"), {"0.png": b"B"}) is True
        assert await q.complete(job.id, result("a"), {"0.png": b"A"}) is False
        done = await q.get(job.id)
        assert done.status == JobStatus.completed and done.result.lesa["tag"] == "b"
        assert await q.get_artifact(job.id, "0.png") == b"B"
        r = q._redis
        assert 0 < await r.pttl(q._k_partial(job.id)) <= 1000 * q.result_ttl_s  # expires with the job
        assert await r.xlen(q.stream_for("m")) == 0 and (await r.xpending(q.stream_for("m"), q.group))["pending"] == 0

        # A job whose every delivery is abandoned fails after max_deliveries, with the last error,
        # and the worker that found it so is told (to count the failure).
        gave_up: list[str] = []
        q.on_gave_up = lambda job: gave_up.append(job.id)
        doomed = await q.submit(spec(seed=7))
        await q.claim_batch("a", max_batch=1, max_wait_ms=0, timeout_s=1)
        await q.add_partial(doomed.id, 0, b"a preview")
        await asyncio.sleep(0.4)
        (again,) = await q.claim_batch("b", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert again.attempts == 2
        await asyncio.sleep(0.4)
        assert await q.claim_batch("c", max_batch=1, max_wait_ms=0, timeout_s=0.3) == []
        failed = await q.get(doomed.id)
        assert failed.status == JobStatus.failed and failed.error.code == "max_deliveries_exceeded"
        assert "2 deliveries" in failed.error.message and "abandoned" in failed.error.message
        assert gave_up == [doomed.id]
        assert 0 < await r.pttl(q._k_partial(doomed.id)) <= 1000 * q.result_ttl_s  # expires with the job
        assert await r.xlen(q.stream_for("m")) == 0
        await q.close()

    asyncio.run(scenario())


def test_a_job_end_event_whose_sender_died_is_handed_out_again_after_its_lease(prefix: str) -> None:
    """The webhook outbox: an event taken and never acknowledged (its worker was killed mid-delivery)
    goes to another sender once its lease runs out; a job given up on is an event too."""

    async def scenario() -> None:
        a = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=0.3, max_deliveries=1)
        b = RedisJobQueue(REDIS_URL, prefix=prefix)
        a.outbox = True
        job = await a.submit(spec())
        await a.claim_batch("a", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert await a.complete(job.id, result("a"), {})
        (taken,) = await a.next_events("a", limit=10, timeout_s=1, lease_s=0.3)
        assert (taken.job_id, taken.status) == (job.id, "completed")
        # "a" dies holding it: while its lease runs nobody else is handed it, then "b" is.
        assert await b.next_events("b", limit=10, timeout_s=0.05, lease_s=0.3) == []
        await asyncio.sleep(0.4)
        (again,) = await b.next_events("b", limit=10, timeout_s=1, lease_s=0.3)
        assert again == taken
        await b.ack_event(again)
        await asyncio.sleep(0.4)
        assert await b.next_events("b", limit=10, timeout_s=0.05, lease_s=0.3) == []

        # A job no delivery finished is failed by the claim that finds it so: that is an event too.
        doomed = await a.submit(spec(seed=7))
        await a.claim_batch("a", max_batch=1, max_wait_ms=0, timeout_s=1)
        await asyncio.sleep(0.4)
        assert await a.claim_batch("c", max_batch=1, max_wait_ms=0, timeout_s=0.3) == []
        (gave_up,) = await b.next_events("b", limit=10, timeout_s=1, lease_s=0.3)
        assert (gave_up.job_id, gave_up.kind, gave_up.status) == (doomed.id, "image", "failed")
        await b.ack_event(gave_up)
        assert await a._redis.xlen(a.k_outbox) == 0
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_heartbeat_keeps_a_slow_job_and_a_reclaimed_entry_is_never_started_twice(prefix: str) -> None:
    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=0.4)
        job = await q.submit(spec())
        await q.claim_batch("slow", max_batch=1, max_wait_ms=0, timeout_s=1)
        for step in range(6):  # 0.6 s of work, longer than the timeout, with a heartbeat per step
            await asyncio.sleep(0.1)
            await q.set_progress(job.id, 10 * (step + 1))
        assert await q.claim_batch("thief", max_batch=1, max_wait_ms=0, timeout_s=0.2) == []
        assert (await q.get(job.id)).progress == 60

        # An entry held (delivered, not started) by a worker that stalls goes to another worker;
        # the stalled one then cannot start it.
        a = await q.submit(spec(seed=1))
        b = await q.submit(spec(seed=2, width=64))  # incompatible with a: stays in "w1"'s carry-over
        await q.complete(job.id, result("x"), {})
        (got,) = await q.claim_batch("w1", max_batch=2, max_wait_ms=0, timeout_s=1)
        assert got.id == a.id
        for step in range(5):  # w1 runs `a` (heartbeating) but sits on `b` past the timeout
            await asyncio.sleep(0.1)
            await q.set_progress(a.id, 10 * (step + 1))
        (stolen,) = await q.claim_batch("w2", max_batch=2, max_wait_ms=0, timeout_s=1)
        assert stolen.id == b.id and stolen.worker_id == "w2"
        # w1 finishes `a` and stops: it hands back what it holds, but never `b`, which w2 reclaimed
        # and runs (it used to make `b` idle again: a third worker started it a second time)
        await q.complete(a.id, result("a"), {})
        await q.release("w1")
        q._last_reclaim = 0.0  # w3's claim reclaims at once
        assert await q.claim_batch("w3", max_batch=2, max_wait_ms=0, timeout_s=0.05) == []
        assert (await q.get(b.id)).attempts == 1
        await q.set_progress(b.id, 10)  # w2 is working on it (its heartbeat), as below
        assert await q.claim_batch("w1", max_batch=2, max_wait_ms=0, timeout_s=0.2) == []
        assert (await q.get(b.id)).attempts == 1
        await q.close()

    asyncio.run(scenario())


def test_a_claim_cancelled_while_starting_its_batch_hands_the_jobs_on_at_once(prefix: str) -> None:
    """SIGTERM cancels a worker's claim; if that lands while the batch is being started, the jobs
    already started must not wait out the visibility timeout (5 minutes by default)."""

    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=300)
        jobs = [await q.submit(spec(seed=i)) for i in range(3)]
        original, calls = q._start, 0

        async def start_then_sigterm(**kwargs: object) -> object:
            nonlocal calls
            calls += 1
            outcome = await original(**kwargs)
            if calls == 2:  # two of three started, the cancellation lands before the third
                asyncio.current_task().cancel()
                await asyncio.sleep(0)
            return outcome

        q._start = start_then_sigterm
        with pytest.raises(asyncio.CancelledError):
            await q.claim_batch("w1", max_batch=3, max_wait_ms=0, timeout_s=1)
        for job in jobs:
            record = await q.get(job.id)
            assert (record.status, record.attempts, record.worker_id) == (JobStatus.queued, 0, None)
        assert await q.depth() == 3
        await q.release("w1")  # what the stopping worker does on its way out
        other = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=300)
        started = time.monotonic()
        batch = await other.claim_batch("w2", max_batch=3, max_wait_ms=0, timeout_s=2)
        assert sorted(j.id for j in batch) == sorted(j.id for j in jobs) and time.monotonic() - started < 2
        assert all(j.attempts == 1 and j.worker_id == "w2" for j in batch)
        for q_ in (q, other):
            await q_.close()

    asyncio.run(scenario())


def test_a_worker_serving_several_models_takes_them_oldest_first_and_hoards_none(prefix: str) -> None:
    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        both = ["a", "b"]
        # Model a's backlog has mixed shapes (never one batch); b's job arrives while the worker is
        # on a's first ones, before the rest of a's.
        for i in range(4):
            await q.submit(spec(model="a", seed=i, width=16 * (1 + i % 3)))
        order = [j.id for j in await q.claim_batch("w", max_batch=2, max_wait_ms=0, timeout_s=1, models=both)]
        b = await q.submit(spec(model="b", seed=99))
        await asyncio.sleep(0.005)  # ids of two streams are equal within a millisecond: a tie
        for i in range(4, 12):
            await q.submit(spec(model="a", seed=i, width=16 * (1 + i % 3)))
        while jobs := await q.claim_batch("w", max_batch=2, max_wait_ms=0, timeout_s=0.3, models=both):
            order += [j.id for j in jobs]
            for job in jobs:
                await q.complete(job.id, result("x"), {})
        # b runs after the four older jobs and the later ones batched with them (two batches of
        # two): it used to run after all of a's backlog
        assert len(order) == 13 and order.index(b.id) <= 6

        # A worker takes only what it runs (XREADGROUP's COUNT applies per stream, so one read of
        # all streams took a batch of each): idle workers beside it find the other models' jobs.
        abc = ["a", "b", "c"]
        for model in abc:
            for i in range(2):
                await q.submit(spec(model=model, seed=i))
        batch = await q.claim_batch("w1", max_batch=2, max_wait_ms=0, timeout_s=1, models=abc)
        assert [j.spec.model for j in batch] == ["a", "a"] and q._carry[q.consumer("w1")] == []
        for worker, model in (("w2", "b"), ("w3", "c")):
            batch = await q.claim_batch(worker, max_batch=2, max_wait_ms=0, timeout_s=1, models=abc)
            assert [j.spec.model for j in batch] == [model, model]

        # The oldest waiting entry was cancelled: the worker looks again rather than taking one of
        # every model in a blocking read.
        first = await q.submit(spec(model="a", seed=1))
        for model in ("b", "c"):
            await asyncio.sleep(0.005)  # ids of two streams are equal within a millisecond: a tie
            await q.submit(spec(model=model, seed=1))
        await q.cancel(first.id)
        batch = await q.claim_batch("w1", max_batch=1, max_wait_ms=0, timeout_s=1, models=abc)
        assert [j.spec.model for j in batch] == ["b"] and q._carry[q.consumer("w1")] == []
        assert [
            j.spec.model for j in await q.claim_batch("w2", max_batch=1, max_wait_ms=0, timeout_s=1, models=abc)
        ] == ["c"]

        # A stream that lost its group (Redis restarted without its data; a submit made the stream
        # again) still competes by age: its job runs first, not after the other model's backlog.
        await q._redis.delete(q.stream_for("b"))
        lone = await q.submit(spec(model="b", seed=2))  # this instance believes b's group exists
        await asyncio.sleep(0.005)  # ids of two streams are equal within a millisecond: a tie
        for i in range(3):
            await q.submit(spec(model="a", seed=10 + i))
        batch = await q.claim_batch("w1", max_batch=1, max_wait_ms=0, timeout_s=1, models=abc)
        assert [j.id for j in batch] == [lone.id], [(j.spec.model, j.spec.seed) for j in batch]
        await q.close()

    asyncio.run(scenario())


def test_a_stopping_worker_hands_on_every_entry_it_holds_whenever_its_claim_was_cancelled(prefix: str) -> None:
    """release() asks Redis what the consumer holds: a claim cancelled between a read and its
    carry-over, or cancelled twice while undoing its starts, strands nothing for 5 minutes."""

    async def scenario() -> None:
        for window in ("load", "double cancel"):
            q = RedisJobQueue(REDIS_URL, prefix=f"{prefix}-{window[0]}", visibility_timeout_s=300)
            jobs = [await q.submit(spec(seed=i)) for i in range(3)]
            if window == "load":
                original_load = q._load

                async def load(carry: list, delivered: list, original_load=original_load) -> int:  # noqa: ANN001
                    if delivered:  # SIGTERM lands during the round trip that loads the delivery
                        asyncio.current_task().cancel()
                        await asyncio.sleep(0)
                    return await original_load(carry, delivered)

                q._load = load
                with pytest.raises(asyncio.CancelledError):
                    await q.claim_batch("w1", max_batch=3, max_wait_ms=0, timeout_s=1)
            else:
                original_start, original_unstart, calls = q._start, q._unstart_script, 0

                async def start(original_start=original_start, **kwargs: object) -> object:  # noqa: ANN001
                    nonlocal calls
                    calls += 1
                    outcome = await original_start(**kwargs)
                    if calls == 2:
                        asyncio.current_task().cancel()
                        await asyncio.sleep(0)
                    return outcome

                async def unstart(original_unstart=original_unstart, **kwargs: object) -> object:  # noqa: ANN001
                    await asyncio.sleep(0.02)  # a round trip, during which the second signal lands
                    return await original_unstart(**kwargs)

                q._start, q._unstart_script = start, unstart
                claim = asyncio.create_task(q.claim_batch("w1", max_batch=3, max_wait_ms=0, timeout_s=1))
                while calls < 2:
                    await asyncio.sleep(0)
                await asyncio.sleep(0.005)
                claim.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await claim
                await asyncio.sleep(0.2)  # the shielded undo finishes in the background
            await q.release("w1")
            other = RedisJobQueue(REDIS_URL, prefix=q.prefix, visibility_timeout_s=300)
            batch = await other.claim_batch("w2", max_batch=3, max_wait_ms=0, timeout_s=2)
            assert sorted(j.id for j in batch) == sorted(j.id for j in jobs), window
            for q_ in (q, other):
                await q_.close()
            cleanup_prefix(q.prefix)

    asyncio.run(scenario())


def test_a_job_its_stopping_worker_dropped_is_handed_on_at_once(prefix: str) -> None:
    """A batch whose result could not be stored (a Redis blip) is dropped for redelivery; the worker
    stopping after it must not keep the entry for the visibility timeout."""

    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=300)
        job = await q.submit(spec())
        (dropped,) = await q.claim_batch("w1", max_batch=1, max_wait_ms=0, timeout_s=1)
        await q.release("w1")  # the worker's way out, without a result for `dropped`
        other = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=300)
        (again,) = await other.claim_batch("w2", max_batch=1, max_wait_ms=0, timeout_s=2)
        assert again.id == dropped.id == job.id and again.attempts == 2
        for q_ in (q, other):
            await q_.close()

    asyncio.run(scenario())


def test_a_job_a_running_worker_dropped_is_run_again_at_its_next_claim(prefix: str) -> None:
    """The same, for a worker that goes on: its next claim hands the dropped job on (to itself,
    here) at once, not after the visibility timeout."""

    class BlipsOnStore(RedisJobQueue):
        blips = 0

        async def _store(self, *args: object) -> bool:
            if not self.blips:
                self.blips += 1
                raise RedisConnectionError("Redis went away (test)")
            return await super()._store(*args)

    async def scenario() -> None:
        q = BlipsOnStore(REDIS_URL, prefix=prefix, visibility_timeout_s=300)
        job = await q.submit(spec())
        (dropped,) = await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        with pytest.raises(QueueUnavailable):
            await q.complete(job.id, result("first"), {})
        (again,) = await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=2)
        assert again.id == dropped.id == job.id and again.attempts == 2
        assert await q.complete(job.id, result("second"), {})
        assert await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=0.2) == []  # nothing left over
        await q.close()

    asyncio.run(scenario())


def test_a_job_that_started_in_time_is_run_again_after_its_worker_died_whatever_its_queue_timeout(
    prefix: str,
) -> None:
    """`queue_timeout_s` bounds the wait for a first worker. A job that one took in time, whose
    worker then died, is redelivered past that deadline: it runs again (the client was promised
    a result), never fails `queue_timeout`."""
    from service_support import make_engine, settings

    from service.metrics import Metrics
    from service.schemas import ImageGenerationRequest
    from service.worker import Worker

    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=0.3)
        engine = make_engine(settings())
        job = await q.submit(engine.resolve_image(ImageGenerationRequest(prompt="a", queue_timeout_s=0.2)))
        (first,) = await q.claim_batch("dies", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert first.started_at - first.created_at < 0.2  # taken in time; then its worker is killed
        await asyncio.sleep(0.5)
        worker = Worker(q, engine, Metrics(), claim_timeout_s=1)
        assert await worker.run_once() == 1
        done = await q.get(job.id)
        assert done.attempts == 2 and done.status == JobStatus.completed, done.error
        await q.close()

    asyncio.run(scenario())


def test_large_outputs_go_to_the_shared_directory(prefix: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix, inline_max_bytes=100, output_dir=tmp_path)
        job = await q.submit(spec())
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        big, small = b"x" * 1000, b"tiny"
        await q.complete(job.id, result("r"), {"video.mp4": big, "thumbnail.png": small})
        assert await q.get_artifact(job.id, "video.mp4") == big
        assert await q.get_artifact(job.id, "thumbnail.png") == small
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert [f.name for f in files] == ["video.mp4"] and files[0].read_bytes() == big
        assert not await q._redis.hexists(q._k_art(job.id), "video.mp4")  # not duplicated in Redis
        assert await q.delete(job.id)
        assert not any(p.is_file() for p in tmp_path.rglob("*"))
        assert await q.get_artifact(job.id, "video.mp4") is None
        await q.close()

    asyncio.run(scenario())


def test_cancelled_jobs_are_acknowledged_and_idempotency_spans_api_instances(prefix: str) -> None:
    async def scenario() -> None:
        api1 = RedisJobQueue(REDIS_URL, prefix=prefix)
        api2 = RedisJobQueue(REDIS_URL, prefix=prefix)  # a second API replica (or a restarted one)
        worker = RedisJobQueue(REDIS_URL, prefix=prefix)
        first = await api1.submit(spec(), idempotency_key="client-retry-1")
        assert (await api2.submit(spec(), idempotency_key="client-retry-1")).id == first.id
        queued = await api2.submit(spec(seed=5, width=64))
        # Cancel while queued: the entry is acknowledged when read, the job never starts.
        await api1.cancel(queued.id)
        (running,) = await worker.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=1)
        assert running.id == first.id
        # Cancel while running: seen by the worker; its late complete changes nothing.
        assert await api2.cancel(first.id) is True
        assert await worker.is_cancelled(first.id)
        await worker.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=0.1)  # next turn: dropped job acked
        assert await worker._redis.xlen(worker.stream_for("m")) == 0
        assert (await api1.get(queued.id)).started_at is None
        assert await api1.depth() == 0
        # Cancelled, then deleted (a second DELETE) while running: the worker stops all the same,
        # and its dropped entry is acknowledged on its next turn
        third = await api1.submit(spec(seed=9))
        assert [j.id for j in await worker.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=1)] == [third.id]
        await api1.cancel(third.id)
        assert await api1.delete(third.id) and await api1.get(third.id) is None
        assert await worker.is_cancelled(third.id)
        await worker.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=0.1)
        assert await worker._redis.xlen(worker.stream_for("m")) == 0
        for q in (api1, api2, worker):
            await q.close()

    asyncio.run(scenario())


def test_backlog_limit_per_model_gives_queue_full_with_retry_after(prefix: str) -> None:
    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix, max_backlog=2, job_ttl_s=1)
        assert await q.stream_stats() == {}  # no stream yet (or Redis lost it)
        assert await q.stream_stats(["m"]) == {"m": {"pending": 0, "lag": 0}}
        for seed in range(2):
            await q.submit(spec(seed=seed))
        with pytest.raises(QueueFull) as full:
            await q.submit(spec(seed=9))
        assert 1 <= full.value.retry_after_s <= 600
        # A model no worker serves fills its own backlog, not the others'
        for seed in range(2):
            await q.submit(spec(model="unserved", seed=seed))
        assert (await q.depth(), await q.depth(["m"]), await q.depth(["unserved"])) == (4, 2, 2)
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1, models=["m"])
        # What KEDA scales on (lag) and what is being worked on (pending), per model's stream.
        assert await q.stream_stats() == {"m": {"pending": 1, "lag": 1}, "unserved": {"pending": 0, "lag": 2}}
        await q.submit(spec(seed=10))  # room again once one was taken
        # Jobs that expired while queued (nobody read their entries) leave the backlog with the
        # housekeeping, instead of holding it full for good.
        await asyncio.sleep(1.1)
        assert await q.depth(["unserved"]) == 2
        q._last_housekeeping = 0.0
        await q._housekeeping()
        assert await q.depth(["unserved"]) == 0
        await q.submit(spec(model="unserved", seed=5))
        await q.close()

    asyncio.run(scenario())


def test_retry_after_counts_the_workers_that_serve_the_model(prefix: str) -> None:
    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix, max_backlog=2)
        for worker in ("w1", "w2", "w3"):  # three workers serve m (their claims heartbeat), none serves x
            assert await q.claim_batch(worker, max_batch=1, max_wait_ms=0, timeout_s=0.01, models=["m"]) == []
        # seconds per job of each model, as its finished jobs measured it
        await q._redis.hset(q.k_stats, mapping={f"job_s:{q.stream_for('m')}": "10", f"job_s:{q.stream_for('x')}": "30"})
        for model in ("m", "x"):
            for seed in range(2):
                await q.submit(spec(model=model, seed=seed))
        waits = {}
        for model in ("m", "x"):
            with pytest.raises(QueueFull) as full:
                await q.submit(spec(model=model, seed=9))
            waits[model] = full.value.retry_after_s
        assert waits == {"m": 7, "x": 60}  # 2 jobs x 10 s over 3 workers; 2 x 30 s over none (as if one)
        # a finished job updates its own model's figure only
        job = await q.submit(spec(model="y"))
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1, models=["y"])
        assert await q.complete(job.id, result("y"), {})
        stats = await q._redis.hgetall(q.k_stats)
        assert f"job_s:{q.stream_for('y')}".encode() in stats and stats[f"job_s:{q.stream_for('m')}".encode()] == b"10"
        await q.close()

    asyncio.run(scenario())


def test_unreachable_redis_raises_queue_unavailable_quickly() -> None:
    async def scenario() -> None:
        q = RedisJobQueue(f"redis://:secret@127.0.0.1:{free_port()}/0", prefix=new_prefix())
        started = time.monotonic()
        for call in (q.ping(), q.submit(spec()), q.get("job_x"), q.depth()):
            with pytest.raises(QueueUnavailable) as down:
                await call
            assert "Redis at 127.0.0.1:" in str(down.value) and "secret" not in str(down.value)
        assert time.monotonic() - started < 10
        await q.close()

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_a_hung_redis_raises_queue_unavailable_after_one_socket_timeout() -> None:
    """A Redis that takes connections but never answers (here SIGSTOPped; or swapping, a stuck disk):
    each call fails after one socket timeout. Timeouts were retried, two to four per call, so with
    the former 5 s default the API answered 503 after 10-20 s."""
    port = free_port()
    server = start_redis_server(port)

    async def scenario() -> None:
        q = RedisJobQueue(f"redis://127.0.0.1:{port}/0", prefix=new_prefix(), socket_timeout_s=0.5)
        job = await q.submit(spec())
        server.send_signal(signal.SIGSTOP)
        try:
            for call in (lambda: q.get(job.id), lambda: q.submit(spec()), q.ping):
                started = time.monotonic()
                with pytest.raises(QueueUnavailable):
                    await call()
                assert time.monotonic() - started < 0.9  # one timeout, not two or three
        finally:
            server.send_signal(signal.SIGCONT)
        assert (await q.get(job.id)).id == job.id  # and back by itself once Redis answers
        await q.close()

    try:
        asyncio.run(scenario())
    finally:
        server.terminate()
        server.wait(10)


def test_a_redis_out_of_memory_is_queue_unavailable_not_an_error() -> None:
    """Redis up but refusing writes (over maxmemory with noeviction): 503 with Retry-After for
    the client, as when it is down, not a 500 that pages someone for a client error."""
    port = free_port()
    server = start_redis_server(port)

    async def scenario() -> None:
        q = RedisJobQueue(f"redis://127.0.0.1:{port}/0", prefix=new_prefix())
        job = await q.submit(spec())
        await q._redis.config_set("maxmemory-policy", "noeviction")
        await q._redis.config_set("maxmemory", "1")
        with pytest.raises(QueueUnavailable, match="maxmemory"):
            await q.submit(spec(seed=2))
        assert (await q.get(job.id)).id == job.id  # reads still work
        await q._redis.config_set("maxmemory", "0")
        await q.submit(spec(seed=3))  # and writes once memory is back
        await q.close()

    try:
        asyncio.run(scenario())
    finally:
        server.terminate()
        server.wait(10)


def test_list_pages_by_cursor_skips_expired_jobs_and_filters_by_kind(prefix: str) -> None:
    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        ids = [(await q.submit(spec(seed=i))).id for i in range(5)]
        video = await q.submit(spec(kind="video", num_frames=9, seed=9))
        await q._redis.delete(q._k_job(ids[2]))  # as if its TTL ran out
        seen: list[str] = []
        after = None
        while True:
            page, more = await q.list(kind="image", after=after, limit=2, order="asc")
            seen += [j.id for j in page]
            if not more:
                break
            after = page[-1].id
        assert seen == [ids[0], ids[1], ids[3], ids[4]]
        assert [j.id for j in (await q.list(kind="video"))[0]] == [video.id]
        newest, more = await q.list(limit=1)
        assert [j.id for j in newest] == [video.id] and more
        assert await q._redis.zscore(q.k_index, ids[2]) is None  # pruned from the index
        with pytest.raises(UnknownCursor):  # expired and pruned: no position left to list after
            await q.list(after=ids[2])
        await q.close()

    asyncio.run(scenario())


def test_consumers_of_gone_workers_are_pruned_but_never_one_with_pending_jobs(prefix: str) -> None:
    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        job = await q.submit(spec())
        (busy,) = await q.claim_batch("busy", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert await q.claim_batch("gone", max_batch=1, max_wait_ms=0, timeout_s=0.05) == []
        await asyncio.sleep(0.05)
        await q.prune_consumers(idle_s=0.01)
        names = [c["name"].decode() for c in await q._redis.xinfo_consumers(q.stream_for("m"), q.group)]
        assert names == [q.consumer("busy")]  # "gone" had nothing pending; "busy" holds the job
        assert await q.complete(busy.id, result("x"), {}) and busy.id == job.id
        await q.close()

    asyncio.run(scenario())


def test_from_settings_takes_the_api_limits_and_the_redis_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LESA_REDIS_MAX_DELIVERIES", "5")
    monkeypatch.setenv("LESA_REDIS_PREFIX", "p")
    s = Settings(_env_file=None, redis_url=REDIS_URL, max_backlog=7, max_jobs_per_key=3, priority_aging_s=30)
    q = RedisJobQueue.from_settings(s)
    assert (q.max_backlog, q.max_jobs_per_owner, q.max_deliveries, q.prefix) == (7, 3, 5, "p")
    assert q.priority_aging_s == 30
    asyncio.run(q.close())
    # `lesa worker` builds its queue from RedisQueueSettings: the same LESA_PRIORITY_AGING_S orders its takes
    monkeypatch.setenv("LESA_PRIORITY_AGING_S", "45")
    q = RedisJobQueue.from_settings(RedisQueueSettings(_env_file=None, redis_url=REDIS_URL))
    assert q.priority_aging_s == 45
    asyncio.run(q.close())


def test_a_job_started_from_the_carry_over_gets_a_fresh_lease(prefix: str) -> None:
    """An entry that waited in a worker's carry-over (an incompatible job read with a batch) starts
    with its idle time reset: no other worker reclaims it while it runs and heartbeats."""

    async def scenario() -> None:
        a = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=2.0)
        b = RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=2.0)
        first = await a.submit(spec(seed=1, width=32))
        carried = await a.submit(spec(seed=2, width=16))  # another shape: waits in a's carry-over
        assert [j.id for j in await a.claim_batch("a", max_batch=2, max_wait_ms=0, timeout_s=1)] == [first.id]
        await asyncio.sleep(1.7)  # the first batch runs most of a visibility timeout
        await a.complete(first.id, result("first"), {})
        (started,) = await a.claim_batch("a", max_batch=2, max_wait_ms=0, timeout_s=1)
        assert started.id == carried.id
        await asyncio.sleep(0.5)  # its entry has now been idle 2.2 s since it was read, 0.5 s since its start
        assert await b.claim_batch("b", max_batch=1, max_wait_ms=0, timeout_s=0.1) == []
        record = await a.get(carried.id)
        assert (record.status, record.attempts, record.worker_id) == (JobStatus.in_progress, 1, "a")
        await a.close()
        await b.close()

    asyncio.run(scenario())


def test_a_job_record_lives_job_ttl_from_its_start_not_its_submit(prefix: str) -> None:
    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix, job_ttl_s=2)
        job = await q.submit(spec(), idempotency_key="k")
        await asyncio.sleep(1.5)  # waits most of job_ttl_s in the queue
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        await asyncio.sleep(1.0)  # runs past submit + job_ttl_s
        assert await q.complete(job.id, result("late"), {"0.png": b"png"})
        assert (await q.get(job.id)).status == JobStatus.completed
        assert (await q.submit(spec(), idempotency_key="k")).id == job.id  # the key lived as long
        await q.close()

    asyncio.run(scenario())


def test_a_job_whose_spec_a_worker_cannot_read_fails_and_holds_up_no_other(prefix: str) -> None:
    """A spec written by another version of the API (a rolling upgrade): that job fails with a
    message; the jobs delivered with it run."""

    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        unreadable = await q.submit(spec(seed=0))
        written = json.loads(spec(seed=0).model_dump_json()) | {"kind": "audio"}
        await q._redis.hset(q._k_job(unreadable.id), "spec", json.dumps(written))
        torn = await q.submit(spec(seed=3, reference_image="aW1n"))  # its uploads field cut short
        await q._redis.hset(q._k_job(torn.id), "uploads", '{"reference_image": "aW')
        readable = [await q.submit(spec(seed=i)) for i in (1, 2)]
        batch = await q.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=1)
        assert [j.id for j in batch] == [j.id for j in readable]
        for job in (unreadable, torn):
            status, error = await q._redis.hmget(q._k_job(job.id), "status", "error")
            assert status == b"failed" and json.loads(error)["code"] == "unreadable_job"
        assert await q.depth() == 0  # out of the backlog, and acknowledged:
        assert (await q._redis.xpending(q.stream_for("m"), q.group))["pending"] == 2
        await q.close()

    asyncio.run(scenario())


def test_jobs_that_end_while_queued_keep_the_streams_lag_known(prefix: str) -> None:
    """A cancelled or timed-out queued job leaves its entry for the worker that reads it: deleting
    an unread entry makes Redis report the group's lag as unknown (nil) until a worker reads past
    it, and the lag is what KEDA scales on and LesaModelUnserved fires on."""

    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        jobs = [await q.submit(spec(model="nobody", seed=i)) for i in range(4)]
        assert await q.cancel(jobs[1].id)
        assert await q.fail_queued(jobs[2].id, JobError(code="queue_timeout", message="late"))
        (group,) = await q._redis.xinfo_groups(q.stream_for("nobody"))
        assert group["lag"] == 4 and await q.depth() == 2
        # an entry deleted ahead of the group's reads anyway (by hand, a trim): the backlog stands in
        await q._redis.xdel(q.stream_for("nobody"), (await q._redis.hget(q._k_job(jobs[3].id), "entry")).decode())
        (group,) = await q._redis.xinfo_groups(q.stream_for("nobody"))
        assert group["lag"] is None and (await q.stream_stats(["nobody"]))["nobody"]["lag"] == 2
        await q.close()

    asyncio.run(scenario())


def test_a_stream_that_lost_its_group_is_peeked_and_read_from_its_start(prefix: str) -> None:
    """After Redis lost its data, a submit makes the stream again without the workers' group: a
    worker finds every entry there waiting, in take order with the other streams, and reads none
    it does not take."""

    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        normal = await q.submit(spec(seed=1))
        low = await q.submit(spec(seed=2, priority="low"))
        for stream in (q.stream_for("m"), q.stream_for("m", "low")):
            await q._redis.xgroup_destroy(stream, q.group)
        high = await q.submit(spec(seed=3, priority="high"))  # its stream never had the group
        taken = []
        for _ in range(3):
            (job,) = await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=2, models=["m"])
            taken.append(job.id)
            if len(taken) == 2:  # the peek found the low job without reading it: free for any worker
                groups = await q._redis.xinfo_groups(q.stream_for("m", "low"))
                assert sum(g["pending"] for g in groups) == 0
        assert taken == [high.id, normal.id, low.id]
        await q.close()

    asyncio.run(scenario())


def test_a_submit_whose_housekeeping_fails_still_answers_with_its_job(prefix: str) -> None:
    """The job is queued by then: an error in the minute's housekeeping (an output directory
    deleted under it) must not turn into a 500 that invites a duplicate."""

    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)

        async def broken() -> None:
            raise FileNotFoundError("output directory deleted meanwhile (test)")

        q._housekeeping = broken  # type: ignore[method-assign]
        job = await q.submit(spec())
        assert (await q.get(job.id)).status == JobStatus.queued and await q.depth() == 1
        await q.close()

    asyncio.run(scenario())


def test_a_job_in_a_long_decode_keeps_its_delivery(prefix: str) -> None:
    """After the last denoising step progress sits at 99% while the VAE decodes: the worker must
    still heartbeat, or an idle worker reclaims the job and generates it a second time."""
    from service_support import FakePipeline, make_engine, settings

    from service.metrics import Metrics
    from service.schemas import ImageGenerationRequest
    from service.worker import Worker

    runs: list[str] = []

    class SlowDecode(FakePipeline):
        def __call__(self, prompts, *, seeds, callback=None, **kwargs):  # noqa: ANN001, ANN003, ANN204
            runs.append(self.name)
            out = super().__call__(prompts, seeds=seeds, callback=callback, **kwargs)
            time.sleep(3.0)  # the decode: longer than the visibility timeout, no step callbacks
            return out

    async def scenario() -> None:
        workers, queues = [], []
        for name in ("first", "second"):
            engine = make_engine(settings())
            engine.models["fake-image"].pipe = SlowDecode(name)
            queues.append(RedisJobQueue(REDIS_URL, prefix=prefix, visibility_timeout_s=2.0))
            workers.append(Worker(queues[-1], engine, Metrics(), max_wait_ms=0, claim_timeout_s=0.2, worker_id=name))
        spec = workers[0].engine.resolve_image(ImageGenerationRequest(prompt="p", num_inference_steps=4))
        job = await queues[0].submit(spec)
        first = asyncio.create_task(workers[0].run())
        while not runs:
            await asyncio.sleep(0.05)
        second = asyncio.create_task(workers[1].run())  # idle, reclaiming whatever is left idle
        record = await queues[0].wait(job.id, 15)
        for worker in workers:
            worker.stop()
        await asyncio.gather(first, second)
        assert (record.status, record.attempts, runs) == (JobStatus.completed, 1, ["first"])
        for q in queues:
            await q.close()

    asyncio.run(scenario())


def test_api_replicas_charge_one_rate_budget_per_key(prefix: str) -> None:
    """Two API processes on one Redis (here two apps, each its own connection): a key's budget is
    one, wherever its requests land."""
    from fastapi.testclient import TestClient
    from service_support import make_engine
    from service_support import settings as api_settings

    from service.app import create_app

    s = api_settings(api_keys="key-1", requests_per_minute_per_key=3)
    key = {"Authorization": "Bearer key-1"}
    body = {"prompt": "x", "num_inference_steps": 4}
    apps = [
        create_app(s, engine=make_engine(s), queue=RedisJobQueue(REDIS_URL, prefix=prefix), run_worker=False)
        for _ in range(2)
    ]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        answers = [client.post("/v1/images/jobs", json=body, headers=key) for client in (a, b, a, b)]
        assert [r.status_code for r in answers] == [202, 202, 202, 429]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0", "0"]
        assert 15 <= int(answers[3].headers["retry-after"]) <= 21  # one request per 20 s
