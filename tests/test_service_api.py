"""API shape, errors, limits, jobs, batching and cancellation: fast, on the fake pipeline of
tests/service_support.py. The real model runs in tests/test_service_e2e.py.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import assert_error, free_port, make_engine, settings, uvicorn_thread, wait_for

import service.deps
from lesa_core import level_schedule
from service.app import create_app
from service.deps import cancel, get_job
from service.engine import Engine, content_id
from service.queue import JobStatus, QueueUnavailable
from service.schemas import ImageGenerationRequest


@pytest.fixture
def client() -> Iterator[TestClient]:
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s))) as c:
        yield c


def test_models_list_sizes_levels_and_quality_cards(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {m["id"]: m for m in body["data"]}
    image = cards["fake-image"]
    assert image["kind"] == "image" and image["sizes"] == ["16x16", "32x16"] and image["step_range"] == [4, 100]
    levels = {lvl["level"]: lvl for lvl in image["acceleration"]}
    assert set(levels) == {"none", "2x", "3.3x", "5x", "6.25x"}
    assert levels["5x"]["lesa_available"] and levels["5x"]["quality"]["psnr"] == 31.5
    assert levels["5x"]["methods"][0] == "lesa" and not levels["2x"]["lesa_available"]
    assert cards["fake-video"]["num_frames"] == [4, 8]
    assert client.get("/v1/models/fake-video").json()["kind"] == "video"


def test_image_generation_b64_with_lesa_stats(client: TestClient) -> None:
    response = client.post(
        "/v1/images/generations",
        json={"prompt": "a seven", "model": "fake-image", "n": 2, "size": "32x16", "seed": 7,
              "acceleration": "5x", "num_inference_steps": 8},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert image.size == (32, 16) and image.format == "PNG"
    assert body["data"][0]["revised_prompt"] == "a seven"
    lesa = body["lesa"]
    # A bundle exists for 5x at 8 steps, so the default method is LESA.
    assert lesa["level"] == "5x" and lesa["method"] == "lesa" and lesa["seed"] == 7 and lesa["seeds"] == [7, 8]
    assert lesa["full_steps"] + lesa["predicted_steps"] == 8 and lesa["predicted_steps"] > 0
    assert lesa["realised_speedup"] > 0 and lesa["queue_ms"] >= 0 and lesa["generation_ms"] > 0
    # Another level without a bundle falls to the training-free default, and says so.
    body = client.post("/v1/images/generations", json={"prompt": "a two", "acceleration": "2x"}).json()
    assert body["lesa"]["method"] == "taylorseer" and body["lesa"]["level"] == "2x"
    # "auto" picks the measured bundle (psnr 31.5 >= the default floor).
    body = client.post("/v1/images/generations", json={"prompt": "a two", "acceleration": "auto"}).json()
    assert body["lesa"]["level"] == "5x" and body["lesa"]["requested_acceleration"] == "auto"
    # ... and so do the async routes' results, which held null (the request was gone by then)
    job = client.post("/v1/images/jobs", json={"prompt": "a two", "acceleration": "auto"}).json()
    done = wait_for(client, f"/v1/images/jobs/{job['id']}", {"completed"})
    assert done["result"]["lesa"]["requested_acceleration"] == "auto"
    video = client.post("/v1/videos", json={"prompt": "a two", "num_frames": 4, "acceleration": "auto"}).json()
    assert wait_for(client, f"/v1/videos/{video['id']}", {"completed"})["lesa"]["requested_acceleration"] == "auto"


def test_n_above_the_servers_batch_cap_is_refused_naming_n() -> None:
    """One job is one pipeline call: n=8 on a LESA_MAX_BATCH=2 server ran 8 samples at once."""
    s = settings(max_batch=2)
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        for path in ("/v1/images/generations", "/v1/images/jobs"):
            error = assert_error(client.post(path, json={"prompt": "a one", "n": 3}), 400, "n")
            assert "at most 2 images per batch (LESA_MAX_BATCH)" in error["message"]
        assert client.post("/v1/images/generations", json={"prompt": "a one", "n": 2}).status_code == 200


def test_url_format_and_content_endpoint(client: TestClient) -> None:
    body = client.post(
        "/v1/images/generations", json={"prompt": "a one", "response_format": "url", "output_format": "webp"}
    ).json()
    url = body["data"][0]["url"]
    assert url.startswith("http://testserver/v1/images/job_")
    content = client.get(url)
    assert content.status_code == 200 and content.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(content.content)).size == (16, 16)
    assert_error(client.get(url.replace("index=0", "index=3")), 404, "index")


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"prompt": "x", "model": "nope"}, 404, "model"),
        ({"prompt": "x", "model": "fake-video"}, 400, "model"),
        ({"prompt": "x", "acceleration": "9x"}, 400, "acceleration"),
        ({"prompt": "x", "size": "64x64"}, 400, "size"),
        ({"prompt": "x", "size": "big"}, 400, "size"),
        ({"prompt": "x", "n": 9}, 400, "n"),
        ({"prompt": "x", "acceleraton": "5x"}, 400, "acceleraton"),
        ({"model": "fake-image"}, 400, "prompt"),
        ({"prompt": "x", "num_inference_steps": 2}, 400, "num_inference_steps"),
        ({"prompt": "x", "acceleration": "2x", "method": "lesa"}, 400, "method"),
        ({"prompt": "x", "acceleration": "5x", "method": "lesa", "num_inference_steps": 20}, 400, "method"),
        ({"prompt": "x", "method": "magic"}, 400, "method"),
        ({"prompt": "x", "acceleration": "auto", "method": "taylorseer"}, 400, "acceleration"),
        ({"prompt": "x", "response_format": "gif"}, 400, "response_format"),
        ({"prompt": "x", "seed": -1}, 400, "seed"),
        ({"prompt": "   "}, 400, "prompt"),
        ({"prompt": "\u200b\u2060"}, 400, "prompt"),  # zero-width characters only: nothing to draw
        ({"prompt": "x", "acceleration": "7x", "method": "none"}, 400, "acceleration"),  # checked whatever the method
        ({"prompt": "x", "acceleration": ""}, 400, "acceleration"),  # not the default in disguise
        ({"prompt": "x", "acceleration": "none", "method": "lesa"}, 400, "method"),  # no silent full compute
        ({"prompt": "x", "acceleration": "2x", "method": "none"}, 400, "method"),  # nor the other way round
        ({"prompt": "x", "size": "\u0661\u0666x\u0661\u0666"}, 400, "size"),  # digits, but not ASCII ones
        ({"prompt": "x", "acceleration": "5" * 5000}, 400, "acceleration"),  # not echoed back in full
        ({"prompt": "x", "n": True}, 400, "n"),  # JSON integers are integers, not coerced
        ({"prompt": "x", "n": "2"}, 400, "n"),
        ({"prompt": "x", "seed": "7"}, 400, "seed"),
        ({"prompt": "x", "guidance_scale": True}, 400, "guidance_scale"),  # not 1.0, which turns CFG off
        ({"prompt": "x", "guidance_scale": "4"}, 400, "guidance_scale"),
        # max_acceleration is checked with the request, not first when the server is busy
        ({"prompt": "x", "max_acceleration": "auto"}, 400, "max_acceleration"),
        ({"prompt": "x", "max_acceleration": "9x"}, 400, "max_acceleration"),
        (
            {"prompt": "x", "acceleration": "5x", "max_acceleration": "2x", "num_inference_steps": 50},
            400,
            "max_acceleration",
        ),  # slower
        ({"prompt": "x", "acceleration": "none", "method": "none", "max_acceleration": "5x"}, 400, "max_acceleration"),
        (
            {
                "prompt": "x",
                "acceleration": "5x",
                "method": "lesa",
                "num_inference_steps": 8,
                "max_acceleration": "6.25x",
            },
            400,
            "max_acceleration",
        ),  # no LESA predictor at 6.25x
    ],
)
def test_invalid_requests_name_the_field(client: TestClient, payload: dict, status: int, param: str) -> None:
    assert_error(client.post("/v1/images/generations", json=payload), status, param)


def test_malformed_oversize_and_unknown_routes(client: TestClient) -> None:
    response = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400, None)
    big = {"prompt": "x" * 2_000_000}
    assert_error(client.post("/v1/images/generations", json=big), 413, None)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(20):
            yield b" " * 100_000

    assert_error(client.post("/v1/images/generations", content=chunks()), 413, None)
    assert_error(client.get("/v1/nothing"), 404, None)
    # Starlette's own errors carry a code like every other error
    assert assert_error(client.put("/v1/models"), 405, None)["code"] == "method_not_allowed"
    garbage = client.post("/v1/videos", content=b"garbage", headers={"Content-Type": "multipart/form-data"})
    assert assert_error(garbage, 400, None)["code"] == "invalid_body"
    assert_error(client.get("/v1/videos/job_unknown"), 404, "video_id")
    assert_error(client.delete("/v1/videos/job_unknown"), 404, "video_id")
    huge = assert_error(client.get("/v1/images/jobs/" + "j" * 50_000), 404, "id")  # not echoed back whole
    assert len(huge["message"]) < 300 and "jjj..." in huge["message"]
    # A body that is not a JSON object gets a message saying so, whatever its content type.
    for content, headers in (
        (b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}),
        (b'{"prompt": "x"}', {"content-type": "text/plain"}),
        (b"", {"content-type": "application/json"}),
        (b'{"prompt": "\xff"}', {"content-type": "application/json"}),
    ):
        error = assert_error(client.post("/v1/images/generations", content=content, headers=headers), 400, None)
        assert error["code"] == "invalid_json" and "JSON" in error["message"], error
    # JSON nested deeper than the parser goes is bad JSON, on both kinds of request
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v1/images/generations", "/v1/videos"):
        response = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert assert_error(response, 400, None)["code"] == "invalid_json"
    # NaN and Infinity (Python's json allows them): "not a finite number", not "must be <= 50".
    for value in (b"NaN", b"Infinity"):
        body = b'{"prompt": "x", "guidance_scale": ' + value + b"}"
        response = client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
        assert "finite" in assert_error(response, 400, "guidance_scale")["message"]


def test_null_means_the_default_and_probes_answer_head(client: TestClient) -> None:
    """OpenAI clients send null for unset fields: it means the default, as on OpenAI's API."""
    body = {"prompt": "a one", "n": None, "response_format": None, "output_format": None, "size": None}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1 and "b64_json" in response.json()["data"][0]
    assert_error(client.post("/v1/images/generations", json={"prompt": None}), 400, "prompt")
    assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 200


