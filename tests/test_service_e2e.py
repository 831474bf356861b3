"""End to end: real uvicorn on a free port, real HTTP (httpx and the official `openai` client),
the real `digits-image` model, the in-process queue and embedded worker of `lesa serve`.

Few denoising steps keep it affordable on 2 CPU cores. The server runs in a thread of this
process so the model loads once for the whole module.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from service_support import free_port, weights_present

from service.app import create_app
from service.settings import Settings

MODEL = "digits-image"
KEY = "e2e-test-key"


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not weights_present(MODEL), reason=f"no {MODEL} checkpoint in lesa_models/weights"),
]


@dataclass
class Server:
    url: str
    app: object

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    import uvicorn

    port = free_port()
    models = ",".join(m for m in ("digits-image", "digits-video") if weights_present(m))
    settings = Settings(
        _env_file=None, port=port, models=models, warmup=True, warmup_steps=4, max_batch=8, max_wait_ms=20,
        api_keys=KEY, default_level="none", sync_timeout_s=120,
    )  # fmt: skip
    app = create_app(settings)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:  # /healthz answers at once; /readyz once models are loaded and warm
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server not ready in time"
        assert thread.is_alive(), "uvicorn exited"
        time.sleep(0.2)
    yield Server(url=url, app=app)
    uv.should_exit = True
    thread.join(timeout=60)


def generate(client: httpx.Client, **fields) -> dict:
    body = {"prompt": "a seven", "model": MODEL, "num_inference_steps": 8, "seed": 11, **fields}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_http_image_generation_reports_what_ran(server: Server) -> None:
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        body = generate(client, acceleration="5x", n=2)
        assert len(body["data"]) == 2 and body["size"] == "16x16"
        png = base64.b64decode(body["data"][0]["b64_json"])
        assert png.startswith(b"\x89PNG")
        lesa = body["lesa"]
        assert lesa["level"] == "5x" and lesa["method"] == "taylorseer"  # no LESA bundle for 8 steps
        assert (lesa["full_steps"], lesa["predicted_steps"]) == (4, 4) and lesa["seeds"] == [11, 12]
        assert lesa["realised_speedup"] > 1.0 and lesa["generation_ms"] > 0
        # What ran, for an audit or a rerun: the weights' revision and (for LESA) the bundle.
        card = client.get(f"/v1/models/{MODEL}").json()
        assert re.fullmatch("[0-9a-f]{12}", card["revision"]) and lesa["model_revision"] == card["revision"]
        assert card["description"].startswith("grey-scale digits")  # deploy/models.toml's line
        assert lesa["predictor"] is None  # taylorseer: no bundle ran
        ran = generate(client, acceleration="5x", num_inference_steps=50, method="lesa")["lesa"]
        level = next(c for c in card["acceleration"] if c["level"] == "5x")
        assert re.fullmatch("[0-9a-f]{12}", level["predictor"]) and ran["predictor"] == level["predictor"]
        # url outputs are served by the same server ...
        body = generate(client, response_format="url", output_format="jpeg")
        image = client.get(body["data"][0]["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        # ... as signed links: no key needed (an <img src>), but one without its signature is refused
        url = body["data"][0]["url"]
        assert client.get(url, headers={"Authorization": ""}).status_code == 200
        assert client.get(url.split("&sig=")[0], headers={"Authorization": ""}).status_code == 401
        # errors over the wire: named field, no traceback
        for payload, status, param in (
            ({"model": "nope"}, 404, "model"),
            ({"size": "32x32"}, 400, "size"),
            ({"acceleration": "7x"}, 400, "acceleration"),
            ({"num_inference_steps": 500}, 400, "num_inference_steps"),
        ):
            response = client.post("/v1/images/generations", json={"prompt": "x", "model": MODEL, **payload})
            assert response.status_code == status and response.json()["error"]["param"] == param
        assert client.post("/v1/images/generations", content=b"x" * 2_000_000).status_code == 413
        metrics = client.get("/metrics").text
        assert f'lesa_denoising_steps_total{{kind="predicted",level="5x",model="{MODEL}"}}' in metrics


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the client's notice, not ours
def test_official_openai_client(server: Server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    models = {m.id: m for m in client.models.list().data}
    assert MODEL in models and models[MODEL].model_extra["sizes"] == ["16x16"]
    result = client.images.generate(
        model=MODEL,
        prompt="a three",
        size="16x16",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"seed": 3, "num_inference_steps": 8, "acceleration": "2x", "method": "reuse"},
    )
    assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")
    lesa = result.model_extra["lesa"]
    assert lesa["method"] == "reuse" and lesa["level"] == "2x" and lesa["seed"] == 3
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(model=MODEL, prompt="x", extra_body={"acceleration": "7x"})
    assert error.value.body["param"] == "acceleration"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="no-such-model", prompt="x")
    if "digits-video" in models and hasattr(client, "videos"):
        video = client.videos.create(
            model="digits-video", prompt="a five", extra_body={"num_inference_steps": 4, "seed": 5}
        )
        while video.status in ("queued", "in_progress"):
            time.sleep(0.2)
            video = client.videos.retrieve(video.id)
        assert video.status == "completed", video
        content = client.videos.download_content(video.id)
        assert content.content[4:8] == b"ftyp"
        thumb = client.videos.download_content(video.id, variant="thumbnail")
        assert thumb.content.startswith(b"\x89PNG")
        # a remix reruns the video's settings and seed with the new prompt: as that request would
        remix = client.videos.remix(video.id, prompt="a seven")
        assert remix.id != video.id and remix.prompt == "a seven" and remix.remixed_from_video_id == video.id
        fresh = client.videos.create(
            model="digits-video", prompt="a seven", extra_body={"num_inference_steps": 4, "seed": 5}
        )
        for job in (remix, fresh):
            while job.status in ("queued", "in_progress"):
                time.sleep(0.2)
                job = client.videos.retrieve(job.id)
            assert job.status == "completed", job
        remixed = client.videos.download_content(remix.id).content
        assert remixed == client.videos.download_content(fresh.id).content != content.content


def test_official_openai_client_edits_images_and_animates_a_first_frame(server: Server) -> None:
    """The real models with given pixels, through the unmodified client: `images.edit` with a mask
    keeps the opaque strip and redraws the rest as the prompt's digit; `images.create_variation`
    draws the same digit anew without a prompt; `videos.create` with an `input_reference` keeps it as
    frame 0 and moves the digit as asked; all at 5x (LESA)."""
    import io

    import numpy as np
    from PIL import Image

    from lesa_models.evaluator import classify_digits, classify_frames, motion_direction

    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    steps = {"num_inference_steps": 50, "acceleration": "5x"}

    def pixels(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)))

    one = base64.b64decode(
        client.images.generate(model=MODEL, prompt="a one", extra_body={"seed": 1, **steps}).data[0].b64_json
    )
    mask = np.zeros((16, 16, 4), np.uint8)
    mask[:, :4, 3] = 255  # keep a strip on the left; redraw the rest as a seven
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="RGBA").save(buffer, format="PNG")
    sevens = client.images.edit(
        model=MODEL, image=("one.png", one, "image/png"), mask=("mask.png", buffer.getvalue(), "image/png"),
        prompt="a seven", n=4, extra_body={"seed": 40, **steps},
    )  # fmt: skip
    edited = np.stack([pixels(base64.b64decode(d.b64_json)) for d in sevens.data])
    assert (edited[:, :, :4] == pixels(one)[None, :, :4]).all()
    assert sevens.model_extra["lesa"]["method"] == "lesa"
    assert (classify_digits(edited.astype(np.float32) / 255.0) == 7).sum() >= 3
    variations = client.images.create_variation(
        model=MODEL, image=("one.png", one, "image/png"), n=4, extra_body={"seed": 60, **steps}
    )
    varied = np.stack([pixels(base64.b64decode(d.b64_json)) for d in variations.data]).astype(np.float32) / 255.0
    assert variations.model_extra["lesa"]["method"] == "lesa"
    assert (classify_digits(varied) == 1).sum() >= 3  # the image alone decides: still a one
    assert all(np.abs(v - pixels(one) / 255.0).mean() > 0.01 for v in varied)  # each drawn anew
    if "digits-video" not in {m.id for m in client.models.list().data} or not hasattr(client, "videos"):
        return
    start = client.videos.create(
        model="digits-video", prompt="digit 4 moving to the right", extra_body={"seed": 7, **steps}
    )
    start = _finished(client, start)
    first = client.videos.download_content(start.id, variant="spritesheet").content  # frame 0: top left
    sheet = pixels(first)
    frame0 = Image.fromarray(sheet[: sheet.shape[0] // 2, : sheet.shape[1] // 4]).resize((16, 16), Image.Resampling.BOX)
    buffer = io.BytesIO()
    frame0.save(buffer, format="PNG")
    video = client.videos.create(
        model="digits-video", prompt="digit 4 moving to the right",
        input_reference=("f.png", buffer.getvalue(), "image/png"), extra_body={"seed": 8, **steps},
    )  # fmt: skip
    video = _finished(client, video)
    assert video.model_extra["lesa"]["method"] == "lesa"
    sheet = pixels(client.videos.download_content(video.id, variant="spritesheet").content).astype(np.float32) / 255.0
    frames = np.stack([np.asarray(Image.fromarray(sheet[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128]).resize(
        (16, 16), Image.Resampling.BOX)) for r in range(2) for c in range(4)])  # fmt: skip
    assert np.abs(frames[0] - np.asarray(frame0, np.float32) / 255.0).max() < 0.02
    assert motion_direction(frames) == "right" and (classify_frames(frames) == 4).mean() >= 0.75


def _finished(client, video):
    while video.status in ("queued", "in_progress"):
        time.sleep(0.2)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed", video
    return video


def test_official_openai_client_streams_partial_images(server: Server) -> None:
    """`client.images.generate(stream=True, partial_images=2)` unmodified: two previews of the
    real model's denoising (the later one nearer the result), then the image a plain request gives."""
    import io

    import numpy as np
    from PIL import Image

    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    fields = {"seed": 21, "num_inference_steps": 12, "acceleration": "5x"}
    events = list(client.images.generate(model=MODEL, prompt="a four", stream=True, partial_images=2,
                                         extra_body=fields))  # fmt: skip
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(e.b64_json))), dtype=float) for e in events]
    assert all(p.shape == (16, 16) for p in pixels)
    assert np.mean((pixels[1] - pixels[2]) ** 2) < np.mean((pixels[0] - pixels[2]) ** 2)
    assert events[2].model_extra["lesa"]["level"] == "5x"
    with server.client() as http:
        plain = generate(http, prompt="a four", **fields)
    assert events[2].b64_json == plain["data"][0]["b64_json"]


