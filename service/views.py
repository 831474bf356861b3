"""Job records -> the response objects clients see (OpenAI shapes + `lesa`)."""

from __future__ import annotations

import base64
import time
from typing import Any

from service.errors import ApiError
from service.links import ContentLinks
from service.queue import Job, JobQueue, JobStatus
from service.schemas import (
    ImageData,
    ImageJobObject,
    ImagesResponse,
    JobErrorBody,
    LesaStats,
    VideoObject,
)


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def lesa_stats(job: Job) -> LesaStats:
    spec = job.spec
    data = dict(job.result.lesa) if job.result else {}
    data.setdefault("job_id", job.id)
    data.setdefault("model", spec.model)
    data.setdefault("level", spec.level)
    data.setdefault("method", spec.method)
    data.setdefault("num_inference_steps", spec.num_inference_steps)
    data.setdefault("guidance_scale", spec.guidance_scale)
    data.setdefault("seed", spec.seed)
    data.setdefault("raised_from", spec.raised_from)
    data["requested_acceleration"] = spec.requested_acceleration  # kept with the job: async results say it too
    return LesaStats.model_validate({k: v for k, v in data.items() if k in LesaStats.model_fields})


async def images_response(job: Job, queue: JobQueue, *, response_format: str, links: ContentLinks) -> ImagesResponse:
    assert job.result is not None
    data: list[ImageData] = []
    for ref in sorted(job.result.outputs, key=lambda r: r.index):
        if response_format == "url":
            data.append(ImageData(url=links.image(job, ref.index), revised_prompt=job.spec.prompt))
            continue
        content = await queue.get_artifact(job.id, ref.name)
        if content is None:  # expired between completion and now: tell the client, don't 500
            raise ApiError(410, f"outputs of job {job.id} have expired", code="expired")
        data.append(ImageData(b64_json=base64.b64encode(content).decode("ascii"), revised_prompt=job.spec.prompt))
    return ImagesResponse(
        created=int(job.completed_at or time.time()),
        data=data,
        output_format=job.spec.output_format,
        quality=job.spec.quality or "auto",
        size=f"{job.spec.width}x{job.spec.height}",
        lesa=lesa_stats(job),
    )


def _error(job: Job) -> JobErrorBody | None:
    if job.error is not None:
        return JobErrorBody(code=job.error.code, message=job.error.message)
    if job.status == JobStatus.cancelled:
        return JobErrorBody(code="cancelled", message="the job was cancelled")
    return None


def _job_fields(job: Job) -> dict[str, Any]:
    """What every job object says, video or image: its state, place in line, tries and prompt."""
    return dict(
        id=job.id,
        model=job.spec.model,
        status=job.status.value,
        progress=job.progress,
        queue_position=job.queue_position,
        attempts=job.attempts,
        priority=job.spec.priority,
        created_at=int(job.created_at),
        completed_at=_ts(job.completed_at),
        expires_at=_ts(job.expires_at),
        error=_error(job),
        prompt=job.spec.prompt,
    )


def video_object(job: Job) -> VideoObject:
    spec = job.spec
    frames = spec.num_frames or 1
    fps = spec.fps or 1
    return VideoObject(
        **_job_fields(job),
        remixed_from_video_id=spec.remixed_from,
        seconds=f"{frames / fps:g}",
        size=f"{spec.width}x{spec.height}",
        num_frames=frames,
        fps=fps,
        lesa=lesa_stats(job) if job.status == JobStatus.completed else None,
    )


async def image_job_object(job: Job, queue: JobQueue, links: ContentLinks) -> ImageJobObject:
    spec = job.spec
    result = None
    if job.status == JobStatus.completed:
        result = await images_response(job, queue, response_format="url", links=links)
    return ImageJobObject(
        **_job_fields(job),
        size=f"{spec.width}x{spec.height}",
        n=spec.n,
        partial_images=job.partials,
        result=result,
    )


# OpenAI's image stream events (`client.images.generate(stream=True)`); usage is for GPT image
# models only: zeros here.
_NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
             "output_tokens": 0, "total_tokens": 0}  # fmt: skip


def image_stream_event(job: Job, content: bytes, partial_index: int | None) -> dict:
    """`image_generation.partial_image` (with `partial_index`) or `image_generation.completed`."""
    event: dict[str, Any] = {
        "b64_json": base64.b64encode(content).decode("ascii"),
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": job.spec.output_format,
        "quality": job.spec.quality or "auto",
        "size": f"{job.spec.width}x{job.spec.height}",
    }
    if partial_index is not None:
        event.update(type="image_generation.partial_image", partial_image_index=partial_index)
    else:
        event.update(type="image_generation.completed", usage=_NO_USAGE,
                     lesa=lesa_stats(job).model_dump(mode="json"))  # fmt: skip
    return event