def test_priority_orders_the_line_and_is_echoed_on_jobs() -> None:
    """No worker: jobs stay queued, so their places in line show the order workers would take."""
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s), run_worker=False)) as client:
        low = client.post("/v1/images/jobs", json={"prompt": "a one", "priority": "low"}).json()
        normal = client.post("/v1/images/jobs", json={"prompt": "a two"}).json()
        high = client.post("/v1/images/jobs", json={"prompt": "a three", "priority": "high"}).json()
        assert [j["priority"] for j in (low, normal, high)] == ["low", "normal", "high"]
        line = [client.get(f"/v1/images/jobs/{j['id']}").json()["queue_position"] for j in (low, normal, high)]
        assert line == [2, 1, 0]
        video = client.post(
            "/v1/videos", data={"prompt": "a four", "priority": "high"}
        ).json()  # a form, as openai sends
        assert video["priority"] == "high" and video["queue_position"] == 0
        assert (
            "high"
            in assert_error(
                client.post("/v1/images/jobs", json={"prompt": "x", "priority": "urgent"}), 400, "priority"
            )["message"]
        )


def test_lesa_priority_aging_s_lets_a_long_waiting_job_keep_its_place_before_newer_high_ones() -> None:
    for aging, expected in ((None, [1, 0]), (0.2, [0, 1])):
        s = settings(priority_aging_s=aging)
        with TestClient(create_app(s, engine=make_engine(s), run_worker=False)) as client:
            low = client.post("/v1/images/jobs", json={"prompt": "a one", "priority": "low"}).json()["id"]
            time.sleep(0.5)  # more than two classes' worth of aging
            high = client.post("/v1/images/jobs", json={"prompt": "a two", "priority": "high"}).json()["id"]
            assert [client.get(f"/v1/images/jobs/{j}").json()["queue_position"] for j in (low, high)] == expected


def test_high_priority_is_kept_to_the_keys_named_for_it() -> None:
    s = settings(api_keys="ops, app", high_priority_keys="ops")
    with TestClient(create_app(s, engine=make_engine(s), run_worker=False)) as client:
        ops, app = ({"Authorization": f"Bearer {k}"} for k in ("ops", "app"))
        body = {"prompt": "a one", "priority": "high"}
        assert client.post("/v1/images/jobs", json=body, headers=ops).json()["priority"] == "high"
        refused = client.post("/v1/videos", json=body, headers=app)
        assert assert_error(refused, 403, "priority")["code"] == "priority_not_allowed"
        assert_error(client.post("/v1/images/generations", json=body, headers=app), 403, "priority")
        assert client.post("/v1/images/jobs", json={**body, "priority": "low"}, headers=app).status_code == 202


def test_queue_full_429_and_sync_timeout_504() -> None:
    s = settings(max_backlog=1, sync_timeout_s=0.2)
    # No worker: jobs stay queued, so the backlog fills and sync requests time out.
    with TestClient(create_app(s, engine=make_engine(s), run_worker=False)) as client:
        response = client.post("/v1/images/generations", json={"prompt": "x"})
        error = assert_error(response, 504, None)
        assert error["type"] == "timeout" and error["job_id"].startswith("job_") and "0.2 s" in error["message"]
        # SDKs must not retry it: that would start a second generation of the same request.
        assert response.headers["x-should-retry"] == "false"
        job = client.get(f"/v1/images/jobs/{error['job_id']}").json()
        assert job["status"] == "queued" and job["object"] == "image.job" and job["attempts"] == 0
        response = client.post("/v1/images/jobs", json={"prompt": "y"})
        assert_error(response, 429, None)
        assert int(response.headers["retry-after"]) >= 1