def test_mixed_sequence_never_leaks_cache_state(server: Server) -> None:
    """A request gives the same image alone and after requests with other levels, methods, CFG
    settings and batch sizes: the cache state is rebuilt per generation."""
    reference = dict(acceleration="5x", method="taylorseer", guidance_scale=4.0, seed=21)
    with server.client() as client:
        alone = generate(client, **reference)["data"][0]["b64_json"]
        generate(client, acceleration="2x", method="reuse", guidance_scale=1.0, seed=5)  # no CFG branch
        generate(client, acceleration="6.25x", method="taylorseer", n=3, seed=6)  # another batch shape
        generate(client, acceleration="none", num_inference_steps=4, seed=7)  # other step count
        generate(client, acceleration="5x", method="reuse", guidance_scale=2.5, seed=8)
        again = generate(client, **reference)
        assert again["data"][0]["b64_json"] == alone
        # ... and caching really changed something, so the comparison above is not vacuous.
        full = generate(client, acceleration="none", guidance_scale=4.0, seed=21)
        assert full["data"][0]["b64_json"] != alone


def test_cancel_mid_run_stops_the_generation(server: Server) -> None:
    with server.client() as client:
        body = {"prompt": "a slow eight", "model": MODEL, "num_inference_steps": 100, "acceleration": "none"}
        job = client.post("/v1/images/jobs", json=body).json()
        deadline = time.monotonic() + 60
        while (state := client.get(f"/v1/images/jobs/{job['id']}").json())["progress"] < 3:
            assert state["status"] in ("queued", "in_progress") and time.monotonic() < deadline
            time.sleep(0.05)
        cancelled = client.delete(f"/v1/images/jobs/{job['id']}").json()
        assert cancelled["status"] == "cancelled"
        # The worker stops at the next step, so a new request waits in the queue about one step,
        # not the >= 97 remaining steps (2 transformer calls each with CFG) of the cancelled job.
        followup = generate(client, num_inference_steps=4, guidance_scale=1.0)["lesa"]  # 4 calls
        final = client.get(f"/v1/images/jobs/{job['id']}").json()
        assert final["status"] == "cancelled" and final["progress"] < 50 and final["result"] is None
        assert followup["queue_ms"] < 10 * followup["generation_ms"], f"worker did not stop: {followup}"
        assert f'lesa_jobs_total{{model="{MODEL}",status="cancelled"}} 1.0' in client.get("/metrics").text


