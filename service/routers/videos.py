"""Videos: OpenAI's asynchronous job lifecycle (create, list, retrieve, content, delete = cancel), and cancel."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from service.deps import IdempotencyKey, OwnerDep, ReadyDep, get_job, resolve_for_load, submit, with_given_pixels
from service.errors import ApiError
from service.queue import Job, JobSpec, JobStatus
from service.routers.common import (
    LIST_ERRORS,
    ListQueryDep,
    artifact_response,
    cancel_only,
    cancel_or_delete,
    job_events,
    list_page,
    one_file,
    read_body,
    uploaded,
    validated,
)
from service.schemas import (
    DeletedObject,
    ErrorResponse,
    ListResponse,
    VideoCreateRequest,
    VideoObject,
    VideoRemixRequest,
)
from service.views import video_object

router = APIRouter(prefix="/v1/videos", tags=["videos"])

# The official `openai` client sends `videos.create` as multipart/form-data (it may carry an
# input_reference file); curl users send JSON. Both are parsed into the same model by hand, so
# the schema is declared here for /docs.
_BODY_SCHEMA = VideoCreateRequest.model_json_schema()
_FORM_SCHEMA = {
    **_BODY_SCHEMA,
    "properties": {
        **_BODY_SCHEMA["properties"],
        "input_reference": {
            "type": "string",
            "format": "binary",
            "description": "The first frame (PNG, JPEG or WEBP; resized to the video's size): kept as frame 0 at "
            "every step, and the clip generated from it. Models whose card says `image_input: false` refuse it.",
        },
    },
}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _BODY_SCHEMA}, "multipart/form-data": {"schema": _FORM_SCHEMA}},
    }
}


@router.post(
    "",
    response_model=VideoObject,
    openapi_extra=_OPENAPI_BODY,
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
    summary="Create a video (async job)",
)
async def create_video(
    request: Request,
    services: ReadyDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKey = None,
) -> VideoObject:
    """Queue a video; poll `GET /v1/videos/{id}` (progress per denoising step), then get `/content`."""
    data, files = await read_body(request, VideoCreateRequest, files=("input_reference",))
    body, reference = validated(VideoCreateRequest, data), one_file(files, "input_reference")
    spec = await resolve_for_load(services, body, services.engine.resolve_video)
    if reference is not None:
        spec = await with_given_pixels(services, spec, reference)
    job = await submit(services, spec, owner, idempotency_key, uploaded(body, input_reference=reference))
    return video_object(job)


def _remix_request(original: JobSpec, prompt: str) -> VideoCreateRequest:
    """The create request that reruns `original` with `prompt`: its model, size, length, steps,
    guidance, level (before any raise under load), method, priority, queue timeout and seed."""
    return VideoCreateRequest(
        prompt=prompt, model=original.model, size=f"{original.width}x{original.height}",
        num_frames=original.num_frames, seed=original.seed, num_inference_steps=original.num_inference_steps,
        guidance_scale=original.guidance_scale, acceleration=original.raised_from or original.level,
        method=original.method, priority=original.priority, queue_timeout_s=original.queue_timeout_s,
        user=original.user,
    )  # fmt: skip


@router.post(
    "/{video_id}/remix",
    response_model=VideoObject,
    responses={
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        409: {"model": ErrorResponse, "description": "the video is not completed (`video_not_completed`)"},
        429: {"model": ErrorResponse},
    },
    summary="Remix a completed video with a new prompt (async job)",
)
async def remix_video(
    video_id: str,
    body: VideoRemixRequest,
    services: ReadyDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKey = None,
) -> VideoObject:
    """A new video job with the completed video's settings and seed, so the same starting noise,
    and the new prompt: what carries over is what that noise shapes (layout, motion), not the
    pixels. `remixed_from_video_id` names the original."""
    original = await get_job(services, video_id, "video", owner, "video_id")
    if original.status != JobStatus.completed:
        raise ApiError(409, f"video {video_id} is {original.status.value}: only a completed video can be remixed",
                       param="video_id", code="video_not_completed")  # fmt: skip
    request = _remix_request(original.spec, body.prompt)
    spec = await resolve_for_load(services, request, services.engine.resolve_video)
    # the original's first frame, if it had one, as resolved then (the uploaded file is not kept)
    given = {
        **await services.queue.get_uploads(original.id),
        "reference_follow_until": original.spec.reference_follow_until,
    }
    job = await submit(services, spec.model_copy(update={"remixed_from": original.id, **given}), owner, idempotency_key,
                       request)  # fmt: skip
    return video_object(job)


@router.get("", response_model=ListResponse, responses=LIST_ERRORS, summary="List videos")
async def list_videos(services: ReadyDep, owner: OwnerDep, query: ListQueryDep) -> ListResponse:
    async def view(job: Job) -> VideoObject:
        return video_object(job)

    return await list_page(services, "video", owner, query, view)


@router.get("/{video_id}", response_model=VideoObject, summary="Retrieve a video")
async def get_video(video_id: str, services: ReadyDep, owner: OwnerDep) -> VideoObject:
    return video_object(await get_job(services, video_id, "video", owner, "video_id"))


@router.head("/{video_id}/content", include_in_schema=False)  # the size, before a download
@router.get(
    "/{video_id}/content",
    response_class=Response,
    responses={200: {"content": {"video/mp4": {}, "image/png": {}}}},
    summary="Download the MP4 (or ?variant=thumbnail / spritesheet PNG)",
)
async def video_content(
    video_id: str,
    request: Request,
    services: ReadyDep,
    owner: OwnerDep,
    variant: Annotated[Literal["video", "thumbnail", "spritesheet"], Query()] = "video",
) -> Response:
    job = await get_job(services, video_id, "video", owner, "video_id")
    variant_name = "primary" if variant == "video" else variant
    return await artifact_response(services, job, request, index=0, variant=variant_name)


@router.get(
    "/{video_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="Progress as server-sent events",
)
async def video_events(video_id: str, services: ReadyDep, owner: OwnerDep) -> StreamingResponse:
    """`event: <status>` + `data: <video object>` on every status or progress change (per
    denoising step); the stream ends after `completed`, `failed` or `cancelled`."""
    await get_job(services, video_id, "video", owner, "video_id")  # 404 before the stream starts

    async def render(job: Job) -> VideoObject:
        return video_object(job)

    return job_events(services, video_id, "video", render)


@router.post("/{video_id}/cancel", response_model=VideoObject, summary="Cancel a video (never deletes)")
async def cancel_video(video_id: str, services: ReadyDep, owner: OwnerDep) -> VideoObject:
    """A queued or running video stops (status `cancelled`); a finished one is returned unchanged,
    its MP4 kept. DELETE is the same on a live video but forgets a finished one."""
    return video_object(await cancel_only(services, video_id, "video", owner, "video_id"))


@router.delete("/{video_id}", response_model=DeletedObject, summary="Cancel a running video / delete a finished one")
async def delete_video(video_id: str, services: ReadyDep, owner: OwnerDep) -> DeletedObject:
    """A queued or running video is cancelled: denoising stops at the next step, status `cancelled`."""
    return await cancel_or_delete(services, video_id, "video", owner, "video.deleted", param="video_id")