def test_api_keys_when_configured() -> None:
    s = settings(api_keys="k1, k2")
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        assert_error(client.get("/v1/models"), 401, None)
        assert_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, None)
        # A non-ASCII token is a wrong key (401), not a crash in the comparison (it was a 500).
        headers = {"Authorization": "Bearer café".encode()}
        assert_error(client.get("/v1/models", headers=headers), 401, None)
        assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_outputs_serve_byte_ranges_head_and_revalidation_as_players_and_downloaders_ask(client: TestClient) -> None:
    """A <video> element (Safari insists) and resumable downloads ask for byte ranges; a HEAD asks
    the size; a cache revalidates with the ETag. Files are named after their job."""
    video = client.post("/v1/videos", json={"prompt": "a three", "num_frames": 8}).json()
    assert wait_for(client, f"/v1/videos/{video['id']}", {"completed", "failed"})["status"] == "completed"
    url = f"/v1/videos/{video['id']}/content"
    whole = client.get(url)
    body, size = whole.content, len(whole.content)
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["etag"]
    assert video["id"] in whole.headers["content-disposition"] and ".mp4" in whole.headers["content-disposition"]
    for asked, first, last in (("bytes=0-9", 0, 9), ("bytes=10-", 10, size - 1), ("bytes=-5", size - 5, size - 1),
                               (f"bytes=4-{size + 100}", 4, size - 1)):  # fmt: skip
        got = client.get(url, headers={"Range": asked})
        assert got.status_code == 206 and got.content == body[first : last + 1], asked
        assert got.headers["content-range"] == f"bytes {first}-{last}/{size}", asked
    past = client.get(url, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    for ignored in ("bytes=0-1,4-5", "items=0-1", "bytes=x-y"):  # several ranges, or none readable: it all
        assert client.get(url, headers={"Range": ignored}).content == body, ignored
    # If-Range with another validator: the file changed, so the whole of it
    stale = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == body
    head = client.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(size) and head.content == b""
    assert client.get(url, headers={"If-None-Match": whole.headers["etag"]}).status_code == 304
    image = client.post("/v1/images/generations", json={"prompt": "a one", "response_format": "url"}).json()
    image_url = image["data"][0]["url"]
    png = client.get(image_url, headers={"Range": "bytes=0-7"})
    assert png.status_code == 206 and png.content == b"\x89PNG\r\n\x1a\n"
    assert client.head(image_url).status_code == 200


def test_browser_apps_of_the_listed_origins_may_call_the_api_and_no_others() -> None:
    """CORS is off unless `LESA_CORS_ORIGINS` names origins: then a web app served from one of them
    can call /v1 (preflight answered before auth) and read the headers it needs."""
    app_origin = "https://app.example"
    preflight = {
        "Origin": app_origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }
    s = settings(cors_origins=f"{app_origin}, https://other.example", api_keys="k1")
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        answer = client.options("/v1/images/generations", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == app_origin
        allowed = answer.headers["access-control-allow-headers"].lower()
        assert all(h in allowed for h in ("authorization", "content-type", "idempotency-key"))
        key = {"Authorization": "Bearer k1", "Origin": app_origin}
        created = client.post("/v1/images/jobs", json={"prompt": "a one"}, headers=key)
        assert created.headers["access-control-allow-origin"] == app_origin
        assert "retry-after" in created.headers["access-control-expose-headers"].lower()
        refused = client.options("/v1/images/generations", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in refused.headers
        denied = client.get("/v1/models", headers={"Origin": app_origin})  # a 401 the app can read
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == app_origin
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        answer = client.options("/v1/images/generations", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": app_origin}).headers
    with pytest.raises(ValueError, match="cors_origins"):
        settings(cors_origins="app.example")  # no scheme: a browser never sends that origin


def test_a_model_of_the_other_kind_is_named_with_the_models_that_would_do(client: TestClient) -> None:
    error = assert_error(client.post("/v1/videos", json={"prompt": "x", "model": "fake-image"}), 400, "model")
    assert error["message"] == "model 'fake-image' is an image model, not a video model; video models: fake-video"
    error = assert_error(
        client.post("/v1/images/generations", json={"prompt": "x", "model": "fake-video"}), 400, "model"
    )
    assert error["message"] == "model 'fake-video' is a video model, not an image model; image models: fake-image"


def test_video_lifecycle_json_and_multipart(client: TestClient) -> None:
    created = client.post("/v1/videos", json={"prompt": "a three", "num_frames": 8, "seed": 3})
    assert created.status_code == 200, created.text
    video = created.json()
    assert video["object"] == "video" and video["status"] in ("queued", "in_progress", "completed")
    assert video["num_frames"] == 8 and video["seconds"] == "1" and video["size"] == "16x16"
    done = wait_for(client, f"/v1/videos/{video['id']}", {"completed", "failed"})
    assert done["status"] == "completed" and done["progress"] == 100 and done["lesa"]["seed"] == 3
    assert done["attempts"] == 1  # one run; a worker that died mid-run makes it 2 (tests/test_redis_e2e.py)
    assert done["completed_at"] >= done["created_at"] and done["expires_at"] > done["completed_at"]
    mp4 = client.get(f"/v1/videos/{video['id']}/content")
    assert mp4.headers["content-type"] == "video/mp4" and mp4.content[4:8] == b"ftyp"
    thumb = client.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"})
    assert thumb.headers["content-type"] == "image/png"
    sheet = client.get(f"/v1/videos/{video['id']}/content", params={"variant": "spritesheet"})
    assert sheet.headers["content-type"] == "image/png" and Image.open(io.BytesIO(sheet.content)).size == (512, 256)
    assert_error(client.get(f"/v1/videos/{video['id']}/content", params={"variant": "gif"}), 400, "variant")
    # The form encoding the official openai client uses; `seconds` arrives as a string.
    form = client.post("/v1/videos", data={"prompt": "a four", "seconds": "0.5", "size": "32x16"})
    assert form.status_code == 200, form.text
    assert form.json()["num_frames"] == 4 and form.json()["size"] == "32x16"
    assert_error(client.post("/v1/videos", data={"prompt": "x", "seconds": "3"}), 400, "seconds")
    assert_error(client.post("/v1/videos", json={"prompt": "x", "num_frames": 5}), 400, "num_frames")
    # both lengths: they must agree (8 fps: 1 s is 8 frames), or the request names the conflict
    assert_error(client.post("/v1/videos", json={"prompt": "x", "seconds": 0.5, "num_frames": 8}), 400, "seconds")
    listed = client.get("/v1/videos", params={"limit": 1}).json()
    assert listed["object"] == "list" and len(listed["data"]) == 1 and listed["has_more"]
    page2 = client.get("/v1/videos", params={"after": listed["last_id"]}).json()
    assert page2["data"][0]["id"] == video["id"]
    deleted = client.delete(f"/v1/videos/{video['id']}").json()
    assert deleted["deleted"] and deleted["object"] == "video.deleted"
    assert_error(client.get(f"/v1/videos/{video['id']}"), 404, "video_id")
    # a file where text belongs is refused by name (it was dropped: a seed file gave a random seed)
    not_utf8 = client.post(
        "/v1/videos", content=b"prompt=%FF%FE", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert "not valid UTF-8" in assert_error(not_utf8, 400, "prompt")["message"]
    as_file = client.post("/v1/videos", data={"prompt": "x"}, files={"seed": ("seed.txt", b"7")})
    assert "expected a text field, got a file" in assert_error(as_file, 400, "seed")["message"]
    # bodies read as the image routes read theirs: JSON, no Content-Type, or a form; nothing else
    raw = b'{"prompt": "a five", "num_frames": 4}'
    for content_type, status in (
        ("text/plain", 400),
        ("application/xml", 400),
        ("application/json; charset=utf-8", 200),
    ):
        sent = client.post("/v1/videos", content=raw, headers={"Content-Type": content_type})
        assert sent.status_code == status, (content_type, sent.text)
    empty = assert_error(
        client.post("/v1/videos", content=b"", headers={"Content-Type": "application/json"}), 400, None
    )
    assert empty["code"] == "invalid_json" and "empty" in empty["message"]


def test_a_completed_video_is_remixed_with_its_settings_and_seed_and_the_new_prompt() -> None:
    s = settings(api_keys="k1,k2")
    one, two = ({"Authorization": f"Bearer {k}"} for k in ("k1", "k2"))
    engine = make_engine(s)
    with TestClient(create_app(s, engine=engine)) as client:
        body = {"prompt": "a three", "num_frames": 8, "size": "32x16", "seed": 3, "num_inference_steps": 6,
                "acceleration": "2x", "priority": "low"}  # fmt: skip
        video = wait_for(client, f"/v1/videos/{client.post('/v1/videos', json=body, headers=one).json()['id']}",
                         {"completed"}, headers=one)  # fmt: skip
        assert video["remixed_from_video_id"] is None
        remix = client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "a four"}, headers=one)
        assert remix.status_code == 200, remix.text
        remix = wait_for(client, f"/v1/videos/{remix.json()['id']}", {"completed", "failed"}, headers=one)
        assert remix["status"] == "completed" and remix["remixed_from_video_id"] == video["id"]
        assert remix["prompt"] == "a four" and engine.models["fake-video"].pipe.calls[-1]["prompts"] == ["a four"]
        kept = ("size", "num_frames", "seconds", "priority")
        assert {k: remix[k] for k in kept} == {k: video[k] for k in kept}
        kept = ("seed", "level", "method", "num_inference_steps", "guidance_scale")
        assert {k: remix["lesa"][k] for k in kept} == {k: video["lesa"][k] for k in kept}
        again = [
            client.post(
                f"/v1/videos/{video['id']}/remix", json={"prompt": "a four"}, headers={**one, "Idempotency-Key": "r"}
            )
            for _ in range(2)
        ]
        assert again[0].json()["id"] == again[1].json()["id"] != remix["id"]  # a retried remix is one job
        content = [client.get(f"/v1/videos/{v['id']}/content", headers=one).content for v in (video, remix)]
        assert content[0] == content[1]  # the fake model draws from the seed alone
        # what cannot be remixed says why, naming the field
        assert_error(client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": ""}, headers=one), 400, "prompt")
        extra = client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "x", "seed": 4}, headers=one)
        assert_error(extra, 400, "seed")
        for other in ("video_missing", video["id"]):  # another key's video is unknown to this one
            headers = two if other == video["id"] else one
            assert_error(
                client.post(f"/v1/videos/{other}/remix", json={"prompt": "x"}, headers=headers), 404, "video_id"
            )
    with TestClient(create_app(s, engine=make_engine(s), run_worker=False)) as client:
        queued = client.post("/v1/videos", json={"prompt": "a three"}, headers=one).json()
        refused = assert_error(client.post(f"/v1/videos/{queued['id']}/remix", json={"prompt": "x"}, headers=one),
                               409, "video_id")  # fmt: skip
        assert refused["code"] == "video_not_completed" and "queued" in refused["message"]


@pytest.mark.parametrize(
    ("json", "form", "param"),
    [
        ({"num_frames": True}, {"num_frames": "true"}, "num_frames"),
        ({"num_frames": "8"}, {"num_frames": "8x"}, "num_frames"),
        ({"seed": 7.5}, {"seed": "7.5"}, "seed"),
        ({"num_inference_steps": "8"}, {"num_inference_steps": ""}, "num_inference_steps"),
        ({"guidance_scale": True}, {"guidance_scale": "high"}, "guidance_scale"),
        ({"seconds": True}, {"seconds": "nan"}, "seconds"),
    ],
)
def test_video_numbers_are_strict_in_json_and_parsed_from_form_strings(
    client: TestClient, json: dict, form: dict, param: str
) -> None:
    """JSON numbers are numbers (`true` for num_frames was 1 frame, "8" was 8); a multipart form's
    strings are parsed as numbers, and a string that is not one is refused, naming the field."""
    assert_error(client.post("/v1/videos", json={"prompt": "x", **json}), 400, param)
    assert_error(client.post("/v1/videos", data={"prompt": "x", **form}), 400, param)


def test_video_form_strings_and_openai_string_seconds_are_read_as_numbers(client: TestClient) -> None:
    form = {"prompt": "x", "num_frames": "4", "seed": "7", "num_inference_steps": "8", "guidance_scale": "3"}
    created = client.post("/v1/videos", data=form)
    assert created.status_code == 200, created.text
    done = wait_for(client, f"/v1/videos/{created.json()['id']}", {"completed", "failed"})
    assert done["num_frames"] == 4 and done["lesa"]["seed"] == 7
    assert done["lesa"]["num_inference_steps"] == 8 and done["lesa"]["guidance_scale"] == 3.0
    # OpenAI's `seconds` is a string in JSON too ("4", "8", "12")
    assert client.post("/v1/videos", json={"prompt": "x", "seconds": "0.5"}).json()["num_frames"] == 4


def test_listing_after_a_deleted_video_is_a_400_naming_after(client: TestClient) -> None:
    """Not an empty last page (`has_more` false), which ended a client's paging without a word."""
    ids = [client.post("/v1/videos", json={"prompt": f"a {i}", "num_frames": 4}).json()["id"] for i in range(2)]
    first = client.get("/v1/videos", params={"limit": 1, "order": "asc"}).json()
    assert first["last_id"] == ids[0] and first["has_more"]
    wait_for(client, f"/v1/videos/{ids[0]}", {"completed"})
    assert client.delete(f"/v1/videos/{ids[0]}").json()["deleted"]
    error = assert_error(client.get("/v1/videos", params={"after": ids[0], "order": "asc"}), 400, "after")
    assert ids[0] in error["message"] and "without `after`" in error["message"]


def test_cancel_running_video_stops_denoising() -> None:
    s = settings()
    engine = make_engine(s, step_delay=0.02)
    with TestClient(create_app(s, engine=engine)) as client:
        video = client.post("/v1/videos", json={"prompt": "slow", "num_inference_steps": 100}).json()
        running = wait_for(client, f"/v1/videos/{video['id']}", {"in_progress"})
        while client.get(f"/v1/videos/{video['id']}").json()["progress"] < 5:
            time.sleep(0.01)
        assert running["status"] == "in_progress"
        response = client.delete(f"/v1/videos/{video['id']}").json()
        assert response["status"] == "cancelled"
        time.sleep(0.3)  # the worker sees the flag within a step or two
        pipe = engine.models["fake-video"].pipe
        assert pipe.last_step < 100, "denoising should have stopped"
        final = client.get(f"/v1/videos/{video['id']}").json()
        assert final["status"] == "cancelled" and final["error"]["code"] == "cancelled"
        # Content it will never have: 409 with its own code, not the 404 "not ready yet" a poller retries.
        error = assert_error(client.get(f"/v1/videos/{video['id']}/content"), 409, None)
        assert error["code"] == "job_cancelled"
        # Counted once, by the API that cancelled it (a worker that held it does not count it again).
        assert 'lesa_jobs_total{model="fake-video",status="cancelled"} 1.0' in client.get("/metrics").text
        # The worker is free again.
        assert client.post("/v1/images/generations", json={"prompt": "next"}).status_code == 200


def test_post_cancel_stops_a_live_job_and_keeps_a_finished_one() -> None:
    """POST .../cancel: a running job is cancelled like DELETE does; a job that finished first is
    returned unchanged with its content (DELETE would forget it: a client's cancel that crosses
    the completion must not lose the result)."""
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s, step_delay=0.02))) as client:
        video = client.post("/v1/videos", json={"prompt": "slow", "num_inference_steps": 100}).json()
        wait_for(client, f"/v1/videos/{video['id']}", {"in_progress"})
        cancelled = client.post(f"/v1/videos/{video['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["object"] == "video" and cancelled.json()["status"] == "cancelled"
        # cancelling again changes nothing and counts nothing
        assert client.post(f"/v1/videos/{video['id']}/cancel").json()["status"] == "cancelled"
        assert 'lesa_jobs_total{model="fake-video",status="cancelled"} 1.0' in client.get("/metrics").text

        image = client.post("/v1/images/jobs", json={"prompt": "quick", "num_inference_steps": 4}).json()
        done = wait_for(client, f"/v1/images/jobs/{image['id']}", {"completed"})
        kept = client.post(f"/v1/images/jobs/{image['id']}/cancel")
        assert kept.status_code == 200 and kept.json() == done
        assert client.get(f"/v1/images/{image['id']}/content").status_code == 200

        finished = client.post("/v1/videos", json={"prompt": "quick", "num_inference_steps": 4}).json()
        wait_for(client, f"/v1/videos/{finished['id']}", {"completed"})
        assert client.post(f"/v1/videos/{finished['id']}/cancel").json()["status"] == "completed"
        assert client.get(f"/v1/videos/{finished['id']}/content").status_code == 200

        error = assert_error(client.post("/v1/videos/video_unknown/cancel"), 404, "video_id")
        assert "video_unknown" in error["message"]
        assert_error(client.post("/v1/images/jobs/unknown/cancel"), 404, "id")


def test_racing_cancels_of_a_job_count_it_once() -> None:
    """Two DELETEs of one job that both read it live (a client retrying, two API replicas) race to
    cancel it: only the one that cancelled it counts (both used to: 5 jobs were counted 9 or 10 times)."""
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s, step_delay=0.02))) as client:
        services = client.app.state.services
        for i in range(5):  # the first runs (100 steps of 20 ms), the others wait behind it
            job = client.post("/v1/images/jobs", json={"prompt": f"slow {i}", "num_inference_steps": 100}).json()
            live = client.portal.call(get_job, services, job["id"], "image", None)
            # Each request holds its own copy of the record, as one read from Redis would be.
            for request in (live.model_copy(), live.model_copy()):
                assert client.portal.call(cancel, services, request).status == JobStatus.cancelled
        assert 'lesa_jobs_total{model="fake-image",status="cancelled"} 5.0' in client.get("/metrics").text


