""" "Compare with full compute": one prompt and seed, accelerated and unaccelerated, measured here.

The playground's comparison (POST /v1/playground/compare) lives here so that its router stays
thin. Both generations go through the ordinary job queue and worker (the same path as every
other request, so the timings are what a client would get), one after the other: running them
at once would make them share the device and blur both wall times. The PSNR between the two
images is computed on the server with the benchmark's own definition
(`lesa_core.benchmark.psnr`, 100 dB cap), so it is directly comparable to the quality cards of
GET /v1/models. Images only: the comparison is made on lossless PNGs, and a video's MP4 is lossy.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, StrictFloat, StrictInt, ValidationError

from service.deps import Disconnected, Services, failed_job_error, refresh_live_quality, submit, wait_while_connected
from service.errors import ApiError, body_validation_error
from service.queue import Job, JobSpec, JobStatus
from service.schemas import MAX_SEED, ImageGenerationRequest, LesaStats, MethodName, StrictBody
from service.views import lesa_stats


class CompareRequest(StrictBody):
    """The fields of an image request that a comparison varies; everything else is the model's default."""

    prompt: str = Field(..., min_length=1, max_length=4000, examples=["a handwritten seven"])
    model: str | None = Field(None, max_length=256, description="an image model of GET /v1/models (default: the first)")
    size: str | None = Field(None, pattern=r"^([0-9]{1,5}x[0-9]{1,5}|auto)$")
    # as strict as the generation request's (`true` is not a seed, "3" not a guidance scale)
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="default: random, then used for both runs")
    num_inference_steps: StrictInt | None = Field(None, ge=1, le=1000)
    guidance_scale: StrictFloat | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    acceleration: str = Field(
        ..., max_length=32, description="the level to compare against full compute", examples=["5x"]
    )
    method: MethodName | None = None


class CompareSide(BaseModel):
    image: str = Field(description="base64 PNG")
    wall_ms: float = Field(description="measured wall time of the generation (pipeline call + encoding)")
    denoise_ms: float | None = Field(None, description="of which the denoising loop (what acceleration speeds up)")
    lesa: LesaStats


class CompareResponse(BaseModel):
    object: str = "playground.comparison"
    model: str
    prompt: str
    seed: int
    accelerated: CompareSide
    full: CompareSide
    speedup: float = Field(description="full wall time / accelerated wall time, both measured just now")
    psnr_db: float = Field(description="PSNR of the accelerated image vs the full-compute one (100 = identical)")
    quality_card: dict[str, Any] | None = Field(None, description="the level's benchmark card, if it has one")


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> float32 in [0, 1], [H, W] (grey) or [H, W, 3]."""
    image = Image.open(io.BytesIO(data))
    image = image.convert("L" if image.mode in ("L", "LA", "I", "I;16", "1") else "RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def psnr_db(accelerated: bytes, full: bytes) -> float:
    from lesa_core.benchmark import psnr

    a, b = decode_png(accelerated), decode_png(full)
    return round(float(psnr(a[None], b[None])), 2)


async def _run(services: Services, spec: JobSpec, owner: str | None, disconnected: Disconnected) -> Job:
    """Submit one job and wait for it; 5xx/409/504 as the sync image endpoint answers them."""
    job = await submit(services, spec, owner)
    job = await wait_while_connected(services, job, services.settings.sync_timeout_s, disconnected)
    if not job.status.terminal:
        raise ApiError(504, f"comparison job {job.id} did not finish in time", type="timeout",
                       code="timeout", extra={"job_id": job.id})  # fmt: skip
    if job.status == JobStatus.failed:
        raise failed_job_error(job)
    if job.status == JobStatus.cancelled:
        raise ApiError(409, f"job {job.id} was cancelled", code="cancelled", extra={"job_id": job.id})
    return job


async def _side(services: Services, job: Job) -> tuple[CompareSide, bytes]:
    assert services.queue is not None and job.result is not None
    ref = next(r for r in job.result.outputs if r.index == 0 and r.variant == "primary")
    content = await services.queue.get_artifact(job.id, ref.name)
    if content is None:
        raise ApiError(410, f"outputs of job {job.id} have expired", code="expired")
    lesa = job.result.lesa
    side = CompareSide(
        image=base64.b64encode(content).decode("ascii"),
        wall_ms=float(lesa.get("generation_ms") or 0.0),
        denoise_ms=(lesa.get("stage_ms") or {}).get("denoise"),
        lesa=lesa_stats(job),
    )
    return side, content


async def compare(
    services: Services, body: CompareRequest, owner: str | None, disconnected: Disconnected
) -> CompareResponse:
    engine = services.engine
    fields = body.model_dump(exclude_none=True)
    try:
        request = ImageGenerationRequest(**fields, output_format="png")
    except ValidationError as error:  # a bound the image request has and this body lacks: still the field's 400
        raise body_validation_error(error) from None
    # The engine validates it exactly like a generation request (same messages, same `param`).
    await refresh_live_quality(services)
    fast = engine.resolve_image(request)
    if fast.level == "none":
        why = (
            "'auto' resolves to full compute here (no LESA level meets the PSNR floor at these steps)"
            if body.acceleration == "auto"
            else "level 'none' is full compute already"
        )
        raise ApiError(400, f"{why}: pick an acceleration level to compare with full compute",
                       param="acceleration", code="nothing_to_compare")  # fmt: skip
    # Same resolved seed, size, steps and guidance; only the acceleration differs.
    full = fast.model_copy(update={"level": "none", "method": "none"})
    fast_job = await _run(services, fast, owner, disconnected)
    full_job = await _run(services, full, owner, disconnected)
    fast_side, fast_png = await _side(services, fast_job)
    full_side, full_png = await _side(services, full_job)
    speedup = full_side.wall_ms / fast_side.wall_ms if fast_side.wall_ms > 0 else 1.0
    # The card describes the trained predictor at its step count: only shown when that is what ran.
    bundle = engine.models[fast.model].bundle_for(fast.level, fast.num_inference_steps)
    if fast.method != "lesa":
        bundle = None
    return CompareResponse(
        model=fast.model, prompt=fast.prompt, seed=fast.seed, accelerated=fast_side, full=full_side,
        speedup=round(speedup, 3), psnr_db=psnr_db(fast_png, full_png),
        quality_card=dict(bundle.quality) if bundle is not None and bundle.quality else None,
    )  # fmt: skip
