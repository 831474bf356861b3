"""The Redis deployment end to end: real API processes, real worker processes, real Redis.

Generations use the test pipeline inside the real Engine (`test_redis_support.StepPipe`: fixed
sleep per denoising step, deterministic images), because these tests need hundreds of
generations and controllable step times on 2 CPU cores; everything else (HTTP API, queue,
workers, signals, Redis) is the production code path. Every test uses its own key prefix.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_redis_support import (
    REDIS_URL,
    Proc,
    cleanup_prefix,
    free_port,
    image_body,
    needs_redis,
    new_prefix,
    read_log,
    start_api,
    start_redis_server,
    start_workers,
    wait_http,
)

from service.queue import JobSpec, JobStatus
from service.redis_queue import RedisJobQueue

pytestmark = [
    pytest.mark.slow,
    needs_redis,
]


@pytest.fixture
def prefix() -> Iterator[str]:
    p = new_prefix()
    yield p
    cleanup_prefix(p)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; all stopped at the end whatever happens."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop(signal.SIGKILL)


def job_spec(i: int, steps: int = 10) -> JobSpec:
    return JobSpec(
        kind="image", model="test-image", prompt=f"job {i}", n=1, width=16, height=16,
        num_inference_steps=steps, guidance_scale=1.0, level="none", method="none", seed=i,
    )  # fmt: skip


async def wait_all_terminal(q: RedisJobQueue, ids: list[str], timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {job_id: await q.get(job_id) for job_id in ids}
        if all(j is not None and j.status.terminal for j in jobs.values()) or time.monotonic() > deadline:
            return jobs
        await asyncio.sleep(0.2)


def test_kill_9_mid_batch_every_job_completes_exactly_once(tmp_path: Path, prefix: str, procs: list[Proc]) -> None:
    """Two real `lesa worker` processes; one is SIGKILLed in the middle of a batch. Its jobs are
    reclaimed after the visibility timeout and finish on the other worker: every job completes,
    each generation ran to the end exactly once, nothing stays pending."""
    log = tmp_path / "generations.jsonl"
    env = dict(LESA_REDIS_VISIBILITY_TIMEOUT_S="2", LESA_TEST_STEP_S="0.1", LESA_TEST_LOG=str(log), LESA_MAX_BATCH="4")
    victim, survivor = start_workers(tmp_path, prefix, ["victim", "survivor"], cli=True, **env)
    procs += [victim, survivor]

    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        ids = [(await q.submit(job_spec(i))).id for i in range(12)]
        # Wait until the victim is part-way through a batch (pipeline still running), then kill.
        deadline = time.monotonic() + 30
        while True:
            running = [j for j in [await q.get(i) for i in ids] if j.worker_id == "victim" and not j.status.terminal]
            if any(20 <= j.progress <= 70 for j in running):
                break
            assert time.monotonic() < deadline, "the victim never ran a batch"
            await asyncio.sleep(0.02)
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(10)
        killed = {j.id for j in running}

        jobs = await wait_all_terminal(q, ids, timeout=60)
        assert all(j.status == JobStatus.completed for j in jobs.values()), {
            i: (j.status, j.error) for i, j in jobs.items()
        }
        for job_id in killed:
            assert jobs[job_id].attempts == 2 and jobs[job_id].worker_id == "survivor"
        runs = Counter(entry["prompt"] for entry in read_log(log))
        assert runs == Counter({f"job {i}": 1 for i in range(12)}), runs
        assert await q._redis.xlen(q.stream_for("test-image")) == 0
        assert (await q._redis.xpending(q.stream_for("test-image"), q.group))["pending"] == 0
        await q.close()

    asyncio.run(scenario())


def test_two_workers_share_a_burst_and_sigterm_finishes_the_batch(
    tmp_path: Path, prefix: str, procs: list[Proc]
) -> None:
    """Both workers take batches from one burst. SIGTERM to a worker mid-batch: it finishes that
    batch, hands back what it had read but not started, and exits 0; the other worker does the rest
    without waiting for the (long) visibility timeout."""
    log = tmp_path / "generations.jsonl"
    env = dict(
        LESA_TEST_STEP_S="0.05", LESA_TEST_LOG=str(log), LESA_MAX_BATCH="2", LESA_REDIS_VISIBILITY_TIMEOUT_S="120"
    )
    w1, w2 = start_workers(tmp_path, prefix, ["w1", "w2"], **env)
    procs += [w1, w2]

    async def scenario() -> None:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        ids = [(await q.submit(job_spec(i))).id for i in range(16)]
        deadline = time.monotonic() + 30
        while True:
            batch = [j for j in [await q.get(i) for i in ids] if j.worker_id == "w1" and not j.status.terminal]
            if batch and all(j.status == JobStatus.in_progress for j in batch):
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        w1.popen.send_signal(signal.SIGTERM)
        assert w1.popen.wait(30) == 0, w1.output()
        for job in batch:  # the batch in hand was finished by w1 itself
            done = await q.get(job.id)
            assert done.status == JobStatus.completed and done.worker_id == "w1" and done.attempts == 1
        jobs = await wait_all_terminal(q, ids, timeout=40)
        assert all(j.status == JobStatus.completed for j in jobs.values())
        by_worker = Counter(j.worker_id for j in jobs.values())
        assert by_worker["w1"] >= 1 and by_worker["w2"] >= 1, by_worker
        assert Counter(e["prompt"] for e in read_log(log)) == Counter({f"job {i}": 1 for i in range(16)})
        await q.close()

    asyncio.run(scenario())


def test_burst_of_500_http_requests_all_complete(tmp_path: Path, prefix: str, procs: list[Proc]) -> None:
    """500 synchronous image requests from 50 concurrent clients through one API and two workers
    (1 denoising step, no sleep: the cheapest setting); every one answers 200 with its own image.

    Like the official `openai` client, a request whose connection drops is retried once with the
    same Idempotency-Key: the retry must find the same job, so every prompt still runs exactly once.
    """
    log = tmp_path / "generations.jsonl"
    env = dict(LESA_MAX_BATCH="8", LESA_MAX_WAIT_MS="5", LESA_MAX_BACKLOG="1000", LESA_TEST_LOG=str(log))
    api = start_api(tmp_path, prefix, **env)
    procs.append(api)
    procs += start_workers(tmp_path, prefix, ["b1", "b2"], **env)
    retried: list[str] = []

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=api.url, timeout=120, limits=limits) as client:
            gate = asyncio.Semaphore(50)

            async def one(i: int) -> httpx.Response:
                body = image_body(seed=i, num_inference_steps=1, prompt=f"burst {i}")
                headers = {"Idempotency-Key": f"burst-{prefix}-{i}"}
                async with gate:
                    try:
                        return await client.post("/v1/images/generations", json=body, headers=headers)
                    except httpx.TransportError as dropped:
                        retried.append(f"{i}: {dropped!r}")
                        return await client.post("/v1/images/generations", json=body, headers=headers)

            responses = await asyncio.gather(*(one(i) for i in range(500)))
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: 500}, (statuses, api.output()[-3000:])
        job_ids = {r.json()["lesa"]["job_id"] for r in responses}
        assert len(job_ids) == 500
        assert all(base64.b64decode(r.json()["data"][0]["b64_json"])[:4] == b"\x89PNG" for r in responses)
        assert max(r.json()["lesa"]["batch_size"] for r in responses) > 1  # batching happened
        assert Counter(e["prompt"] for e in read_log(log)) == Counter({f"burst {i}": 1 for i in range(500)})
        # A dropped connection is rare (a keep-alive close racing a reuse), never the rule.
        assert len(retried) <= 5, (retried, api.output()[-3000:])
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        assert await q.depth() == 0 and await q._redis.xlen(q.stream_for("fake-image")) == 0
        await q.close()

    asyncio.run(scenario())


def test_worker_pools_of_different_models_share_one_redis(tmp_path: Path, prefix: str, procs: list[Proc]) -> None:
    """One model per GPU pool: each pool runs only its model's jobs, none is failed by a worker
    that lacks the model, and a job for a model whose pool is not up yet waits for it."""
    api = start_api(tmp_path, prefix, LESA_MODELS="model-a,model-b")
    procs.append(api)
    procs += start_workers(tmp_path, prefix, ["pool-a"], LESA_MODELS="model-a")
    with httpx.Client(base_url=api.url, timeout=60) as client:
        created = [
            client.post("/v1/images/jobs", json=image_body(model=model, seed=i)).json()
            for i, model in enumerate(["model-a", "model-b"] * 4)
        ]
        ids = [c["id"] for c in created]
    a_ids, b_ids = ids[0::2], ids[1::2]

    async def states(wait_for: list[str]) -> dict[str, object]:
        q = RedisJobQueue(REDIS_URL, prefix=prefix)
        try:
            return await wait_all_terminal(q, wait_for, timeout=30) | {
                i: await q.get(i) for i in ids if i not in wait_for
            }
        finally:
            await q.close()

    jobs = asyncio.run(states(a_ids))
    assert all(jobs[i].status == JobStatus.completed and jobs[i].worker_id == "pool-a" for i in a_ids)
    assert all(jobs[i].status == JobStatus.queued for i in b_ids)  # not taken, not failed
    procs += start_workers(tmp_path, prefix, ["pool-b"], LESA_MODELS="model-b")
    jobs = asyncio.run(states(b_ids))
    assert all(jobs[i].status == JobStatus.completed and jobs[i].worker_id == "pool-b" for i in b_ids)


def test_cancellation_reaches_running_and_queued_jobs_over_http(tmp_path: Path, prefix: str, procs: list[Proc]) -> None:
    log = tmp_path / "generations.jsonl"
    env = dict(LESA_TEST_STEP_S="0.1", LESA_TEST_LOG=str(log), LESA_MAX_BATCH="1")
    api = start_api(tmp_path, prefix, **env)
    procs.append(api)
    procs += start_workers(tmp_path, prefix, ["c1"], **env)
    with httpx.Client(base_url=api.url, timeout=60) as client:
        # A first generation pays the worker's one-off imports (encoders): not what is timed here.
        assert client.post("/v1/images/generations", json=image_body(prompt="warm-up")).status_code == 200
        # 50 steps x 0.1 s: cancelled at >= 10 %, the job would still need >= 4.5 s of step sleeps.
        running = client.post("/v1/images/jobs", json=image_body(prompt="long", num_inference_steps=50)).json()
        queued = client.post("/v1/images/jobs", json=image_body(prompt="queued", num_inference_steps=50)).json()
        deadline = time.monotonic() + 20
        while client.get(f"/v1/images/jobs/{running['id']}").json().get("progress", 0) < 10:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.delete(f"/v1/images/jobs/{queued['id']}").status_code == 200
        cancelled_at = time.monotonic()
        assert client.delete(f"/v1/images/jobs/{running['id']}").status_code == 200
        assert client.get(f"/v1/images/jobs/{running['id']}").json()["status"] == "cancelled"
        # The worker stopped at the next step (not after the remaining >= 4.5 s) and is free again.
        follow = client.post("/v1/images/generations", json=image_body(prompt="after", num_inference_steps=2))
        assert follow.status_code == 200
        assert time.monotonic() - cancelled_at < 4.0
        assert client.get(f"/v1/images/jobs/{queued['id']}").json()["status"] == "cancelled"
    prompts = [e["prompt"] for e in read_log(log)]
    assert "long" not in prompts and "queued" not in prompts and "after" in prompts


def test_an_edit_and_a_variation_reach_the_worker_process_through_redis(
    tmp_path: Path, prefix: str, procs: list[Proc]
) -> None:
    """The uploads cross processes beside the job (its hash's `uploads` field): a queued edit keeps
    its image there until a worker process runs it, an edit at strength 0 comes back as its image,
    a variation is given it too; once the image jobs end, their uploads are gone from Redis."""
    import io

    import numpy as np
    from PIL import Image

    log = tmp_path / "generations.jsonl"
    api = start_api(tmp_path, prefix, LESA_TEST_LOG=str(log))
    procs.append(api)
    picture = ((np.arange(256).reshape(16, 16) * 7) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture, mode="L").save(buffer, format="PNG")
    image = {"image": ("in.png", buffer.getvalue(), "image/png")}
    form = {"model": image_body()["model"], "size": "16x16", "num_inference_steps": "4"}

    async def uploads_kept(ids: list[str]) -> list[bool]:
        queue = RedisJobQueue(REDIS_URL, prefix=prefix)
        try:
            return [await queue._redis.hexists(queue._k_job(i), "uploads") for i in ids]
        finally:
            await queue.close()

    with httpx.Client(base_url=api.url, timeout=60) as client:
        # queued before any worker runs: the image waits beside the job (its hash's `uploads`)
        queued = client.post("/v1/images/jobs", data={**form, "prompt": "a one"}, files=image).json()
        assert asyncio.run(uploads_kept([queued["id"]])) == [True]
        procs.extend(start_workers(tmp_path, prefix, ["u1"], LESA_TEST_LOG=str(log)))
        edit = client.post("/v1/images/edits", data={**form, "prompt": "a seven", "strength": "0"}, files=image)
        assert edit.status_code == 200, edit.text
        out = np.asarray(Image.open(io.BytesIO(base64.b64decode(edit.json()["data"][0]["b64_json"]))))
        assert np.array_equal(out, picture)  # followed for every step: the image, from the worker
        varied = client.post("/v1/images/variations", data={**form, "n": "2"}, files=image)
        assert varied.status_code == 200, varied.text
        assert client.get(f"/v1/images/jobs/{queued['id']}").json()["status"] == "completed"
        ids = [queued["id"], edit.json()["lesa"]["job_id"], varied.json()["lesa"]["job_id"]]
    assert asyncio.run(uploads_kept(ids)) == [False, False, False]  # ended image jobs forget them
    given = {e["prompt"]: e["given"] for e in read_log(log)}
    assert given == {"a one": True, "a seven": True, "": True}


def test_api_restart_while_jobs_are_queued(tmp_path: Path, prefix: str, procs: list[Proc]) -> None:
    """Jobs live in Redis, not in the API: an API that dies with jobs queued loses nothing, and
    the Idempotency-Key still finds the job after the restart."""
    api = start_api(tmp_path, prefix, name="api1")
    procs.append(api)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        created = [
            client.post("/v1/images/jobs", json=image_body(seed=i), headers={"Idempotency-Key": f"k{i}"}).json()
            for i in range(5)
        ]
    api.stop(signal.SIGKILL)
    api2 = start_api(tmp_path, prefix, name="api2")
    procs.append(api2)
    with httpx.Client(base_url=api2.url, timeout=30) as client:
        again = client.post("/v1/images/jobs", json=image_body(seed=0), headers={"Idempotency-Key": "k0"}).json()
        assert again["id"] == created[0]["id"]
        assert [client.get(f"/v1/images/jobs/{c['id']}").json()["status"] for c in created] == ["queued"] * 5
        procs += start_workers(tmp_path, prefix, ["r1"])
        deadline = time.monotonic() + 30
        for c in created:
            while (status := client.get(f"/v1/images/jobs/{c['id']}").json()["status"]) != "completed":
                assert status in ("queued", "in_progress") and time.monotonic() < deadline
                time.sleep(0.1)
            content = client.get(f"/v1/images/{c['id']}/content")
            assert content.status_code == 200 and content.content[:4] == b"\x89PNG"


def test_redis_down_gives_503_and_everything_recovers_by_itself(tmp_path: Path, procs: list[Proc]) -> None:
    """A private redis-server is stopped under a running API and worker, then started again."""
    port = free_port()
    server = start_redis_server(port)
    url = f"redis://127.0.0.1:{port}/0"
    prefix = new_prefix()
    try:
        api = start_api(tmp_path, prefix, LESA_REDIS_URL=url)
        procs.append(api)
        (worker,) = start_workers(tmp_path, prefix, ["d1"], LESA_REDIS_URL=url)
        procs.append(worker)
        with httpx.Client(base_url=api.url, timeout=30) as client:
            assert client.post("/v1/images/generations", json=image_body()).status_code == 200
            server.terminate()
            server.wait(10)
            down = client.post("/v1/images/generations", json=image_body())
            assert down.status_code == 503 and down.headers.get("Retry-After")
            error = down.json()["error"]
            assert error["code"] == "queue_unavailable" and f"127.0.0.1:{port}" in error["message"]
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "unavailable" in ready.json()["checks"]["queue"]
            wait_http(worker, "/readyz", status=503, timeout=15)

            server = start_redis_server(port)  # empty: no persistence, the group must be recreated
            wait_http(api, "/readyz", timeout=15)
            wait_http(worker, "/readyz", timeout=15)
            again = client.post("/v1/images/generations", json=image_body(prompt="after the outage"))
            assert again.status_code == 200, again.text
    finally:
        server.terminate()
        server.wait(10)


def test_reference_model_through_redis_with_the_openai_client(tmp_path: Path, prefix: str, procs: list[Proc]) -> None:
    """The real thing, once: `digits-image` loaded from the package weights by a real API and a
    real `lesa worker`, requests from the official `openai` client (plain and accelerated)."""
    openai = pytest.importorskip("openai")
    env = dict(LESA_MODELS="digits-image", LESA_TEST_REAL_ENGINE="1")
    api = start_api(tmp_path, prefix, **env)
    procs.append(api)
    procs += start_workers(tmp_path, prefix, ["real"], cli=True, real_model=True, **env)
    client = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", timeout=300, max_retries=0)
    for acceleration in ("none", "2x"):
        result = client.images.generate(
            model="digits-image",
            prompt="a handwritten seven",
            n=2,
            extra_body={"num_inference_steps": 4, "acceleration": acceleration, "seed": 7},
        )
        assert len(result.data) == 2
        assert all(base64.b64decode(d.b64_json)[:4] == b"\x89PNG" for d in result.data)
        lesa = result.model_extra["lesa"]
        assert lesa["level"] == acceleration and lesa["batch_size"] == 2
        assert lesa["full_steps"] + lesa["predicted_steps"] == 4
    # Streamed: the worker process stores the previews in Redis, the API process streams them.
    events = list(client.images.generate(model="digits-image", prompt="a handwritten seven", stream=True,
                                         partial_images=2, extra_body={"num_inference_steps": 6, "seed": 7}))  # fmt: skip
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert all(base64.b64decode(e.b64_json)[:4] == b"\x89PNG" for e in events)


def test_backlog_limit_answers_429_with_retry_after(tmp_path: Path, prefix: str, procs: list[Proc]) -> None:
    """No worker, LESA_MAX_BACKLOG=2: the third queued job is refused with 429 + Retry-After."""
    api = start_api(tmp_path, prefix, LESA_MAX_BACKLOG="2")
    procs.append(api)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        for seed in range(2):
            assert client.post("/v1/images/jobs", json=image_body(seed=seed)).status_code == 202
        full = client.post("/v1/images/jobs", json=image_body(seed=2))
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert full.json()["error"]["code"] == "queue_full"
        assert "lesa_queue_depth 2.0" in client.get("/metrics").text