def test_failed_generation_is_reported_and_server_keeps_serving(client: TestClient) -> None:
    error = assert_error(client.post("/v1/images/generations", json={"prompt": "explode"}), 500, None)
    assert error["code"] == "generation_failed" and "exploded" in error["message"]
    job = client.get(f"/v1/images/jobs/{error['job_id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "generation_failed"
    assert client.post("/v1/images/generations", json={"prompt": "fine"}).status_code == 200
    assert 'lesa_errors_total{type="generation_failed"} 1.0' in client.get("/metrics").text


def test_compatible_jobs_are_batched_and_incompatible_ones_are_not() -> None:
    s = settings(max_batch=8, max_wait_ms=50)
    engine = make_engine(s, step_delay=0.04)
    with TestClient(create_app(s, engine=engine)) as client:
        # An incompatible job (other size) keeps the worker busy while four compatible ones queue.
        blocker = client.post("/v1/images/jobs", json={"prompt": "other", "size": "32x16"}).json()
        wait_for(client, f"/v1/images/jobs/{blocker['id']}", {"in_progress"})
        results: list[dict] = []

        def post(i: int) -> None:
            body = {"prompt": f"p{i}", "size": "16x16", "seed": i}
            results.append(client.post("/v1/images/generations", json=body).json())

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        calls = engine.models["fake-image"].pipe.calls
        assert [(len(c["prompts"]), c["size"]) for c in calls] == [(1, (32, 16)), (4, (16, 16))]
        assert sorted(r["lesa"]["batch_size"] for r in results) == [4, 4, 4, 4]
        assert sorted(r["lesa"]["seed"] for r in results) == [0, 1, 2, 3]  # each job keeps its own seed
        metrics = client.get("/metrics").text
        assert 'lesa_batch_size_count{model="fake-image"} 2.0' in metrics


def test_a_job_not_started_within_its_queue_timeout_fails_and_never_runs() -> None:
    s = settings(queue_timeout_s=60.0)
    engine = make_engine(s, step_delay=0.05)
    with TestClient(create_app(s, engine=engine)) as client:
        blocker = client.post("/v1/images/jobs", json={"prompt": "busy", "num_inference_steps": 40}).json()
        wait_for(client, f"/v1/images/jobs/{blocker['id']}", {"in_progress"})
        video = client.post("/v1/videos", data={"prompt": "also in a hurry", "queue_timeout_s": "0.01"}).json()
        late = client.post("/v1/images/generations", json={"prompt": "in a hurry", "queue_timeout_s": 0.2})
        error = assert_error(late, 503, None)
        assert error["code"] == "queue_timeout" and "never ran" in error["message"]
        assert late.headers["retry-after"] == "1"
        # in time: the client did not wait for a worker to be free (the blocker still runs)
        assert client.get(f"/v1/images/jobs/{blocker['id']}").json()["status"] == "in_progress"
        failed = wait_for(client, f"/v1/videos/{video['id']}", {"failed", "completed"})
        assert failed["status"] == "failed" and failed["error"]["code"] == "queue_timeout"
        # Without one, the server's default (LESA_QUEUE_TIMEOUT_S) applies: 60 s here, plenty.
        assert engine.resolve_image(ImageGenerationRequest(prompt="x")).queue_timeout_s == 60.0
        patient = client.post("/v1/images/generations", json={"prompt": "patient"})
        assert patient.status_code == 200, patient.text
        ran = [p for c in engine.models["fake-image"].pipe.calls + engine.models["fake-video"].pipe.calls
               for p in c["prompts"]]  # fmt: skip
        assert ran == ["busy", "patient"]
        assert 'lesa_errors_total{type="queue_timeout"} 2.0' in client.get("/metrics").text
        for bad in (0, -1, "5", True):
            response = client.post("/v1/images/generations", json={"prompt": "x", "queue_timeout_s": bad})
            assert_error(response, 400, "queue_timeout_s")


def test_queued_jobs_show_their_place_in_line() -> None:
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s, step_delay=0.02))) as client:
        running = client.post("/v1/videos", json={"prompt": "first", "num_inference_steps": 40}).json()
        wait_for(client, f"/v1/videos/{running['id']}", {"in_progress"})
        waiting = [client.post("/v1/videos", json={"prompt": f"next {i}"}).json() for i in range(2)]
        assert [v["queue_position"] for v in waiting] == [0, 1]
        image = client.post("/v1/images/jobs", json={"prompt": "an image"}).json()
        assert image["queue_position"] == 0  # its own model's line
        assert client.get(f"/v1/videos/{waiting[1]['id']}").json()["queue_position"] == 1
        done = wait_for(client, f"/v1/videos/{waiting[1]['id']}", {"completed"})
        assert (
            done["queue_position"] is None
            and client.get(f"/v1/videos/{running['id']}").json()["queue_position"] is None
        )


def test_image_jobs_are_listed_per_api_key_newest_first_sync_ones_too() -> None:
    s = settings(api_keys="key-1,key-2")
    one, two = ({"Authorization": f"Bearer key-{i}"} for i in (1, 2))
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        synced = client.post("/v1/images/generations", json={"prompt": "a"}, headers=one).json()["lesa"]["job_id"]
        queued = [client.post("/v1/images/jobs", json={"prompt": p}, headers=one).json()["id"] for p in ("b", "c")]
        theirs = client.post("/v1/images/jobs", json={"prompt": "d"}, headers=two).json()["id"]
        page = client.get("/v1/images/jobs", params={"limit": 2}, headers=one).json()
        assert page["object"] == "list" and page["has_more"]
        assert [j["id"] for j in page["data"]] == queued[::-1] and page["last_id"] == queued[0]
        assert {j["object"] for j in page["data"]} == {"image.job"} and page["data"][0]["prompt"] == "c"
        rest = client.get("/v1/images/jobs", params={"after": page["last_id"]}, headers=one).json()
        assert [j["id"] for j in rest["data"]] == [synced] and not rest["has_more"]
        done = wait_for(client, f"/v1/images/jobs/{synced}", {"completed"}, headers=one)
        assert rest["data"][0]["result"]["data"][0]["url"] == done["result"]["data"][0]["url"]
        assert [j["id"] for j in client.get("/v1/images/jobs", headers=two).json()["data"]] == [theirs]
        wait_for(client, f"/v1/images/jobs/{queued[0]}", {"completed"}, headers=one)
        assert client.delete(f"/v1/images/jobs/{queued[0]}", headers=one).json()["deleted"]
        response = client.get("/v1/images/jobs", params={"after": queued[0]}, headers=one)
        assert queued[0] in assert_error(response, 400, "after")["message"]


