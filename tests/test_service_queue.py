"""The JobQueue contract, on the in-process implementation (fast: no model involved).

`make_queue` is the one place to change to run the same contract against another backend.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from service.queue import (
    QUALITY_WINDOW,
    InProcessJobQueue,
    JobError,
    JobQueue,
    JobResult,
    JobSpec,
    JobStatus,
    OutputRef,
    QueueFull,
    TooManyJobs,
    UnknownCursor,
)


def make_queue(**kwargs) -> JobQueue:
    return InProcessJobQueue(**kwargs)


def spec(**overrides) -> JobSpec:
    fields = dict(
        kind="image",
        model="m",
        prompt="a seven",
        n=1,
        width=32,
        height=32,
        num_inference_steps=10,
        guidance_scale=3.0,
        level="none",
        method="none",
        seed=0,
    )
    fields.update(overrides)
    return JobSpec(**fields)


def run(coro):
    return asyncio.run(coro)


def test_batches_group_compatible_jobs_in_order_and_respect_max_batch() -> None:
    async def scenario() -> None:
        q = make_queue()
        a = await q.submit(spec(seed=1))
        b = await q.submit(spec(width=64, seed=2))  # incompatible: other size
        c = await q.submit(spec(seed=3, n=2))
        d = await q.submit(spec(seed=4, n=2))  # would overflow max_batch 3
        batch = await q.claim_batch("w", max_batch=3, max_wait_ms=0, timeout_s=1)
        assert [j.id for j in batch] == [a.id, c.id]
        assert all(j.status == JobStatus.in_progress and j.worker_id == "w" for j in batch)
        assert [j.id for j in await q.claim_batch("w", max_batch=3, max_wait_ms=0, timeout_s=1)] == [b.id]
        assert [j.id for j in await q.claim_batch("w", max_batch=3, max_wait_ms=0, timeout_s=1)] == [d.id]
        assert await q.claim_batch("w", max_batch=3, max_wait_ms=0, timeout_s=0.01) == []

    run(scenario())


def test_a_worker_claims_only_jobs_of_its_models_and_leaves_the_others() -> None:
    """One model per GPU pool, one queue: a worker must not take (and fail) a job it cannot run."""

    async def scenario() -> None:
        q = make_queue()
        flux = await q.submit(spec(model="flux", seed=1))
        wan = await q.submit(spec(model="wan", seed=2))
        flux2 = await q.submit(spec(model="flux", seed=3))
        batch = await q.claim_batch("wan-worker", max_batch=8, max_wait_ms=0, timeout_s=1, models=["wan"])
        assert [j.id for j in batch] == [wan.id]
        assert await q.claim_batch("wan-worker", max_batch=8, max_wait_ms=0, timeout_s=0.05, models=["wan"]) == []
        assert (await q.get(flux.id)).status == JobStatus.queued  # untouched by the wan worker
        batch = await q.claim_batch("flux-worker", max_batch=8, max_wait_ms=0, timeout_s=1, models={"flux", "qwen"})
        assert [j.id for j in batch] == [flux.id, flux2.id]
        late = await q.submit(spec(model="qwen", seed=4))  # a model no job had before
        batch = await q.claim_batch("flux-worker", max_batch=8, max_wait_ms=0, timeout_s=2, models={"flux", "qwen"})
        assert [j.id for j in batch] == [late.id]
        await q.close()

    run(scenario())


def test_batching_window_opens_only_under_concurrency() -> None:
    async def scenario() -> None:
        q = make_queue()
        loop = asyncio.get_running_loop()

        async def submit_later(seed: int, delay: float) -> None:
            await asyncio.sleep(delay)
            await q.submit(spec(seed=seed))

        # A lone client: no wait (a fixed window would add max_wait_ms to every request).
        await q.submit(spec(seed=1))
        t0 = loop.time()
        assert [j.spec.seed for j in await q.claim_batch("w", max_batch=4, max_wait_ms=500, timeout_s=1)] == [1]
        assert loop.time() - t0 < 0.25
        # Two arrivals close together: the window opens and catches a compatible late one.
        await asyncio.sleep(0.6)
        await q.submit(spec(seed=2))
        await q.submit(spec(seed=3))
        late = asyncio.create_task(submit_later(4, 0.05))
        batch = await q.claim_batch("w", max_batch=4, max_wait_ms=500, timeout_s=1)
        await late
        assert [j.spec.seed for j in batch] == [2, 3, 4]
        # The previous batch was concurrent, so the next claim waits too.
        await asyncio.sleep(0.6)
        await q.submit(spec(seed=5))
        late = asyncio.create_task(submit_later(6, 0.05))
        batch = await q.claim_batch("w", max_batch=2, max_wait_ms=500, timeout_s=1)
        await late
        assert [j.spec.seed for j in batch] == [5, 6]

    run(scenario())


def test_lifecycle_idempotency_backlog_cancel_and_artifacts() -> None:
    async def scenario() -> None:
        q = make_queue(max_backlog=2)
        a = await q.submit(spec(), idempotency_key="k1")
        assert (await q.submit(spec(), idempotency_key="k1")).id == a.id
        b = await q.submit(spec())
        with pytest.raises(QueueFull) as full:
            await q.submit(spec())
        assert full.value.retry_after_s >= 1
        assert await q.depth() == 2

        # Cancel while queued: never claimed.
        await q.cancel(b.id)
        assert (await q.get(b.id)).status == JobStatus.cancelled
        (claimed,) = await q.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=1)
        assert claimed.id == a.id
        await q.set_progress(a.id, 40)
        assert (await q.get(a.id)).progress == 40
        waiting = asyncio.create_task(q.wait(a.id, timeout_s=5))
        result = JobResult(outputs=[OutputRef(name="0.png", content_type="image/png")], lesa={"x": 1})
        await q.complete(a.id, result, {"0.png": b"PNG"})
        done = await waiting
        assert done.status == JobStatus.completed and done.progress == 100 and done.expires_at
        assert await q.get_artifact(a.id, "0.png") == b"PNG"
        # Terminal jobs never change again (a late worker cannot resurrect or overwrite them).
        await q.fail(a.id, JobError(code="x", message="late"))
        assert (await q.get(a.id)).status == JobStatus.completed
        jobs, more = await q.list(limit=1)
        assert [j.id for j in jobs] == [b.id] and more
        jobs, more = await q.list(after=b.id)
        assert [j.id for j in jobs] == [a.id] and not more
        assert await q.delete(a.id) and await q.get(a.id) is None
        # The serialised form round-trips (what a Redis backend stores).
        assert type(done).model_validate_json(done.model_dump_json()) == done

    run(scenario())


def test_cancel_while_running_is_seen_by_worker_and_wins_over_complete() -> None:
    async def scenario() -> None:
        q = make_queue()
        a = await q.submit(spec())
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert not await q.is_cancelled(a.id)
        assert await q.cancel(a.id) is True
        assert await q.is_cancelled(a.id)
        await q.complete(a.id, JobResult(outputs=[]), {})
        assert (await q.get(a.id)).status == JobStatus.cancelled
        timed_out = await q.wait(a.id, timeout_s=0.01)
        assert timed_out.status == JobStatus.cancelled
        # DELETE again forgets the cancelled job: a worker still on it must stop all the same
        assert await q.delete(a.id) and await q.is_cancelled(a.id)

    run(scenario())


def test_of_racing_cancels_of_a_job_exactly_one_says_it_cancelled_it() -> None:
    """The API counts a cancellation only when `cancel` says this call made it: two DELETEs of one
    job used to both count it (5 jobs, each cancelled twice at once -> up to 10 counted)."""

    async def scenario() -> None:
        q = make_queue()
        jobs = [await q.submit(spec(seed=i)) for i in range(5)]
        await q.claim_batch("w", max_batch=2, max_wait_ms=0, timeout_s=1)  # two running, three queued
        outcomes = await asyncio.gather(*(q.cancel(job.id) for job in jobs for _ in range(2)))
        assert [outcomes[2 * i : 2 * i + 2].count(True) for i in range(5)] == [1] * 5
        assert [(await q.get(job.id)).status for job in jobs] == [JobStatus.cancelled] * 5
        # Nothing to cancel: a finished job, an unknown one.
        done = await q.submit(spec(seed=9))
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert await q.complete(done.id, JobResult(outputs=[]), {})
        assert await q.cancel(done.id) is False and await q.cancel("job_unknown") is False
        assert (await q.get(done.id)).status == JobStatus.completed
        await q.close()

    run(scenario())


def test_finished_jobs_expire_with_their_outputs() -> None:
    async def scenario() -> None:
        q = make_queue(result_ttl_s=0.05)
        a = await q.submit(spec())
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        await q.complete(a.id, JobResult(outputs=[OutputRef(name="0.png", content_type="image/png")]), {"0.png": b"x"})
        assert await q.get_artifact(a.id, "0.png") == b"x"
        await asyncio.sleep(0.1)
        assert (await q.list())[0] == []  # (before any per-job check forgot it)
        assert await q.get(a.id) is None and await q.get_artifact(a.id, "0.png") is None

    run(scenario())


def test_given_pixels_reach_the_worker_but_not_every_read_of_the_job() -> None:
    """An edit's image can be MBs (a 1024x1024 photo): polls, event streams and listings read the
    job over and over, so they leave its uploads out; the worker and `get_uploads` have them."""

    async def scenario() -> None:
        q = make_queue()
        uploads = {"reference_image": "aW1hZ2U=" * 1000, "reference_keep": "a2VlcA=="}
        job = await q.submit(spec(reference_follow_until=5, **uploads))
        plain = await q.submit(spec(seed=1))
        for record in (job, await q.get(job.id), (await q.list())[0][-1], await q.wait(job.id, 0)):
            assert record.id == job.id
            assert record.spec.reference_image is None and record.spec.reference_keep is None
            assert record.spec.reference_follow_until == 5  # small: kept in the spec
        assert await q.get_uploads(job.id) == uploads
        assert await q.get_uploads(plain.id) == {} and await q.get_uploads("job_unknown") == {}
        claimed = await q.claim_batch("w", max_batch=2, max_wait_ms=0, timeout_s=1)
        assert [(j.spec.reference_image, j.spec.reference_keep) for j in claimed] == [
            (uploads["reference_image"], uploads["reference_keep"]),
            (None, None),
        ]
        await q.complete(job.id, JobResult(outputs=[]), {})
        assert await q.get_uploads(job.id) == {}  # an ended image's are forgotten: MBs of no more use
        # a video keeps its first frame as long as the video is kept: its remix starts from it too
        video = await q.submit(spec(kind="video", num_frames=4, reference_image="Zmlyc3Q="))
        cancelled = await q.submit(spec(seed=2, **uploads))
        assert [j.id for j in await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)] == [video.id]
        await q.complete(video.id, JobResult(outputs=[]), {})
        assert await q.cancel(cancelled.id)
        assert await q.get_uploads(video.id) == {"reference_image": "Zmlyc3Q="}
        assert await q.get_uploads(cancelled.id) == {}
        assert await q.delete(video.id) is True
        assert await q.get_uploads(video.id) == {}

    run(scenario())


def test_rate_budgets_are_spent_on_all_or_none_and_earned_back_over_the_window() -> None:
    """`spend`, the store under service/rate_limits.py: a budget of 4 units per 0.4 s window."""

    async def scenario() -> None:
        q = make_queue()
        unit = 0.1  # seconds per unit: 4 units per window

        async def spend(*costs: float, budgets=("a", "b")) -> tuple[bool, list[float]]:
            return await q.spend(list(budgets[: len(costs)]), [unit] * len(costs), list(costs), 0.4)

        ok, ahead = await spend(3, 1)
        assert ok and ahead[0] == pytest.approx(0.3, abs=0.02) and ahead[1] == pytest.approx(0.1, abs=0.02)
        ok, ahead = await spend(2, 1)  # "a" would be 0.5 s ahead: neither budget moves
        assert not ok and ahead[0] == pytest.approx(0.5, abs=0.02)
        ok, ahead = await spend(1, 1)
        assert ok and ahead[1] == pytest.approx(0.2, abs=0.02)  # "b" did not move on the refusal
        assert (await spend(1))[0] is False  # "a" is spent
        assert (await spend(1, budgets=("c",)))[0] is True  # another budget: its own
        ok, ahead = await spend(-2)  # a refund always applies
        assert ok and ahead[0] == pytest.approx(0.2, abs=0.02)
        await asyncio.sleep(0.25)  # earned back at one unit per 0.1 s
        ok, ahead = await spend(4)
        assert ok and ahead[0] == pytest.approx(0.4, abs=0.05)

    run(scenario())


def test_complete_and_fail_say_whether_they_recorded_the_outcome() -> None:
    async def scenario() -> None:
        q = make_queue()
        job = await q.submit(spec())
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        result = JobResult(outputs=[OutputRef(name="0.png", content_type="image/png")])
        assert await q.complete(job.id, result, {"0.png": b"x"}) is True
        assert await q.complete(job.id, result, {"0.png": b"y"}) is False  # a duplicate delivery
        assert await q.fail(job.id, JobError(code="generation_failed", message="late")) is False
        assert (await q.get(job.id)).status == JobStatus.completed

    run(scenario())


def test_a_queued_job_knows_how_many_jobs_of_its_model_are_ahead_of_it() -> None:
    async def scenario() -> None:
        q = make_queue()
        a, b, c = [await q.submit(spec(seed=i)) for i in range(3)]
        other = await q.submit(spec(model="n", seed=9))  # another model's line
        assert [j.queue_position for j in (a, b, c, other)] == [0, 1, 2, 0]
        assert (await q.get(c.id)).queue_position == 2
        (first,) = await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1, models=["m"])
        assert first.id == a.id and (await q.get(a.id)).queue_position is None  # running: not in line
        assert [(await q.get(j.id)).queue_position for j in (b, c, other)] == [0, 1, 0]
        assert await q.cancel(b.id)
        assert (await q.get(c.id)).queue_position == 0
        listed, _ = await q.list(order="asc")
        assert [j.queue_position for j in listed] == [None, None, 0, 0]

    run(scenario())


def test_higher_priority_jobs_are_taken_first_and_batch_only_with_their_own_class() -> None:
    async def scenario() -> None:
        q = make_queue()
        low = await q.submit(spec(seed=1, priority="low"))
        normal = await q.submit(spec(seed=2))
        high = await q.submit(spec(seed=3, priority="high"))
        high2 = await q.submit(spec(seed=4, priority="high"))
        other = await q.submit(spec(model="n", seed=9, priority="low"))  # another model's line
        assert [j.queue_position for j in (low, normal, high, high2, other)] == [0, 0, 0, 1, 0]  # as submitted
        # the place in line counts what workers take first, higher classes included
        now = [(await q.get(j.id)).queue_position for j in (low, normal, high, high2, other)]
        assert now == [3, 2, 0, 1, 0]
        # compatible in every field but priority: the two high jobs run together, without the others
        batch = await q.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=1, models=["m"])
        assert [j.id for j in batch] == [high.id, high2.id]
        assert [(await q.get(j.id)).queue_position for j in (low, normal)] == [1, 0]
        # a high job that arrives now goes before the older normal and low ones
        high3 = await q.submit(spec(seed=5, priority="high"))
        assert high3.queue_position == 0
        order = []
        for _ in range(3):
            (job,) = await q.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=1, models=["m"])
            order.append(job.id)
        assert order == [high3.id, normal.id, low.id]
        assert (await q.get(low.id)).spec.priority == "low"

    run(scenario())


def test_with_priority_aging_a_job_that_waited_long_enough_goes_before_newer_higher_ones() -> None:
    async def scenario() -> None:
        q = make_queue(priority_aging_s=0.2)  # a class is worth 0.2 s of waiting
        old_low = await q.submit(spec(seed=1, priority="low"))
        await asyncio.sleep(0.6)  # more than two classes' worth
        high = await q.submit(spec(seed=2, priority="high"))
        normal = await q.submit(spec(seed=3))
        new_low = await q.submit(spec(seed=4, priority="low"))
        new_high = await q.submit(spec(seed=5, priority="high"))  # newer than the others: no waiting to count
        expected = [old_low, high, new_high, normal, new_low]
        assert [(await q.get(j.id)).queue_position for j in expected] == [0, 1, 2, 3, 4]
        order = []
        for _ in expected:
            (job,) = await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1, models=["m"])
            order.append(job.id)
        assert order == [j.id for j in expected]

    run(scenario())


def test_an_owner_with_max_live_jobs_gets_too_many_jobs_until_one_ends() -> None:
    async def scenario() -> None:
        q = make_queue(max_jobs_per_owner=2)
        a1, a2 = [await q.submit(spec(seed=i, owner="a")) for i in (1, 2)]
        with pytest.raises(TooManyJobs) as refused:
            await q.submit(spec(seed=3, owner="a"))
        assert refused.value.retry_after_s >= 1 and "2 jobs" in str(refused.value)
        await q.submit(spec(seed=4, owner="b"))  # other owners are not affected,
        for i in range(3):
            await q.submit(spec(seed=10 + i))  # nor jobs without an owner (no authentication)
        # Ending a job (cancelled while queued, completed, failed) frees its place.
        assert await q.cancel(a1.id)
        keyed = await q.submit(spec(seed=5, owner="a"), idempotency_key="k")
        assert (await q.submit(spec(seed=5, owner="a"), idempotency_key="k")).id == keyed.id  # a replay, not a job
        with pytest.raises(TooManyJobs):
            await q.submit(spec(seed=6, owner="a"))
        claimed: list = []
        while len(claimed) < 6:
            claimed += await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert await q.complete(a2.id, JobResult(outputs=[]), {})
        assert await q.fail(keyed.id, JobError(code="x", message="boom"))
        for i in (7, 8):
            await q.submit(spec(seed=i, owner="a"))
        (b_job,) = [j for j in claimed if j.spec.owner == "b"]
        if isinstance(q, InProcessJobQueue):  # (in Redis an emptied sorted set is deleted by Redis)
            # the count is kept only for owners with live jobs (a server sees many keys over time)
            assert "b" in q._live_by_owner
            assert await q.complete(b_job.id, JobResult(outputs=[]), {})
            assert "b" not in q._live_by_owner and "a" in q._live_by_owner

    run(scenario())


def test_the_outbox_keeps_each_recorded_job_end_once_until_acknowledged() -> None:
    """What webhooks are sent from: completions and failures (not cancels, not a duplicate outcome)."""

    async def scenario() -> None:
        q = make_queue()
        quiet = await q.submit(spec(seed=0))  # ends before the outbox is on: no event
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        assert await q.complete(quiet.id, JobResult(outputs=[]), {})
        q.outbox = True
        done, broken, dropped = [
            await q.submit(spec(seed=i, kind=k)) for i, k in ((1, "video"), (2, "image"), (3, "image"))
        ]
        for _ in range(2):  # the video, then both images
            await q.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=1)
        assert await q.complete(done.id, JobResult(outputs=[]), {})
        assert not await q.fail(done.id, JobError(code="x", message="late duplicate"))
        assert await q.fail(broken.id, JobError(code="x", message="boom"))
        assert await q.cancel(dropped.id)
        events = await q.next_events("w", limit=10, timeout_s=1, lease_s=60)
        assert [(e.job_id, e.kind, e.status) for e in events] == [
            (done.id, "video", "completed"), (broken.id, "image", "failed")
        ]  # fmt: skip
        assert events[0].id == f"evt_{done.id}" and abs(events[0].at - time.time()) < 60
        for event in events:
            await q.ack_event(event)
        assert await q.next_events("w", limit=10, timeout_s=0.05, lease_s=0.01) == []

    run(scenario())


def test_lists_show_only_their_owners_jobs_and_owners_batch_together() -> None:
    async def scenario() -> None:
        q = make_queue()
        mine = [await q.submit(spec(seed=i, owner="key-a")) for i in range(3)]
        theirs = await q.submit(spec(seed=9, owner="key-b"))
        anonymous = await q.submit(spec(seed=10))
        page, more = await q.list(owner="key-a", limit=2, order="asc")
        assert [j.id for j in page] == [mine[0].id, mine[1].id] and more
        page, more = await q.list(owner="key-a", after=mine[1].id, order="asc")
        assert [j.id for j in page] == [mine[2].id] and not more
        assert [j.id for j in (await q.list(owner="key-b"))[0]] == [theirs.id]
        for stranger, cursor in (("key-a", theirs.id), ("key-b", mine[0].id), (None, mine[0].id)):
            with pytest.raises(UnknownCursor):  # another owner's job is no position in this owner's list
                await q.list(owner=stranger, after=cursor)
        assert [j.id for j in (await q.list())[0]] == [anonymous.id]  # owner None: jobs made without auth
        # The owner is provenance, not what to generate: jobs of different owners share a batch.
        batch = await q.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=1)
        assert len(batch) == 5

    run(scenario())


def test_listing_after_a_job_that_is_gone_raises_instead_of_ending_the_list() -> None:
    """A cursor whose job was deleted (or expired) cannot be placed (ids carry no creation time):
    `list` raises UnknownCursor, the API's 400 naming `after`. It answered an empty page with no
    more to come, so a client paging through stopped silently with jobs left unlisted."""

    async def scenario() -> None:
        q = make_queue()
        jobs = [await q.submit(spec(seed=i)) for i in range(3)]
        page, more = await q.list(limit=1, order="asc")
        assert [j.id for j in page] == [jobs[0].id] and more
        assert await q.cancel(jobs[0].id) and await q.delete(jobs[0].id)
        for after in (jobs[0].id, "job_unknown"):
            with pytest.raises(UnknownCursor):
                await q.list(after=after, order="asc")
        await q.close()

    run(scenario())


def test_partial_images_are_kept_for_running_jobs_only() -> None:
    async def scenario() -> None:
        q = make_queue()
        job = await q.submit(spec(partial_images=2))
        await q.add_partial(job.id, 0, b"too early")  # queued, not running: ignored
        assert (await q.get(job.id)).partials == 0 and await q.get_partial(job.id, 0) is None
        await q.claim_batch("w", max_batch=1, max_wait_ms=0, timeout_s=1)
        await q.add_partial(job.id, 0, b"first")
        await q.add_partial(job.id, 1, b"second")
        assert (await q.get(job.id)).partials == 2
        assert await q.complete(job.id, JobResult(outputs=[]), {})
        await q.add_partial(job.id, 2, b"late")  # finished: ignored
        done = await q.get(job.id)
        assert done.partials == 2 and done.spec.partial_images == 2
        assert [await q.get_partial(job.id, i) for i in range(3)] == [b"first", b"second", None]
        other = await q.submit(spec(seed=1))
        await q.cancel(other.id)
        await q.add_partial(other.id, 0, b"x")
        assert (await q.get(other.id)).partials == 0
        await q.close()

    run(scenario())


def test_a_queue_outage_while_storing_a_result_leaves_the_job_pending_not_failed() -> None:
    """Redis unreachable when the worker stores a result: the queue failed, not the generation.
    The job must stay pending (redelivered once the queue is back), not be failed for good."""
    from service_support import make_engine, settings

    from service.metrics import Metrics
    from service.queue import QueueUnavailable
    from service.schemas import ImageGenerationRequest
    from service.worker import Worker

    class UnreachableOnComplete(InProcessJobQueue):
        async def complete(self, job_id, result, artifacts):  # noqa: ANN001, ANN201
            raise QueueUnavailable("job queue unreachable (test)")

    async def scenario() -> None:
        queue = UnreachableOnComplete()
        engine = make_engine(settings())
        metrics = Metrics()
        worker = Worker(queue, engine, metrics, claim_timeout_s=0.1)
        for n in (1, 2):  # one job, and a batch of two (which retries job by job on a failure)
            jobs = [await queue.submit(engine.resolve_image(ImageGenerationRequest(prompt=f"a {i}"))) for i in range(n)]
            with pytest.raises(QueueUnavailable):
                await worker.run_once()
            for job in jobs:
                assert (await queue.get(job.id)).status == JobStatus.in_progress
        assert metrics.registry.get_sample_value("lesa_jobs_total", {"model": "fake-image", "status": "failed"}) is None
        assert metrics.registry.get_sample_value("lesa_errors_total", {"type": "generation_failed"}) is None

    run(scenario())


def test_a_queue_blip_while_a_batch_runs_does_not_end_its_progress_and_cancel_watch() -> None:
    """One failed queue call (a Redis timeout) in the middle of a generation: the worker keeps
    publishing progress (its heartbeat, with Redis) and still sees a cancel."""
    from service_support import make_engine, settings

    from service.metrics import Metrics
    from service.queue import QueueUnavailable
    from service.schemas import ImageGenerationRequest
    from service.worker import Worker

    engine = make_engine(settings(), step_delay=0.05)
    pipe = engine.models["fake-image"].pipe

    class BlipsOnce(InProcessJobQueue):
        blips = 0

        async def is_cancelled(self, job_id: str) -> bool:
            if self.blips == 0 and pipe.last_step >= 2:
                self.blips += 1
                raise QueueUnavailable("job queue unreachable (test)")
            return await super().is_cancelled(job_id)

    async def scenario() -> None:
        queue = BlipsOnce()
        worker = Worker(queue, engine, Metrics(), claim_timeout_s=0.1)
        job = await queue.submit(engine.resolve_image(ImageGenerationRequest(prompt="a", num_inference_steps=60)))
        running = asyncio.create_task(worker.run_once())
        while pipe.last_step < 12:
            await asyncio.sleep(0.01)
        assert queue.blips == 1
        assert (await queue.get(job.id)).progress >= 10  # published after the blip (5% before it)
        assert await queue.cancel(job.id)
        cancelled_at = pipe.last_step
        await running
        assert pipe.last_step < cancelled_at + 10, "the generation ran on after the cancel"

    run(scenario())


def test_a_queue_outage_during_a_batch_is_logged_once_and_its_end_once() -> None:
    """Redis down for many denoising steps: one warning when progress stops being recorded and
    one when it is again, not a warning per step (~7/s per batch drowned the log)."""
    import logging

    from service_support import make_engine, settings

    from service.metrics import Metrics
    from service.queue import QueueUnavailable
    from service.schemas import ImageGenerationRequest
    from service.worker import Worker

    engine = make_engine(settings(), step_delay=0.03)
    pipe = engine.models["fake-image"].pipe

    class DownForAWhile(InProcessJobQueue):
        failures = 0

        async def is_cancelled(self, job_id: str) -> bool:
            if 2 <= pipe.last_step < 30:
                self.failures += 1
                raise QueueUnavailable("job queue unreachable (test)")
            return await super().is_cancelled(job_id)

    async def scenario() -> None:
        queue = DownForAWhile()
        worker = Worker(queue, engine, Metrics(), claim_timeout_s=0.1)
        job = await queue.submit(engine.resolve_image(ImageGenerationRequest(prompt="a", num_inference_steps=60)))
        await worker.run_once()
        assert (await queue.get(job.id)).status == JobStatus.completed
        assert queue.failures >= 5  # the outage spanned many polls

    class Kept(logging.Handler):  # (no caplog: the Redis contract run calls these tests bare)
        records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    worker_log, kept = logging.getLogger("lesa.worker"), Kept()
    worker_log.addHandler(kept)
    try:
        run(scenario())
    finally:
        worker_log.removeHandler(kept)
    said = [r.getMessage() for r in kept.records if "progress" in r.getMessage()]
    assert len([m for m in said if "not recorded" in m]) == 1, said
    assert len([m for m in said if "recorded again" in m]) == 1, said


def test_shadow_check_quality_keeps_the_latest_window_per_level_newest_first() -> None:
    """What "auto" judges LESA levels by (recorded by workers, read by every API process)."""

    async def scenario() -> None:
        q = make_queue()
        assert await q.live_quality([("m", "5x")]) == {}
        await q.record_quality("m", "5x", [30.0, 31.0])
        await q.record_quality("m", "2x", [40.5])
        await q.record_quality("other", "5x", [])  # a check that measured nothing keeps nothing
        assert await q.live_quality([("m", "5x"), ("m", "2x"), ("other", "5x")]) == {
            ("m", "5x"): [31.0, 30.0],
            ("m", "2x"): [40.5],
        }
        await q.record_quality("m", "5x", [float(i) for i in range(QUALITY_WINDOW)])
        live = await q.live_quality([("m", "5x"), ("m", "6.25x")])
        assert live == {("m", "5x"): [float(i) for i in reversed(range(QUALITY_WINDOW))]}  # 30 and 31 dropped
        await q.close()

    run(scenario())


def test_a_queued_job_past_its_deadline_is_failed_once_and_never_taken() -> None:
    async def scenario() -> None:
        q = make_queue()
        late, taken = await q.submit(spec(seed=1)), await q.submit(spec(seed=2, width=16))
        error = JobError(code="queue_timeout", message="no worker was free in time")
        assert await q.fail_queued(late.id, error)
        assert not await q.fail_queued(late.id, error)  # once: the caller counts it
        record = await q.get(late.id)
        assert record.status == JobStatus.failed and record.error == error and await q.depth() == 1
        (started,) = await q.claim_batch("w", max_batch=8, max_wait_ms=0, timeout_s=1)
        assert started.id == taken.id  # the failed job is never handed to a worker
        assert not await q.fail_queued(taken.id, error) and not await q.fail_queued("job_unknown", error)
        assert (await q.get(taken.id)).status == JobStatus.in_progress
        await q.close()

    run(scenario())
