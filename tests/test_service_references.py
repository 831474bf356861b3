"""Given pixels: `POST /v1/images/edits` (image, mask, strength) and a video's `input_reference`,
on the fake pipeline of tests/service_support.py (it ends as the real sampler does: kept pixels
are the reference's). The real model keeps and follows them in tests/test_models.py and
tests/test_service_e2e.py.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import assert_error, free_port, make_engine, settings, uvicorn_thread, wait_for

from lesa_core.pipeline_types import reference_steps
from service.app import create_app
from service.engine import Engine


@pytest.fixture
def engine() -> Engine:
    return make_engine(settings())


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine=engine)) as c:
        yield c


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


# a 32x32 picture (the service resizes it to the output size) and a mask: left half opaque (kept)
PICTURE = np.tile(np.linspace(0, 255, 32), (32, 1))
MASK = np.zeros((32, 32, 4))
MASK[:, :16, 3] = 255


def edit(client: TestClient, files: dict, **fields) -> object:
    data = {"prompt": "a seven", "model": "fake-image", "size": "16x16", "num_inference_steps": "8", **fields}
    return client.post("/v1/images/edits", data=data, files=files)


def last_reference(engine: Engine, model: str = "fake-image"):
    return engine.models[model].pipe.calls[-1]["reference"]


def test_an_edit_keeps_the_image_where_the_mask_is_opaque(client: TestClient, engine: Engine) -> None:
    response = edit(client, {"image": ("in.png", png(PICTURE)), "mask": ("mask.png", png(MASK, "RGBA"))}, seed="3")
    assert response.status_code == 200, response.text
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))
    expected = np.asarray(Image.fromarray(PICTURE.astype(np.uint8)).resize((16, 16), Image.Resampling.BOX))
    assert np.abs(out[:, :8].astype(int) - expected[:, :8]).max() <= 1  # kept: the picture, at 16x16
    assert np.abs(out[:, 8:].astype(int) - expected[:, 8:]).mean() > 20  # edited: generated
    reference = last_reference(engine)
    assert reference.keep[0][:, :8].all() and not reference.keep[0][:, 8:].any()
    assert list(reference.follow_until) == [0]  # with a mask, strength 1: the transparent part drawn anew
    assert response.json()["lesa"]["seed"] == 3


def test_an_edit_without_mask_follows_the_image_for_the_steps_strength_leaves(
    client: TestClient, engine: Engine
) -> None:
    image = {"image": ("in.png", png(PICTURE))}
    assert edit(client, image).status_code == 200
    assert (
        list(last_reference(engine).follow_until) == [reference_steps(0.6, 8)] and not last_reference(engine).keep.any()
    )
    assert edit(client, image, strength="0.25").status_code == 200
    assert list(last_reference(engine).follow_until) == [reference_steps(0.25, 8)] == [6]
    kept = edit(client, image, strength="0")  # the image itself
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(kept.json()["data"][0]["b64_json"]))))
    assert (
        np.abs(
            out.astype(int) - np.asarray(Image.open(io.BytesIO(png(PICTURE))).resize((16, 16), Image.Resampling.BOX))
        ).max()
        <= 1
    )


def test_an_edit_is_refused_by_name_when_its_files_or_fields_are_wrong(client: TestClient, engine: Engine) -> None:
    image = ("in.png", png(PICTURE))
    assert_error(edit(client, {}), 400, "image")  # no image
    assert_error(edit(client, {"image": image, "image[]": image}), 400, "image")  # two
    assert "not an image" in assert_error(edit(client, {"image": ("x.png", b"not a png")}), 400, "image")["message"]
    bomb = png(np.zeros((5000, 5000)))  # 25 M pixels in a few kB: refused before it is decoded
    assert (
        len(bomb) < 100_000
        and "pixels" in assert_error(edit(client, {"image": ("b.png", bomb)}), 400, "image")["message"]
    )
    no_alpha = assert_error(edit(client, {"image": image, "mask": ("m.png", png(PICTURE))}), 400, "mask")
    assert "alpha" in no_alpha["message"]
    small = np.zeros((8, 8, 4))
    assert (
        "must match"
        in assert_error(edit(client, {"image": image, "mask": ("m.png", png(small, "RGBA"))}), 400, "mask")["message"]
    )
    assert_error(edit(client, {"image": image}, strength="1.5"), 400, "strength")
    assert_error(edit(client, {"image": image}, n="two"), 400, "n")
    assert_error(edit(client, {"image": image, "prompt": ("p.txt", b"a seven")}), 400, "prompt")  # a file for text
    json_body = client.post("/v1/images/edits", json={"prompt": "a seven", "image": "in.png"})
    assert "multipart" in assert_error(json_body, 400, "image")["message"]
    assert_error(edit(client, {"image": image}, model="fake-video"), 400, "model")
    assert client.get("/v1/models/fake-image").json()["image_input"] is True
    engine.models["fake-image"].reference_mode = None  # e.g. a production model: not yet
    assert client.get("/v1/models/fake-image").json()["image_input"] is False
    assert assert_error(edit(client, {"image": image}), 400, "image")["code"] == "unsupported"
    calls = engine.models["fake-image"].pipe.calls
    assert all(call["reference"] is None for call in calls)  # nothing ran


def test_a_stream_of_an_edit_ends_with_the_edited_image(client: TestClient) -> None:
    response = edit(client, {"image": ("in.png", png(PICTURE))}, stream="true", partial_images="1", strength="0")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.splitlines() if line.startswith("event: ")]
    assert events[-1] == "event: image_generation.completed" and "event: image_generation.partial_image" in events


def test_an_idempotency_key_tells_edits_of_other_images_apart(client: TestClient) -> None:
    headers = {"Idempotency-Key": "edit-1"}
    data = {"prompt": "a seven", "model": "fake-image", "seed": "1"}
    first = client.post("/v1/images/edits", data=data, files={"image": ("a.png", png(PICTURE))}, headers=headers)
    again = client.post("/v1/images/edits", data=data, files={"image": ("b.png", png(PICTURE))}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert first.json()["lesa"]["job_id"] == again.json()["lesa"]["job_id"]  # same pixels: the same job
    other = client.post("/v1/images/edits", data=data, files={"image": ("a.png", png(255 - PICTURE))}, headers=headers)
    assert other.status_code == 422, other.text


def test_variations_redraw_the_image_without_a_prompt_each_from_its_own_seed(
    client: TestClient, engine: Engine
) -> None:
    form = {"model": "fake-image", "size": "16x16", "n": "2", "num_inference_steps": "8", "seed": "5"}
    image = {"image": ("in.png", png(PICTURE))}
    response = client.post("/v1/images/variations", data=form, files=image)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2
    call = engine.models["fake-image"].pipe.calls[-1]
    assert call["prompts"] == ["", ""] and call["seeds"] == [5, 6]  # the image alone decides, twice
    reference = last_reference(engine)
    assert list(reference.follow_until) == [reference_steps(0.5, 8)] * 2 and not reference.keep.any()
    expected = np.asarray(Image.fromarray(PICTURE.astype(np.uint8)).resize((16, 16), Image.Resampling.BOX)) / 255.0
    assert np.abs(reference.samples - expected).max() < 1 / 255 + 1e-6
    # LESA's fields: a prompt, a strength
    prompted = client.post("/v1/images/variations", data={**form, "prompt": "a seven", "strength": "0.25"}, files=image)
    assert prompted.status_code == 200, prompted.text
    call = engine.models["fake-image"].pipe.calls[-1]
    assert call["prompts"] == ["a seven"] * 2 and list(call["reference"].follow_until) == [reference_steps(0.25, 8)] * 2
    # errors name the field
    assert_error(client.post("/v1/images/variations", data=form), 400, "image")
    with_mask = client.post("/v1/images/variations", data=form, files={**image, "mask": ("m.png", png(MASK, "RGBA"))})
    assert_error(with_mask, 400, "mask")
    assert_error(client.post("/v1/images/variations", data={**form, "strength": "2"}, files=image), 400, "strength")
    blank = client.post("/v1/images/variations", data={**form, "prompt": "  "}, files=image)
    assert assert_error(blank, 400, "prompt")["code"] == "empty_prompt"
    assert_error(client.post("/v1/images/generations", json={"prompt": ""}), 400, "prompt")  # generations need one
    # as a job (the playground's): an image and no prompt is a variation, with a mask an edit needing one
    job = client.post("/v1/images/jobs", data={**form, "prompt": ""}, files=image)
    assert job.status_code == 202, job.text
    assert wait_for(client, f"/v1/images/jobs/{job.json()['id']}", {"completed", "failed"})["status"] == "completed"
    call = engine.models["fake-image"].pipe.calls[-1]
    assert call["prompts"] == ["", ""] and list(call["reference"].follow_until) == [reference_steps(0.5, 8)] * 2
    masked = client.post("/v1/images/jobs", data=form, files={**image, "mask": ("m.png", png(MASK, "RGBA"))})
    assert_error(masked, 400, "prompt")
    # /docs says so: a variation's form needs the image only, an image job's a prompt only with a mask
    paths = client.get("/openapi.json").json()["paths"]
    forms = {p: paths[p]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
             for p in ("/v1/images/variations", "/v1/images/jobs", "/v1/images/edits")}  # fmt: skip
    assert [forms[p]["required"] for p in forms] == [["image"], ["image"], ["prompt", "image"]]
    engine.models["fake-image"].reference_mode = None
    refused = client.post("/v1/images/variations", data=form, files=image)
    assert assert_error(refused, 400, "image")["code"] == "unsupported"


def test_a_video_from_an_input_reference_keeps_it_as_its_first_frame(client: TestClient, engine: Engine) -> None:
    frame = png(PICTURE)
    created = client.post(
        "/v1/videos", data={"prompt": "a two moving up", "num_frames": "4", "seed": "4"},
        files={"input_reference": ("first.png", frame)},
    )  # fmt: skip
    assert created.status_code == 200, created.text
    video = wait_for(client, f"/v1/videos/{created.json()['id']}", {"completed", "failed"})
    assert video["status"] == "completed"
    reference = last_reference(engine, "fake-video")
    assert reference.keep.shape == (1, 4, 16, 16) and reference.keep[0, 0].all() and not reference.keep[0, 1:].any()
    expected = np.asarray(Image.open(io.BytesIO(frame)).resize((16, 16), Image.Resampling.BOX)) / 255.0
    assert np.abs(reference.samples[0, 0] - expected).max() < 1 / 255 + 1e-6
    # a remix keeps the first frame (and the seed), with the new prompt
    remix = client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "a two moving down"}).json()
    assert wait_for(client, f"/v1/videos/{remix['id']}", {"completed", "failed"})["status"] == "completed"
    again = last_reference(engine, "fake-video")
    assert np.array_equal(again.samples, reference.samples) and np.array_equal(again.keep, reference.keep)
    # errors name the field: two files, not an image, JSON (which cannot carry a file)
    two = client.post("/v1/videos", data={"prompt": "x"}, files=[("input_reference", ("a.png", frame))] * 2)
    assert_error(two, 400, "input_reference")
    bad = client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", b"GIF89a?")})
    assert_error(bad, 400, "input_reference")
    assert_error(client.post("/v1/videos", json={"prompt": "x", "input_reference": "a.png"}), 400, "input_reference")
    engine.models["fake-video"].reference_mode = None
    refused = client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", frame)})
    assert assert_error(refused, 400, "input_reference")["code"] == "unsupported"


def test_jobs_with_and_without_given_pixels_share_a_batch(engine: Engine) -> None:
    plain = engine.resolve_image(_request(seed=1))
    edited = engine.given_pixels(engine.resolve_image(_request(seed=2, n=2)), png(PICTURE), png(MASK, "RGBA"))
    assert plain.batch_key() == edited.batch_key()
    results = engine.run_batch([plain, edited])
    reference = last_reference(engine)
    assert reference.samples.shape == (3, 16, 16) and list(reference.follow_until) == [0, 0, 0]
    assert not reference.keep[0].any() and reference.keep[1].sum() == reference.keep[2].sum() == 128
    assert not np.array_equal(results[0].samples[0][:, :8], reference.samples[1][:, :8])  # the plain one: generated
    assert np.array_equal(results[1].samples[1][:, :8], reference.samples[2][:, :8])


def _request(**fields):
    from service.schemas import ImageEditRequest

    return ImageEditRequest(prompt="a seven", model="fake-image", size="16x16", num_inference_steps=8, **fields)


def test_official_openai_client_edits_an_image() -> None:
    """`client.images.edit` unmodified (multipart with image, mask and extra fields) against uvicorn."""
    openai = pytest.importorskip("openai")
    port = free_port()
    s = settings(port=port)
    with uvicorn_thread(create_app(s, engine=make_engine(s)), port) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        result = client.images.edit(
            model="fake-image", image=("in.png", png(PICTURE), "image/png"),
            mask=("mask.png", png(MASK, "RGBA"), "image/png"), prompt="a seven", size="16x16",  # type: ignore[arg-type]
            extra_body={"seed": 9, "num_inference_steps": 8, "strength": 1.0},
        )  # fmt: skip
        out = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or ""))))
        expected = np.asarray(Image.fromarray(PICTURE.astype(np.uint8)).resize((16, 16), Image.Resampling.BOX))
        assert out.shape == (16, 16) and np.abs(out[:, :8].astype(int) - expected[:, :8]).max() <= 1
        assert result.model_extra["lesa"]["seed"] == 9
        with pytest.raises(openai.BadRequestError, match="mask"):
            client.images.edit(image=("in.png", png(PICTURE), "image/png"), mask=("m.png", png(PICTURE), "image/png"),
                               prompt="a seven")  # fmt: skip


def test_an_rgb_model_gets_rgb_pixels_and_a_mask_on_every_channel(engine: Engine) -> None:
    """A production image model (`reference_mode` "RGB": FLUX, Qwen-Image) is handed the colours."""
    from service.engine import _reference

    engine.models["fake-image"].reference_mode = "RGB"
    colour = np.zeros((32, 32, 3))
    colour[..., 0] = 255  # red
    spec = engine.given_pixels(engine.resolve_image(_request(seed=1)), png(colour, "RGB"), png(MASK, "RGBA"))
    reference = _reference([spec])
    assert reference.samples.shape == reference.keep.shape == (1, 16, 16, 3)
    assert (reference.samples[0, ..., 0] == 1.0).all() and (reference.samples[0, ..., 1:] == 0.0).all()
    assert reference.keep[0, :, :8].all() and not reference.keep[0, :, 8:].any()


def test_an_edit_runs_as_a_job_too(client: TestClient, engine: Engine) -> None:
    """`POST /v1/images/jobs` takes the edit's form as it takes the generation's JSON (the
    playground's edits: progress and cancel as for any job)."""
    data = {"prompt": "a seven", "model": "fake-image", "num_inference_steps": "8", "strength": "0.25"}
    created = client.post("/v1/images/jobs", data=data, files={"image": ("in.png", png(PICTURE))})
    assert created.status_code == 202, created.text
    done = wait_for(client, f"/v1/images/jobs/{created.json()['id']}", {"completed", "failed"})
    assert done["status"] == "completed"
    assert list(last_reference(engine).follow_until) == [reference_steps(0.25, 8)]
    # a form without an image is a generation; a generation has no strength, and a mask needs its image
    plain = client.post("/v1/images/jobs", data={"prompt": "a seven", "n": "2"})
    assert plain.status_code == 202 and plain.json()["n"] == 2
    assert_error(client.post("/v1/images/jobs", json={"prompt": "a seven", "strength": 0.5}), 400, "strength")
    masked = client.post("/v1/images/jobs", data={"prompt": "x"}, files={"mask": ("m.png", png(MASK, "RGBA"))})
    assert_error(masked, 400, "image")


def test_an_upload_may_be_larger_than_a_json_body_up_to_its_own_limit() -> None:
    """A real photo for FLUX is megabytes: a multipart form with files is bounded by
    LESA_MAX_UPLOAD_BYTES, every other body by LESA_MAX_BODY_BYTES (a form on another route too)."""
    s = settings(max_body_bytes=100_000, max_upload_bytes=3_000_000)
    big = np.random.default_rng(0).integers(0, 256, (900, 900)).astype(np.uint8)  # ~800 kB as PNG
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        image = {"image": ("big.png", png(big))}
        assert edit(client, image).status_code == 200  # resized to 16x16
        job = client.post("/v1/images/jobs", data={"prompt": "a seven"}, files=image)
        assert job.status_code == 202, job.text
        video = client.post("/v1/videos", data={"prompt": "a two"}, files={"input_reference": ("f.png", png(big))})
        assert video.status_code == 200, video.text
        assert_error(client.post("/v1/images/generations", json={"prompt": "x" * 200_000}), 413, None)
        other = client.post("/v1/images/generations", data={"prompt": "a seven"}, files=image)
        assert_error(other, 413, None)  # not a route that takes files
        huge = np.random.default_rng(1).integers(0, 256, (2000, 2000)).astype(np.uint8)  # ~4 MB
        assert_error(edit(client, {"image": ("huge.png", png(huge))}), 413, None)


def test_decoding_an_upload_does_not_stall_other_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large photo takes the API hundreds of ms to decode and resize (4096x4096: 0.5-0.9 s here);
    on the event loop that stalled every other request, event stream and poll meanwhile."""
    import threading
    import time

    import httpx

    from lesa_core import given_images

    decode = given_images.read_upload

    def slow_decode(data: bytes, param: str):
        time.sleep(1.0)  # as a large photo would take
        return decode(data, param)

    monkeypatch.setattr(given_images, "read_upload", slow_decode)
    port = free_port()
    s = settings(port=port)
    with uvicorn_thread(create_app(s, engine=make_engine(s)), port) as url:
        form = {"prompt": "a seven", "model": "fake-image", "size": "16x16", "num_inference_steps": "8"}
        answers = []
        edit = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/images/edits", data=form, files={"image": ("in.png", png(PICTURE))}, timeout=30)
            )
        )
        edit.start()
        time.sleep(0.2)  # the edit is decoding now
        started = time.perf_counter()
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        assert time.perf_counter() - started < 0.5
        edit.join()
        assert answers[0].status_code == 200, answers[0].text


def test_an_edit_raised_under_load_decodes_its_image_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy server runs an edit at its `max_acceleration`: the level is resolved twice, the image
    (which can take a second to decode) only once."""
    from lesa_core import given_images

    decoded = []
    decode = given_images.read_upload
    monkeypatch.setattr(given_images, "read_upload", lambda data, param: decoded.append(param) or decode(data, param))
    s = settings(load_queue_depth=1)
    with TestClient(create_app(s, engine=make_engine(s, step_delay=0.05))) as client:
        blocker = client.post("/v1/images/jobs", json={"prompt": "busy", "size": "32x16", "num_inference_steps": 40})
        wait_for(client, f"/v1/images/jobs/{blocker.json()['id']}", {"in_progress"})
        client.post("/v1/images/jobs", json={"prompt": "queued", "size": "32x16", "num_inference_steps": 40})
        fields = {"acceleration": "none", "max_acceleration": "5x", "seed": "3"}
        answer = edit(client, {"image": ("in.png", png(PICTURE))}, **fields)
        assert answer.status_code == 200, answer.text
        assert answer.json()["lesa"]["raised_from"] == "none" and decoded == ["image"]