def test_an_api_key_with_max_jobs_per_key_live_jobs_gets_429_until_one_ends() -> None:
    s = settings(api_keys="key-1,key-2", max_jobs_per_key=1)
    one, two = ({"Authorization": f"Bearer key-{i}"} for i in (1, 2))
    with TestClient(create_app(s, engine=make_engine(s, step_delay=0.05))) as client:
        first = client.post("/v1/images/jobs", json={"prompt": "slow", "num_inference_steps": 60}, headers=one)
        assert first.status_code == 202
        refused = client.post("/v1/videos", json={"prompt": "more"}, headers=one)  # any kind counts
        error = assert_error(refused, 429, None)
        assert error["code"] == "rate_limit_exceeded" and "LESA_MAX_JOBS_PER_KEY=1" in error["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert client.post("/v1/videos", json={"prompt": "other key"}, headers=two).status_code == 200
        client.delete(f"/v1/images/jobs/{first.json()['id']}", headers=one)  # cancelled: its place is free
        assert client.post("/v1/videos", json={"prompt": "more"}, headers=one).status_code == 200


def test_a_key_spends_its_full_steps_per_minute_and_accelerated_jobs_cost_less() -> None:
    s = settings(api_keys="key-1,key-2", steps_per_minute_per_key=24)
    one, two = ({"Authorization": f"Bearer key-{i}"} for i in (1, 2))
    plain = {"prompt": "x", "num_inference_steps": 8, "acceleration": "none"}
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        remaining = []
        for _ in range(3):  # 8 full steps each: the whole minute's 24
            answer = client.post("/v1/images/jobs", json=plain, headers=one)
            assert answer.status_code == 202, answer.text
            assert answer.headers["x-ratelimit-limit-steps"] == "24"
            remaining.append(int(answer.headers["x-ratelimit-remaining-steps"]))
        assert remaining == [16, 8, 0]
        refused = client.post("/v1/images/jobs", json=plain, headers=one)
        error = assert_error(refused, 429, None)
        assert error["code"] == "rate_limit_exceeded" and "24 steps per minute" in error["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 20  # 8 steps earned back at 24 a minute
        assert refused.headers["x-ratelimit-remaining-steps"] == "0"
        assert 'lesa_rate_limited_requests_total{limit="steps"} 1.0' in client.get("/metrics").text
        # another key has its own budget; 5x runs 4 of the 8 steps at full cost: 4 per image
        fast = client.post("/v1/images/jobs", json={**plain, "acceleration": "5x", "n": 2}, headers=two)
        assert fast.status_code == 202 and fast.headers["x-ratelimit-remaining-steps"] == "16"
        # a replay of an Idempotency-Key made no job, so it costs nothing
        again = {**plain, "acceleration": "5x"}
        first = client.post("/v1/images/jobs", json=again, headers={**two, "Idempotency-Key": "k"})
        replay = client.post("/v1/images/jobs", json=again, headers={**two, "Idempotency-Key": "k"})
        assert replay.json()["id"] == first.json()["id"]
        assert first.headers["x-ratelimit-remaining-steps"] == "12"
        # a video's frames count as images: 4 frames x 4 full steps = 16, more than the 12 still left
        video = {"prompt": "v", "num_frames": 4, "num_inference_steps": 4, "acceleration": "none"}
        refused = client.post("/v1/videos", json=video, headers=two)
        assert_error(refused, 429, None)
        assert refused.headers["x-ratelimit-remaining-steps"] == "12"
        assert client.post("/v1/images/jobs", json=plain, headers=two).status_code == 202  # 8 of the 12
        assert_error(client.post("/v1/images/jobs", json=plain, headers=two), 429, None)
        # a job that costs more than a whole minute could never run: 400, not a 429 to retry for ever
        huge = client.post("/v1/images/jobs", json={**plain, "n": 4}, headers=one)
        assert assert_error(huge, 400, "n")["code"] == "request_too_large"


def test_a_key_creates_at_most_its_requests_per_minute_and_unauthenticated_servers_have_no_limit() -> None:
    s = settings(api_keys="key-1", requests_per_minute_per_key=2)
    key = {"Authorization": "Bearer key-1"}
    body = {"prompt": "x", "num_inference_steps": 4}
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        answers = [client.post("/v1/images/generations", json=body, headers=key) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert [a.headers.get("x-ratelimit-remaining-requests") for a in answers] == ["1", "0", "0"]
        assert 25 <= int(answers[2].headers["retry-after"]) <= 31  # one request per 30 s
        assert "x-ratelimit-limit-steps" not in answers[0].headers  # only the limits that are set
    s = settings(requests_per_minute_per_key=1)
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        assert [client.post("/v1/images/generations", json=body).status_code for _ in range(2)] == [200, 200]


def test_a_busy_server_runs_requests_that_allow_it_at_their_max_acceleration() -> None:
    s = settings(load_queue_depth=1)
    with TestClient(create_app(s, engine=make_engine(s, step_delay=0.05))) as client:
        blocker = client.post("/v1/images/jobs", json={"prompt": "busy", "size": "32x16", "num_inference_steps": 40})
        wait_for(client, f"/v1/images/jobs/{blocker.json()['id']}", {"in_progress"})
        body = {"prompt": "x", "acceleration": "none", "max_acceleration": "5x", "num_inference_steps": 8, "seed": 3}
        first = client.post("/v1/images/jobs", json=body).json()  # nothing queued yet: runs as asked
        key = {"Idempotency-Key": "raised"}
        second = client.post("/v1/images/jobs", json=body, headers=key).json()  # one queued: raised
        assert client.post("/v1/images/jobs", json=body, headers=key).json()["id"] == second["id"]  # a replay
        strict = client.post("/v1/images/jobs", json={**body, "max_acceleration": None}).json()  # not allowed to
        # 2x and 5x both run 4 full steps of 8: raising would gain nothing, so it is not done
        same = client.post("/v1/images/jobs", json={**body, "acceleration": "2x"}).json()
        lesa = {
            name: wait_for(client, f"/v1/images/jobs/{job['id']}", {"completed"})["result"]["lesa"]
            for name, job in (("first", first), ("second", second), ("strict", strict), ("same", same))
        }
        assert (lesa["first"]["level"], lesa["first"]["raised_from"]) == ("none", None)
        assert (lesa["second"]["level"], lesa["second"]["method"], lesa["second"]["raised_from"]) == (
            "5x",
            "lesa",
            "none",
        )
        assert lesa["second"]["seed"] == 3 and lesa["second"]["full_steps"] < lesa["first"]["full_steps"]
        assert (lesa["strict"]["level"], lesa["strict"]["raised_from"]) == ("none", None)
        assert (lesa["same"]["level"], lesa["same"]["raised_from"]) == ("2x", None)
        # counted once per job: not for the replay
        assert 'lesa_load_raised_jobs_total{level="5x",model="fake-image"} 1.0' in client.get("/metrics").text


def test_idempotency_key_returns_the_same_job(client: TestClient) -> None:
    headers = {"Idempotency-Key": "abc"}
    first = client.post("/v1/images/jobs", json={"prompt": "x"}, headers=headers).json()
    second = client.post("/v1/images/jobs", json={"prompt": "x"}, headers=headers).json()
    assert first["id"] == second["id"]
    done = wait_for(client, f"/v1/images/jobs/{first['id']}", {"completed"})
    assert done["result"]["data"][0]["url"].endswith("/content?index=0")
    # The sync endpoint takes the same body: a retry there finds the same job and its images.
    sync = client.post("/v1/images/generations", json={"prompt": "x"}, headers=headers).json()
    assert sync["lesa"]["job_id"] == first["id"]


def test_idempotency_key_is_scoped_to_its_request_kind_and_never_empty(client: TestClient) -> None:
    headers = {"Idempotency-Key": "retry-1"}
    image = client.post("/v1/images/jobs", json={"prompt": "a one", "seed": 1}, headers=headers).json()
    # The same key with another body: 422 naming the header, not the first request's result.
    error = assert_error(
        client.post("/v1/images/jobs", json={"prompt": "a nine", "seed": 99}, headers=headers), 422, "Idempotency-Key"
    )
    assert error["code"] == "idempotency_key_reused" and image["id"] in error["message"]
    # An image job's key does not answer a video request (or the reverse): a new video job.
    video = client.post("/v1/videos", json={"prompt": "a two"}, headers=headers)
    assert video.status_code == 200 and video.json()["object"] == "video" and video.json()["id"] != image["id"]
    assert client.get(f"/v1/videos/{video.json()['id']}").status_code == 200
    # An empty key protects nothing: refused rather than shared by every client that sends one.
    for empty in ("", "  "):
        error = assert_error(
            client.post("/v1/images/jobs", json={"prompt": "x"}, headers={"Idempotency-Key": empty}),
            400,
            "Idempotency-Key",
        )
        assert error["code"] == "invalid_idempotency_key"
    # ... and so is one too long to keep, on either route, with the same param and code
    for path, body in (("/v1/images/jobs", {"prompt": "x"}), ("/v1/videos", {"prompt": "x"})):
        error = assert_error(
            client.post(path, json=body, headers={"Idempotency-Key": "k" * 256}), 400, "Idempotency-Key"
        )
        assert error["code"] == "invalid_idempotency_key" and "at most 255 characters" in error["message"]


def test_jobs_and_idempotency_keys_belong_to_their_api_key() -> None:
    s = settings(api_keys="k1, k2")
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        one, two = ({"Authorization": f"Bearer {k}", "Idempotency-Key": "same"} for k in ("k1", "k2"))
        mine = client.post("/v1/images/jobs", json={"prompt": "secret of one"}, headers=one).json()
        theirs = client.post("/v1/images/jobs", json={"prompt": "two's own"}, headers=two).json()
        assert theirs["id"] != mine["id"]  # the same Idempotency-Key under another API key is another job
        done = wait_for(client, f"/v1/images/jobs/{mine['id']}", {"completed", "failed"}, headers=one)
        assert done["status"] == "completed"
        # k2 cannot read, download, follow, cancel or list k1's jobs: they look unknown to it.
        for path in (f"/v1/images/jobs/{mine['id']}", f"/v1/images/{mine['id']}/content"):
            assert_error(client.get(path, headers=two), 404, "id")
        assert_error(client.delete(f"/v1/images/jobs/{mine['id']}", headers=two), 404, "id")
        video = client.post("/v1/videos", json={"prompt": "a three"}, headers=one).json()
        assert_error(client.get(f"/v1/videos/{video['id']}", headers=two), 404, "video_id")
        assert_error(client.delete(f"/v1/videos/{video['id']}", headers=two), 404, "video_id")
        listed = {
            k: [v["id"] for v in client.get("/v1/videos", headers=h).json()["data"]]
            for k, h in (("one", one), ("two", two))
        }
        assert listed == {"one": [video["id"]], "two": []}
        assert client.get(f"/v1/images/{mine['id']}/content", headers=one).status_code == 200


def test_image_urls_are_signed_links_that_work_without_the_key_until_the_outputs_expire() -> None:
    """OpenAI's `url` is fetched as it is (an <img src>, a plain GET): with API keys on, the links
    the API hands out carry a signature instead. Bound to their job, output and owner; nothing else
    opens with one, and a changed link opens nothing."""
    import urllib.parse

    from service.links import ContentLinks, signing_key

    s = settings(api_keys="k1, k2")
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        one = {"Authorization": "Bearer k1"}
        made = client.post("/v1/images/generations", json={"prompt": "a one", "n": 2, "response_format": "url"},
                           headers=one)  # fmt: skip
        assert made.status_code == 200, made.text
        url = made.json()["data"][1]["url"]
        got = client.get(url)  # no Authorization header
        assert got.status_code == 200 and got.content[:4] == b"\x89PNG", got.text
        assert client.head(url).status_code == 200
        job_id = url.split("/v1/images/")[1].split("/")[0]
        assert client.get(f"/v1/images/jobs/{job_id}", headers=one).json()["result"]["data"][1]["url"] == url
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        assert int(query["expires"]) == client.get(f"/v1/images/jobs/{job_id}", headers=one).json()["expires_at"]

        def changed(**fields: str) -> str:
            return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode({**query, **fields})))

        for forged in (changed(index="0"), changed(expires=str(int(query["expires"]) + 60)),
                       changed(owner="key-0000000000000000"), changed(sig="0" * 64)):  # fmt: skip
            assert_error(client.get(forged), 401, None)
        # a signature opens only the content it was made for: not the job, nor another route
        signed_query = "?" + parts.query
        assert_error(client.get(f"/v1/images/jobs/{job_id}{signed_query}"), 401, None)
        assert_error(client.delete(f"/v1/images/jobs/{job_id}{signed_query}"), 401, None)
        # k2 with a link k1 handed it: the link decides (sharing a link is what links are for)
        assert client.get(url, headers={"Authorization": "Bearer k2"}).status_code == 200
        # made for outputs that have expired since: said so, not "invalid API key"
        job = client.portal.call(client.app.state.services.queue.get, job_id).model_copy(
            update={"expires_at": time.time() - 1}
        )
        stale = ContentLinks("http://testserver", signing_key(["k2", "k1"])).image(job, 1)
        assert assert_error(client.get(stale), 401, None)["code"] == "link_expired"
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s))) as client:  # no keys: plain links
        url = client.post("/v1/images/generations", json={"prompt": "a one", "response_format": "url"}).json()
        assert "sig=" not in url["data"][0]["url"]