def jobs_total(client: httpx.Client, status: str) -> float:
    found = re.search(rf'lesa_jobs_total{{model="{MODEL}",status="{status}"}} ([0-9.e+]+)', client.get("/metrics").text)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_goes_away_cancels_its_request_unless_it_can_retry(server: Server) -> None:
    """Nobody can collect an abandoned sync request's images: its job is cancelled (the openai
    client retries a timed-out request as a new one; each abandoned try used to run to the end).
    With an Idempotency-Key the retry collects the same job, so that one runs on."""
    slow = {"prompt": "a patient seven", "model": MODEL, "num_inference_steps": 100, "n": 8, "acceleration": "none"}
    auth = {"Authorization": f"Bearer {KEY}"}
    with (
        server.client() as client,
        httpx.Client(base_url=server.url, headers=auth, timeout=httpx.Timeout(60, read=1)) as impatient,
    ):
        cancelled = jobs_total(client, "cancelled")
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/images/generations", json=slow)
        deadline = time.monotonic() + 30
        while jobs_total(client, "cancelled") < cancelled + 1:
            assert time.monotonic() < deadline, "the abandoned job was not cancelled"
            time.sleep(0.1)
        followup = generate(client, num_inference_steps=4, guidance_scale=1.0)["lesa"]
        assert followup["queue_ms"] < 10 * followup["generation_ms"], f"worker did not stop: {followup}"

        # A stream the client closes: the same (its job waits behind a slow one, so it cannot end first).
        ahead = client.post("/v1/images/jobs", json=slow).json()
        streamed = {**slow, "n": 1, "stream": True, "partial_images": 1}
        with impatient.stream("POST", "/v1/images/generations", json=streamed) as response:
            assert response.status_code == 200
            job_id = response.headers["x-job-id"]
        deadline = time.monotonic() + 30
        while (state := client.get(f"/v1/images/jobs/{job_id}").json())["status"] != "cancelled":
            assert state["status"] in ("queued", "in_progress") and time.monotonic() < deadline, state
            time.sleep(0.1)
        assert state["progress"] < 100
        assert client.delete(f"/v1/images/jobs/{ahead['id']}").json()["status"] == "cancelled"

        # With an Idempotency-Key the job runs on, and the retry gets its images.
        key = {"Idempotency-Key": f"retry-me-{time.time()}"}
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/images/generations", json=slow, headers=key)
        time.sleep(1.5)  # past the server's check that the client is gone
        retried = client.post("/v1/images/generations", json=slow, headers=key)
        assert retried.status_code == 200, retried.text
        assert len(retried.json()["data"]) == 8
        assert client.get(f"/v1/images/jobs/{retried.json()['lesa']['job_id']}").json()["status"] == "completed"
        assert jobs_total(client, "cancelled") == cancelled + 3  # the two abandoned ones and `ahead`


