"""The browser playground: the page at `/`, its static assets, and the comparison endpoint.

The page is plain HTML + JS + CSS shipped inside the package (`service/static/`, package data),
with no CDN, so it works air-gapped. It talks to the ordinary public API (`/v1/models`,
`/v1/images/generations`, `/v1/videos`, ...) like any client; the one thing the API lacks is a
side-by-side measurement against full compute, which `POST /v1/playground/compare` adds
(logic in `service/compare.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from service.compare import CompareRequest, CompareResponse, compare
from service.deps import OwnerDep, ReadyDep
from service.schemas import ErrorResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_URL = "/static"

# Under /v1 and behind the API key like the rest of the API (app.py adds the dependency).
router = APIRouter(prefix="/v1/playground", tags=["playground"])
# The page itself is public: a browser navigating to `/` cannot send a Bearer header; the page
# asks for a key when the API answers 401.
page = APIRouter(include_in_schema=False)


class RevalidatedStaticFiles(StaticFiles):
    """The page's scripts and styles, revalidated on every load (a 304 while unchanged): cached
    heuristically, an upgraded server's page would run with the old playground.js."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def static_files() -> StaticFiles:
    return RevalidatedStaticFiles(directory=STATIC_DIR)


@page.get("/")
async def playground_page() -> FileResponse:
    # no-cache: a restarted server with a newer page must not be hidden behind a stale copy.
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.post(
    "/compare",
    response_model=CompareResponse,
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
    summary="Generate one image accelerated and at full compute; wall times, speed-up, PSNR",
)
async def compare_with_full(
    body: CompareRequest, request: Request, services: ReadyDep, owner: OwnerDep
) -> CompareResponse:
    """Same prompt, seed, size, steps and guidance, run twice through the queue: at `acceleration`
    and with every step in full. Returns both PNGs, the measured wall time of each, the realised
    speed-up (full / accelerated) and the PSNR between the two (the quality cards' definition)."""
    return await compare(services, body, owner, request.is_disconnected)