def test_metrics_probes_and_docs(client: TestClient) -> None:
    before = client.get("/metrics").text
    lesa = client.post("/v1/images/generations", json={"prompt": "x", "acceleration": "2x"}).json()["lesa"]
    text = client.get("/metrics").text

    def added(sample: str) -> float:  # how much a sample's value grew during the request
        line = sample + " "
        values = [
            next((float(x.split()[-1]) for x in m.splitlines() if x.startswith(line)), 0.0) for m in (before, text)
        ]
        return values[1] - values[0]

    def steps(kind: str) -> str:
        return f'lesa_step_seconds_count{{kind="{kind}",level="2x",model="fake-image"}}'

    # every denoising step timed once, by kind, as the job's own counts say, but the first (a full
    # step that also encodes the prompts)
    assert added(steps("full")) == lesa["full_steps"] - 1
    assert added(steps("predicted")) == lesa["predicted_steps"] > 0
    # each stage the job reports observed once (the fake pipeline does not split its call)
    assert list(lesa["stage_ms"]) == ["pipeline", "encode_output"]
    for stage in lesa["stage_ms"]:
        assert added(f'lesa_stage_seconds_count{{level="2x",model="fake-image",stage="{stage}"}}') == 1, stage
    for name in (
        "lesa_requests_total", "lesa_job_e2e_seconds", "lesa_job_queue_wait_seconds", "lesa_generation_seconds",
        "lesa_queue_depth", "lesa_jobs_in_flight", "lesa_batch_size", "lesa_denoising_steps_total",
        "lesa_realised_speedup", "lesa_errors", "lesa_step_seconds", "lesa_stage_seconds",
    ):  # fmt: skip
        assert name in text, name
    assert 'lesa_requests_total{endpoint="/v1/images/generations",method="POST",status="200"}' in text
    assert 'lesa_job_queue_wait_seconds_count{level="2x",model="fake-image",priority="normal"}' in text
    # probes and scrapes are not requests: counted, they diluted the error-rate alert
    client.get("/healthz"), client.get("/readyz"), client.get("/metrics")
    text = client.get("/metrics").text
    assert not any(f'endpoint="{probe}"' in text for probe in ("/healthz", "/readyz", "/metrics"))
    assert 'kind="predicted"' in text
    assert client.get("/readyz").json()["status"] == "ready"
    schema = client.get("/openapi.json").json()
    image_fields = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert all("description" in f for f in image_fields.values())
    assert "multipart/form-data" in schema["paths"]["/v1/videos"]["post"]["requestBody"]["content"]


def test_openapi_documents_the_errors_the_server_sends_and_its_bearer_auth() -> None:
    """What client generators and /docs read: bad input is a 400 ErrorResponse (never FastAPI's
    422 shape, which this server does not send), /v1 takes a bearer key (401 without one), an
    unknown id is a 404, a body past the limit a 413; probes and scrapes need no key."""
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert [scheme for scheme in schemes.values() if (scheme["type"], scheme["scheme"]) == ("http", "bearer")]
    assert not {"HTTPValidationError", "ValidationError"} & set(schema["components"]["schemas"])
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            responses, where = op["responses"], f"{method.upper()} {path}"
            if "422" in responses:  # only the reused Idempotency-Key, never FastAPI's validation shape
                assert responses["422"]["content"]["application/json"]["schema"] == error, where
            if op.get("requestBody") or op.get("parameters"):
                assert responses["400"]["content"]["application/json"]["schema"] == error, where
            if "{" in path:
                assert "404" in responses, where
            if any(p["name"].lower() == "idempotency-key" for p in op.get("parameters", [])):
                assert "422" in responses and "403" in responses, where  # ... and "high" refused to a key
            if method == "post" and op.get("requestBody"):
                assert "413" in responses, where
            secured = path.startswith("/v1/")
            assert ("401" in responses) == secured and bool(op.get("security")) == secured, where
            assert ("503" in responses) == secured, where  # loading (every /v1 route waits for the models)


def test_api_docs_pages_load_their_scripts_from_this_server_not_a_cdn() -> None:
    """/docs and /redoc work air-gapped (FastAPI's own load Swagger UI and ReDoc from a CDN, and
    stay blank without internet)."""
    import re

    s = settings()
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page).text
            assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
            assert assets and not [a for a in assets if "://" in a], (page, assets)
            for asset in assets:
                got = client.get(asset)
                assert got.status_code == 200 and len(got.content) > 10_000, asset
            assert "/openapi.json" in html


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the client's notice, not ours
def test_openai_quality_picks_the_level_when_acceleration_is_not_given() -> None:
    s = settings(default_level="2x")
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        levels = [lv["level"] for lv in client.get("/v1/models/fake-image").json()["acceleration"]]
        fastest = levels[-1]
        assert fastest != "2x"

        def level(**fields) -> str:
            response = client.post("/v1/images/generations", json={"prompt": "a one", **fields})
            assert response.status_code == 200, response.text
            assert response.json()["quality"] == fields.get("quality", "auto")  # echoed, as OpenAI does
            return response.json()["lesa"]["level"]

        assert [level(quality=q) for q in ("high", "hd", "low", "medium", "standard", "auto")] == [
            "none", "none", fastest, "2x", "2x", "2x"
        ]  # fmt: skip
        assert level(quality="high", acceleration="3.3x") == "3.3x"  # the explicit level wins
        assert level(quality="low", method="reuse") == fastest
        conflict = client.post("/v1/images/generations", json={"prompt": "a one", "quality": "high", "method": "reuse"})
        assert assert_error(conflict, 400, "quality")["code"] == "method_conflicts_quality"
        assert_error(
            client.post("/v1/images/generations", json={"prompt": "a one", "quality": "ultra"}), 400, "quality"
        )
        body = {"prompt": "a one", "quality": "low", "stream": True, "partial_images": 1}
        text = client.post("/v1/images/generations", json=body).text  # every event says it too
        assert text.count('"quality":"low"') == 2 and '"quality":"auto"' not in text


def test_output_compression_sets_the_quality_of_jpeg_and_webp_and_leaves_png_alone(client: TestClient) -> None:
    def pixels(**fields) -> np.ndarray:
        body = {"prompt": "a one", "seed": 11, **fields}
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        return np.asarray(image.convert("L"), dtype=np.float32)

    exact = pixels(output_format="png")
    assert np.array_equal(pixels(output_format="png", output_compression=5), exact)
    # webp is lossless by default and at 100 (the images are tiny), lossy below
    assert np.array_equal(pixels(output_format="webp"), exact)
    assert np.array_equal(pixels(output_format="webp", output_compression=100), exact)
    assert not np.array_equal(pixels(output_format="webp", output_compression=30), exact)
    error = {q: np.abs(pixels(output_format="jpeg", output_compression=q) - exact).mean() for q in (5, 100)}
    assert error[100] < error[5] / 4
    from service.media import encode_image  # RGB samples (the production models) take the same setting

    rgb = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    assert len(encode_image(rgb, "jpeg", 5)) < len(encode_image(rgb, "jpeg", 100)) / 2
    assert encode_image(rgb, "webp", 100) == encode_image(rgb, "webp") != encode_image(rgb, "webp", 30)
    too_much = client.post("/v1/images/generations", json={"prompt": "a one", "output_compression": 101})
    assert_error(too_much, 400, "output_compression")


def test_a_spritesheet_tiles_evenly_spaced_frames_first_to_last() -> None:
    from service.media import encode_spritesheet

    grey = np.stack([np.full((16, 16), i / 7, np.float32) for i in range(8)])  # frame i is grey level i
    sheet = np.asarray(Image.open(io.BytesIO(encode_spritesheet(grey))))
    assert sheet.shape == (256, 512)  # 4 x 2 frames, each scaled up to 128 px
    assert [sheet[r * 128 + 64, c * 128 + 64] for r in range(2) for c in range(4)] == [
        round(i / 7 * 255) for i in range(8)
    ]
    rgb = np.stack([np.full((48, 96, 3), i / 32, np.float32) for i in range(33)])  # production-sized: 33 frames
    sheet = np.asarray(Image.open(io.BytesIO(encode_spritesheet(rgb))))
    assert sheet.shape == (4 * 64, 4 * 128, 3)  # 16 frames, scaled down to 128 px wide
    firsts = [sheet[r * 64 + 32, c * 128 + 64, 0] for r in range(4) for c in range(4)]
    assert firsts[0] == 0 and firsts[-1] == 255 and firsts == sorted(firsts)  # first and last frame, in order