def test_delete_cancels_a_running_video(server: Server) -> None:
    if not weights_present("digits-video"):
        pytest.skip("no digits-video checkpoint")
    with server.client() as client:
        body = {"prompt": "a slow nine", "model": "digits-video", "num_inference_steps": 100, "acceleration": "none"}
        video = client.post("/v1/videos", json=body).json()
        deadline = time.monotonic() + 120
        while (state := client.get(f"/v1/videos/{video['id']}").json())["progress"] < 2:
            assert state["status"] in ("queued", "in_progress") and time.monotonic() < deadline
            time.sleep(0.05)
        assert client.delete(f"/v1/videos/{video['id']}").json()["status"] == "cancelled"
        generate(client, num_inference_steps=4, guidance_scale=1.0)  # served: the worker stopped the video
        final = client.get(f"/v1/videos/{video['id']}").json()
        assert final["status"] == "cancelled" and final["progress"] < 50 and final["error"]["code"] == "cancelled"
        assert client.get(f"/v1/videos/{video['id']}/content").status_code == 409  # never any content


def test_shadow_check_reports_the_psnr_of_a_served_lesa_sample_vs_full_compute() -> None:
    """LESA_SHADOW_FRACTION=1 on the real model and its real 5x bundle: the exported PSNR is the
    one the benchmark's metric gives for the same seed, accelerated vs full compute."""
    from fastapi.testclient import TestClient

    import lesa_core
    from lesa_core.benchmark import psnr_per_sample
    from lesa_models import load_pipeline

    settings = Settings(_env_file=None, models=MODEL, warmup=False, shadow_fraction=1.0, default_level="none")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 240
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready in time"
            time.sleep(0.2)
        body = {"prompt": "a thin three", "model": MODEL, "seed": 1003, "num_inference_steps": 50}
        # First a 20-step job and one at guidance 12: the card was measured at 50 steps and guidance
        # 4, so neither may be checked (if one were, its check would run first and count as a
        # second "done" below).
        client.post("/v1/images/generations", json={**body, "acceleration": "5x", "num_inference_steps": 20})
        client.post("/v1/images/generations", json={**body, "acceleration": "5x", "guidance_scale": 12})  # card: 4
        served = client.post("/v1/images/generations", json={**body, "acceleration": "5x"}).json()
        assert served["lesa"]["method"] == "lesa"
        labels = f'level="5x",method="lesa",model="{MODEL}"'
        deadline = time.monotonic() + 60
        while f"lesa_shadow_psnr_db_count{{{labels}}} 1.0" not in (metrics := client.get("/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        engine = client.app.state.services.engine
        predictor = engine.models[MODEL].bundles["5x"].predictor
    (line,) = [x for x in metrics.splitlines() if x.startswith(f"lesa_shadow_psnr_db_sum{{{labels}}}")]
    exported = float(line.split()[-1])
    pipe = load_pipeline(MODEL)
    run = dict(seeds=[1003], height=16, width=16, num_inference_steps=50)
    full = pipe(["a thin three"], **run).samples
    fast = pipe(["a thin three"], **run, cache=lesa_core.CacheConfig("lesa", predictor.schedule, predictor=predictor))
    expected = float(psnr_per_sample(fast.samples, full)[0])
    assert 25 < exported < 60 and abs(exported - expected) < 1e-3, (exported, expected)
    assert f'lesa_shadow_checks_total{{level="5x",model="{MODEL}",result="done"}} 1.0' in metrics
    assert f"lesa_quality_card_psnr_db{{{labels}}}" in metrics
