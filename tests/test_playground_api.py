"""The playground's server side, fast: the page and assets, POST /v1/playground/compare, its errors.

Runs on the fake pipeline of tests/test_service_api.py (milliseconds); the real model and a real
browser are in tests/test_playground_browser.py.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import assert_error, make_engine, settings

from service.app import create_app
from service.compare import psnr_db

STATIC = Path(__file__).resolve().parent.parent / "service" / "static"


@pytest.fixture
def client() -> Iterator[TestClient]:
    s = settings()
    with TestClient(create_app(s, engine=make_engine(s))) as c:
        yield c


def compare(client: TestClient, **fields):
    body = {"prompt": "a seven", "model": "fake-image", "acceleration": "5x", "num_inference_steps": 8, **fields}
    return client.post("/v1/playground/compare", json=body)


def test_page_and_assets_are_served_from_the_package(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "LESA playground" in page.text
    for asset, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        assert f"/static/{asset}" in page.text
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
        # Revalidated on every load (a cheap 304): after an upgrade the page never runs the old script.
        assert response.headers["cache-control"] == "no-cache", asset
        again = client.get(f"/static/{asset}", headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304, asset
    assert client.get("/static/nope.js").status_code == 404
    # Air-gapped: nothing the page loads may come from another host.
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path
        assert not re.search(r"""(fetch|import)\s*\(\s*["'`]https?://""", text), path
        assert "@import" not in text and "url(http" not in text, path


def test_compare_runs_both_with_one_seed_and_measures_them(client: TestClient) -> None:
    response = compare(client, seed=7)
    assert response.status_code == 200, response.text
    body = response.json()
    fast, full = body["accelerated"], body["full"]
    assert body["model"] == "fake-image" and body["seed"] == 7
    assert (fast["lesa"]["level"], fast["lesa"]["method"]) == ("5x", "lesa")
    assert (full["lesa"]["level"], full["lesa"]["method"]) == ("none", "none")
    assert fast["lesa"]["seed"] == full["lesa"]["seed"] == 7
    assert fast["lesa"]["job_id"] != full["lesa"]["job_id"]
    for side in (fast, full):
        assert Image.open(io.BytesIO(base64.b64decode(side["image"]))).format == "PNG"
        assert side["wall_ms"] > 0
    assert body["speedup"] == pytest.approx(full["wall_ms"] / fast["wall_ms"], rel=1e-2)
    # The fake draws the same noise image for a seed whatever the cache: identical -> the 100 dB cap.
    assert body["psnr_db"] == 100.0
    # LESA ran at the step count its (fake) predictor was trained for: its card comes along.
    assert body["quality_card"]["psnr"] == 31.5
    # A training-free method has no card: none is shown rather than the LESA one.
    assert compare(client, method="taylorseer").json()["quality_card"] is None
    # "auto" at the bundle's step count resolves to the measured LESA level.
    assert compare(client, acceleration="auto").json()["accelerated"]["lesa"]["level"] == "5x"
    # No seed: one random seed, used for both runs.
    body = compare(client).json()
    assert body["accelerated"]["lesa"]["seed"] == body["full"]["lesa"]["seed"] == body["seed"]


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "   "}, 400, "prompt"),
        ({"num_inference_steps": 500}, 400, "num_inference_steps"),
        ({"num_inference_steps": 2}, 400, "num_inference_steps"),
        ({"acceleration": "7x"}, 400, "acceleration"),
        ({"acceleration": "none"}, 400, "acceleration"),
        ({"acceleration": "auto", "num_inference_steps": 20}, 400, "acceleration"),  # no bundle at 20: full
        ({"model": "fake-video"}, 400, "model"),
        ({"model": "nope"}, 404, "model"),
        ({"size": "64x64"}, 400, "size"),
        ({"seed": -1}, 400, "seed"),
        ({"seed": True}, 400, "seed"),  # as strict as a generation request
        ({"seed": "5"}, 400, "seed"),
        ({"num_inference_steps": 4.0}, 400, "num_inference_steps"),
        ({"guidance_scale": "3"}, 400, "guidance_scale"),
        ({"acceleraton": "5x"}, 400, "acceleraton"),
        ({"acceleration": "2x", "method": "lesa"}, 400, "method"),
        ({"model": "m" * 5000}, 400, "model"),
        ({"acceleration": "5" * 5000}, 400, "acceleration"),
    ],
)
def test_compare_rejects_with_the_field_named(client: TestClient, fields: dict, status: int, param: str) -> None:
    assert_error(compare(client, **fields), status, param)


def test_compare_needs_the_api_key_but_the_page_does_not() -> None:
    s = settings(api_keys="k1")
    with TestClient(create_app(s, engine=make_engine(s))) as c:
        assert c.get("/").status_code == 200 and c.get("/static/playground.js").status_code == 200
        assert compare(c).status_code == 401
        ok = c.post("/v1/playground/compare", headers={"Authorization": "Bearer k1"},
                    json={"prompt": "a one", "model": "fake-image", "acceleration": "2x"})  # fmt: skip
        assert ok.status_code == 200, ok.text


def test_compare_is_503_until_ready() -> None:
    s = settings()
    engine = make_engine(s)
    engine.ready = False
    with TestClient(create_app(s, engine=engine)) as c:
        # warmup=False marks it ready at start-up; undo that to look at the starting server.
        c.app.state.services.engine.ready = False
        response = compare(c)
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        assert c.get("/").status_code == 200  # the page still loads and reports it


def test_psnr_matches_the_benchmark_definition() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((16, 16), dtype=np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape).astype(np.float32), 0, 1)

    def png(x: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray((x * 255 + 0.5).astype(np.uint8), mode="L").save(buffer, format="PNG")
        return buffer.getvalue()

    qa, qb = ((np.asarray(Image.open(io.BytesIO(png(x))), dtype=np.float32) / 255) for x in (a, b))
    expected = -10 * np.log10(np.mean((qa - qb) ** 2))
    assert psnr_db(png(a), png(b)) == pytest.approx(expected, abs=0.01)
    assert psnr_db(png(a), png(a)) == 100.0