def test_official_openai_client_videos_lifecycle() -> None:
    """The official client's `videos` resource (multipart create, retrieve, list, download, delete)
    against real uvicorn; the fake video model keeps it fast (the real one is in the e2e tests)."""
    openai = pytest.importorskip("openai")
    if not hasattr(openai.OpenAI, "videos"):
        pytest.skip("this openai client has no videos resource")
    port = free_port()
    s = settings(port=port, api_keys="sk-test")
    with uvicorn_thread(create_app(s, engine=make_engine(s)), port) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
        video = client.videos.create(
            model="fake-video", prompt="a five", seconds="1",  # type: ignore[arg-type]
            size="32x16",  # type: ignore[arg-type]
            extra_body={"seed": 5, "num_inference_steps": 6, "acceleration": "2x"},
        )  # fmt: skip
        assert video.object == "video" and video.size == "32x16" and video.seconds == "1"
        while video.status in ("queued", "in_progress"):
            time.sleep(0.02)
            video = client.videos.retrieve(video.id)
        assert video.status == "completed" and video.progress == 100
        assert video.model_extra["lesa"]["level"] == "2x" and video.model_extra["lesa"]["seed"] == 5
        assert client.videos.download_content(video.id).content[4:8] == b"ftyp"
        assert client.videos.download_content(video.id, variant="thumbnail").content.startswith(b"\x89PNG")
        assert client.videos.download_content(video.id, variant="spritesheet").content.startswith(b"\x89PNG")
        assert [v.id for v in client.videos.list(limit=10).data] == [video.id]
        with pytest.raises(openai.BadRequestError):
            client.videos.create(model="fake-video", prompt="x", size="720x1280")  # type: ignore[arg-type]
        assert client.videos.delete(video.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(video.id)


def test_a_form_is_a_form_whatever_the_case_of_its_media_type(client: TestClient) -> None:
    body = b'--XX\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na seven\r\n--XX--\r\n'
    upper = client.post("/v1/videos", content=body, headers={"Content-Type": "Multipart/Form-Data; boundary=XX"})
    assert upper.status_code == 200 and upper.json()["prompt"] == "a seven"  # was 400 invalid_json


def test_a_sync_request_whose_job_is_deleted_answers_at_once(monkeypatch) -> None:
    """Another request cancelled then deleted the job (another API replica, in Redis mode): the
    waiting request answers 409 at once, not a 504 after the sync timeout saying the job continues."""
    s = settings(sync_timeout_s=3.0)
    with TestClient(create_app(s, engine=make_engine(s), run_worker=False)) as client:
        queue = client.app.state.services.queue

        async def gone(job_id: str, timeout_s: float) -> None:
            await queue.delete(job_id)
            return None

        monkeypatch.setattr(queue, "wait", gone)
        started = time.monotonic()
        response = client.post("/v1/images/generations", json={"prompt": "x"})
        error = assert_error(response, 409, None)
        assert error["code"] == "cancelled" and "deleted" in error["message"] and time.monotonic() - started < 2.0
        assert response.headers["x-should-retry"] == "false"


def test_events_end_with_an_error_event_when_the_queue_goes_down(monkeypatch) -> None:
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s), run_worker=False)) as client:
        video = client.post("/v1/videos", json={"prompt": "a six"}).json()
        queue = client.app.state.services.queue

        get, calls = queue.get, [0]

        async def down_after_the_first_event(job_id: str):
            calls[0] += 1
            if calls[0] > 2:  # the route's own look-up and the first event succeed
                raise QueueUnavailable("connection refused")
            return await get(job_id)

        monkeypatch.setattr(queue, "get", down_after_the_first_event)
        with client.stream("GET", f"/v1/videos/{video['id']}/events") as stream:
            body = "".join(stream.iter_text())
        assert body.startswith("event: queued") and "event: error" in body and '"queue_unavailable"' in body


def test_progress_events_stream_until_the_job_ends() -> None:
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s, step_delay=0.03))) as client:
        video = client.post("/v1/videos", json={"prompt": "a six", "num_inference_steps": 40}).json()
        events: list[tuple[str, dict]] = []
        with client.stream("GET", f"/v1/videos/{video['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[len("data: ") :])))
        assert events[-1][0] == "completed" and events[-1][1]["progress"] == 100
        progress = [data["progress"] for _, data in events]
        assert progress == sorted(progress) and len(set(progress)) >= 4  # per-step updates, in order
        assert_error(client.get("/v1/videos/job_nope/events"), 404, "video_id")


def test_cancelling_one_job_of_a_batch_spares_the_others() -> None:
    s = settings(max_batch=8, max_wait_ms=50)
    engine = make_engine(s, step_delay=0.02)
    with TestClient(create_app(s, engine=engine)) as client:
        blocker = client.post("/v1/images/jobs", json={"prompt": "other", "size": "32x16"}).json()
        wait_for(client, f"/v1/images/jobs/{blocker['id']}", {"in_progress"})
        keep = client.post("/v1/images/jobs", json={"prompt": "keep", "num_inference_steps": 40}).json()
        drop = client.post("/v1/images/jobs", json={"prompt": "drop", "num_inference_steps": 40}).json()
        wait_for(client, f"/v1/images/jobs/{drop['id']}", {"in_progress"})
        assert client.delete(f"/v1/images/jobs/{drop['id']}").json()["status"] == "cancelled"
        kept = wait_for(client, f"/v1/images/jobs/{keep['id']}", {"completed", "failed", "cancelled"})
        assert kept["status"] == "completed" and kept["result"]["lesa"]["batch_size"] == 2
        assert client.get(f"/v1/images/jobs/{drop['id']}").json()["status"] == "cancelled"
        assert engine.models["fake-image"].pipe.last_step == 40  # the shared batch ran to the end


def test_catalogue_engine_for_an_api_tier_loads_no_weights(tmp_path) -> None:
    """The API of a Redis deployment validates against the model config and the bundles'
    metadata only: a GPU-only model (weights never downloaded here) is still offered."""
    bundle = tmp_path / "weights" / "big-flux" / "predictors" / "5x"
    bundle.mkdir(parents=True)
    card = {"psnr": 33.0, "speedup_wall_b1": 4.6}
    (bundle / "config.json").write_text(json.dumps({"schedule": level_schedule("5x", 50).to_dict(), "quality": card}))
    config = tmp_path / "models.toml"
    config.write_text(
        f'[defaults]\nweights_root = "{tmp_path / "weights"}"\n\n'
        '[models.big-flux]\nbackend = "diffusers"\nsource = "nobody/never-downloaded"\npipeline = "FluxPipeline"\n'
        'enabled = "gpu"\nsizes = [[1024, 1024], [768, 1344]]\nlevels_dir = "big-flux/predictors"\n'
    )
    s = settings(models_config=config, default_level="auto")
    with pytest.raises(RuntimeError):  # GPU-only models are offered when named, not by default
        Engine.catalogue(s)
    s = settings(models_config=config, default_level="auto", models="big-flux")
    engine = Engine.catalogue(s)
    entry = engine.models["big-flux"]
    assert entry.pipe is None and entry.kind == "image" and entry.default_guidance == 3.5  # FLUX's default
    with TestClient(create_app(s, engine=engine, run_worker=False)) as client:
        (model,) = client.get("/v1/models").json()["data"]
        levels = {lvl["level"]: lvl for lvl in model["acceleration"]}
        assert levels["5x"]["lesa_available"] and levels["5x"]["quality"]["psnr"] == 33.0
        assert levels["5x"]["predictor"] == content_id(bundle) and model["revision"] is None  # unpinned hub weights
        assert model["sizes"] == ["1024x1024", "768x1344"]
        job = client.post("/v1/images/jobs", json={"model": "big-flux", "prompt": "a fox", "size": "768x1344"})
        assert job.status_code == 202 and job.json()["status"] == "queued"
        queued = client.app.state.services.queue._jobs[job.json()["id"]].spec
        assert (queued.level, queued.method, queued.num_inference_steps) == ("5x", "lesa", 50)  # "auto"
        assert_error(client.post("/v1/images/jobs", json={"model": "big-flux", "prompt": "x", "size": "16x16"}),
                     400, "size")  # fmt: skip


def test_serve_on_a_busy_port_fails_at_once_without_loading_models(monkeypatch, capsys) -> None:
    import argparse
    import socket

    import service.app
    from service.cli import run_serve

    def must_not_load(*args, **kwargs):
        raise AssertionError("models were loaded before the port was known to be free")

    monkeypatch.setattr(service.app, "create_app", must_not_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = argparse.Namespace(
            host="127.0.0.1", port=port, models=None, max_batch=None, no_worker=False, shadow_fraction=None
        )
        assert run_serve(args) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_settings_that_would_silently_weaken_the_server_are_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="holds no key"):  # "," parsed to no key: no auth at all
        settings(api_keys=" , ")
    with pytest.raises(ValidationError, match="printable ASCII"):
        settings(api_keys="clé")
    with pytest.raises(ValidationError, match="unknown level 'bogus'"):  # every request would get a 400
        settings(default_level="bogus")
    with pytest.raises(ValidationError, match="finite number"):  # "auto" would always pick none
        settings(auto_min_psnr=float("nan"))
    with pytest.raises(ValidationError, match="finite number"):  # a lone job would wait for ever
        settings(max_wait_ms=float("inf"))
    with pytest.raises(ValidationError, match="1 key.s. that are not in LESA_API_KEYS"):  # "high" refused to all
        settings(api_keys="k1", high_priority_keys="k1, typo")
    with pytest.raises(ValidationError, match="not in LESA_API_KEYS"):
        settings(high_priority_keys="k1")
    with pytest.raises(ValidationError, match="'bogus' is not a device"):  # was torch's RuntimeError at load
        settings(device="bogus")
    assert [settings(device=d).device for d in ("auto", "cpu", " cuda:1 ")] == ["auto", "cpu", "cuda:1"]


def test_serve_without_a_worker_needs_redis(monkeypatch, capsys) -> None:
    """An API-only server on the in-process queue would accept jobs that nothing ever runs."""
    import argparse

    from service.cli import run_serve

    monkeypatch.delenv("LESA_REDIS_URL", raising=False)
    args = argparse.Namespace(
        host="127.0.0.1", port=free_port(), models=None, max_batch=None, no_worker=True, shadow_fraction=None
    )
    assert run_serve(args) == 2
    assert "--no-worker (LESA_EMBEDDED_WORKER=false) needs LESA_REDIS_URL" in capsys.readouterr().err


def test_serve_exits_when_the_models_cannot_load(tmp_path, monkeypatch, capsys) -> None:
    """`lesa serve` on a broken model config says why and exits 1, not idle unready with a traceback."""
    import argparse

    from service.cli import run_serve

    bad = tmp_path / "models.toml"
    bad.write_text("[models\n")
    monkeypatch.setenv("LESA_MODELS_CONFIG", str(bad))
    args = argparse.Namespace(
        host="127.0.0.1", port=free_port(), models=None, max_batch=None, no_worker=False, shadow_fraction=None
    )
    assert run_serve(args) == 1
    err = capsys.readouterr().err
    assert "could not load the models: ConfigError" in err and "not valid TOML" in err


def test_shadow_checks_rerun_accelerated_jobs_at_full_compute_only_when_the_worker_is_idle(monkeypatch) -> None:
    monkeypatch.setattr(service.deps, "LIVE_QUALITY_REFRESH_S", 0.0)
    s = settings(shadow_fraction=1.0, max_batch=1)
    engine = make_engine(s, step_delay=0.02)
    pipe = engine.models["fake-image"].pipe
    with TestClient(create_app(s, engine=engine)) as client:
        # A blocker keeps the worker busy while six checkable jobs (5x at the card's 8 steps) queue,
        # then two it must not check: 5x at 10 steps (the card was measured at 8) and level none.
        # (1 s: every job below is queued before it ends, however slow the machine posts them)
        blocker = client.post(
            "/v1/images/jobs", json={"prompt": "blocker", "acceleration": "none", "num_inference_steps": 50}
        ).json()
        wait_for(client, f"/v1/images/jobs/{blocker['id']}", {"in_progress"})
        bodies = [{"prompt": f"p{i}", "seed": i, "acceleration": "5x"} for i in range(6)]
        bodies += [{"prompt": "q", "acceleration": "5x", "num_inference_steps": 10}, {"prompt": "r"}]
        ids = [client.post("/v1/images/jobs", json=body).json()["id"] for body in bodies]
        for job_id in ids:
            assert wait_for(client, f"/v1/images/jobs/{job_id}", {"completed", "failed"})["status"] == "completed"
        deadline = time.monotonic() + 10
        while 'lesa_shadow_checks_total{level="5x",model="fake-image",result="done"} 4.0' not in (
            metrics := client.get("/metrics").text
        ):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.05)
        # kept where "auto" reads them (4 samples: fewer than the 8 it needs to judge by them)
        (level,) = [lv for lv in client.get("/v1/models/fake-image").json()["acceleration"] if lv["level"] == "5x"]
        assert (level["live_psnr"], level["live_checks"], level["auto_judged_by"]) == (100.0, 4, "card")
    # The worker never waits on a check while jobs queue: the four kept (a backlog of four; two
    # dropped) ran after every job, at full compute, for the same prompts and seeds.
    assert 'lesa_shadow_checks_total{level="5x",model="fake-image",result="dropped"} 2.0' in metrics
    shadows = pipe.calls[-4:]
    assert all(c["cache"] is None for c in shadows)
    assert [(c["prompts"], c["seeds"]) for c in shadows] == [([f"p{i}"], [i]) for i in range(4)]
    assert [c["prompts"] for c in pipe.calls[:-4]] == [["blocker"]] + [[b["prompt"]] for b in bodies]
    # The fake pipeline ignores the cache, so accelerated = full: 100 dB (the cap) per sample.
    assert 'lesa_shadow_psnr_db_count{level="5x",method="lesa",model="fake-image"} 4.0' in metrics
    assert 'lesa_shadow_psnr_db_sum{level="5x",method="lesa",model="fake-image"} 400.0' in metrics
    assert 'lesa_quality_card_psnr_db{level="5x",method="lesa",model="fake-image"} 31.5' in metrics


def test_streamed_generation_sends_partial_images_then_the_image_as_openai_does() -> None:
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s, step_delay=0.01))) as client:
        body = {"prompt": "a seven", "seed": 5, "stream": True, "partial_images": 3, "num_inference_steps": 8}
        with client.stream("POST", "/v1/images/generations", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            job_id = response.headers["x-job-id"]  # before any event: a client can cancel mid-stream
            text = "".join(response.iter_text())
        events = [
            (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
            for block in text.strip().split("\n\n")
            if block.startswith("event:")
        ]
        assert [e for e, _ in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
        assert [d["type"] for _, d in events] == [e for e, _ in events]
        assert [d["partial_image_index"] for _, d in events[:3]] == [0, 1, 2]
        # previews after steps 2, 4, 6 of 8: the fake pipeline paints them grey at step / 8
        greys = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).getpixel((0, 0)) for _, d in events[:3]]
        assert greys == [round(255 * f) for f in (0.25, 0.5, 0.75)]
        done = events[-1][1]
        assert done["size"] == "16x16" and done["output_format"] == "png" and done["usage"]["total_tokens"] == 0
        plain = client.post("/v1/images/generations", json={**body, "stream": False}).json()
        assert done["b64_json"] == plain["data"][0]["b64_json"]  # the same image as without streaming
        assert done["lesa"]["seed"] == 5 and done["lesa"]["job_id"] == job_id
        # A short run has room for fewer previews (never after the first step nor the last): 4 steps, 2.
        short = {**body, "num_inference_steps": 4}
        with client.stream("POST", "/v1/images/generations", json=short) as response:
            text = "".join(response.iter_text())
        assert text.count("event: image_generation.partial_image") == 2
        assert text.count("event: image_generation.completed") == 1
        # without partial_images: the image alone; n > 1 and the job endpoint refuse stream
        with client.stream("POST", "/v1/images/generations", json={"prompt": "x", "stream": True}) as response:
            assert "image_generation.partial_image" not in "".join(response.iter_text())
        assert_error(client.post("/v1/images/generations", json={"prompt": "x", "stream": True, "n": 2}), 400, "n")
        for loose in ("yes", "true", 1):  # not coerced: the whole answer's shape depends on it
            assert_error(client.post("/v1/images/generations", json={"prompt": "x", "stream": loose}), 400, "stream")
        assert_error(client.post("/v1/images/jobs", json={"prompt": "x", "stream": True}), 400, "stream")
        assert_error(client.post("/v1/images/generations", json={"prompt": "x", "partial_images": 4}), 400,
                     "partial_images")  # fmt: skip
        # a failure mid-stream is an `error` event, which the openai client raises
        with client.stream("POST", "/v1/images/generations", json={"prompt": "explode", "stream": True}) as response:
            text = "".join(response.iter_text())
        assert text.startswith("event: error") and '"code":"generation_failed"' in text


def test_an_image_job_keeps_its_previews_for_the_playground_to_show() -> None:
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s, step_delay=0.01))) as client:
        job = client.post("/v1/images/jobs", json={"prompt": "a two", "partial_images": 2}).json()
        assert job["partial_images"] == 0
        done = wait_for(client, f"/v1/images/jobs/{job['id']}", {"completed"})
        assert done["partial_images"] == 2
        # after steps 3 and 5 of 8 (the fake pipeline paints step / 8 grey)
        for index, step in enumerate((3, 5)):
            response = client.get(f"/v1/images/jobs/{job['id']}/partials/{index}")
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(response.content)).getpixel((0, 0)) == round(255 * step / 8)
        assert_error(client.get(f"/v1/images/jobs/{job['id']}/partials/2"), 404, "index")  # asked for two
        plain = client.post("/v1/images/jobs", json={"prompt": "a two"}).json()
        assert_error(client.get(f"/v1/images/jobs/{plain['id']}/partials/0"), 404, "index")
        assert_error(client.get(f"/v1/images/jobs/{job['id']}/partials/3"), 400, "index")  # 0-2 only


def test_a_job_that_arrives_during_a_shadow_check_goes_first() -> None:
    s = settings(shadow_fraction=1.0)
    engine = make_engine(s, step_delay=0.02)
    pipe = engine.models["fake-image"].pipe
    with TestClient(create_app(s, engine=engine)) as client:
        body = {"prompt": "checked", "acceleration": "2x", "num_inference_steps": 100}  # 2 s, no card: checked
        assert client.post("/v1/images/generations", json=body).status_code == 200
        deadline = time.monotonic() + 10
        while len(pipe.calls) < 2:  # its shadow check (2 s more at full compute) has started
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waited = client.post("/v1/images/generations", json={"prompt": "user", "num_inference_steps": 4}).json()
        assert waited["lesa"]["queue_ms"] < 500  # not the check's remaining ~2 s
        metrics = client.get("/metrics").text
        assert 'lesa_shadow_checks_total{level="2x",model="fake-image",result="preempted"} 1.0' in metrics
        assert "lesa_shadow_psnr_db_count" not in metrics  # the abandoned check measured nothing


def test_auto_leaves_a_level_whose_shadow_checked_quality_falls_below_the_floor(monkeypatch) -> None:
    """The fake 5x card says 31.5 dB (floor 30): "auto" takes 5x until enough live checks say less."""
    monkeypatch.setattr(service.deps, "LIVE_QUALITY_REFRESH_S", 0.0)
    s = settings(auto_min_psnr=30.0, auto_live_min_checks=4)
    with TestClient(create_app(s, engine=make_engine(s))) as client:
        queue = client.app.state.services.queue

        def auto_level() -> str:
            body = {"prompt": "x", "acceleration": "auto", "num_inference_steps": 8}
            return client.post("/v1/images/generations", json=body).json()["lesa"]["level"]

        def card() -> tuple:
            (level,) = [lv for lv in client.get("/v1/models/fake-image").json()["acceleration"] if lv["level"] == "5x"]
            return level["live_psnr"], level["live_checks"], level["auto_judged_by"]

        assert auto_level() == "5x" and card() == (None, 0, "card")
        client.portal.call(queue.record_quality, "fake-image", "5x", [25.0, 25.0, 25.0])
        assert auto_level() == "5x" and card() == (25.0, 3, "card")  # too few checks to judge by
        client.portal.call(queue.record_quality, "fake-image", "5x", [25.0])
        assert auto_level() == "none" and card() == (25.0, 4, "live")
        client.portal.call(queue.record_quality, "fake-image", "5x", [40.0] * 8)  # mean 35 dB now
        assert auto_level() == "5x" and card() == (35.0, 12, "live")
        # a named level is what the client asked for: served whatever its live quality
        client.portal.call(queue.record_quality, "fake-image", "5x", [10.0] * 32)
        body = {"prompt": "x", "acceleration": "5x", "num_inference_steps": 8}
        assert client.post("/v1/images/generations", json=body).json()["lesa"]["level"] == "5x"
        assert auto_level() == "none"


def test_a_retry_with_the_key_of_a_job_that_timed_out_in_the_queue_runs_it() -> None:
    """The 503 says retry (the job never ran): a retry with the same Idempotency-Key must run the
    request, not replay the failure for as long as the key lives."""
    s = settings()
    engine = make_engine(s, step_delay=0.02)
    with TestClient(create_app(s, engine=engine)) as client:
        blocker = client.post("/v1/images/jobs", json={"prompt": "busy", "num_inference_steps": 40}).json()
        wait_for(client, f"/v1/images/jobs/{blocker['id']}", {"in_progress"})
        headers = {"Idempotency-Key": "retry-me"}
        body = {"prompt": "in a hurry", "queue_timeout_s": 0.1, "num_inference_steps": 4}
        first = assert_error(client.post("/v1/images/generations", json=body, headers=headers), 503, None)
        assert first["code"] == "queue_timeout"
        wait_for(client, f"/v1/images/jobs/{blocker['id']}", {"completed"})
        again = client.post("/v1/images/generations", json=body, headers=headers)
        assert again.status_code == 200, again.text
        assert again.json()["lesa"]["job_id"] != first["job_id"]
        replay = client.post("/v1/images/generations", json=body, headers=headers)  # the key names the run now
        assert replay.json()["lesa"]["job_id"] == again.json()["lesa"]["job_id"]
        assert [c["prompts"] for c in engine.models["fake-image"].pipe.calls] == [["busy"], ["in a hurry"]]
