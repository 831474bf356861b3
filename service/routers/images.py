"""Images: the synchronous OpenAI endpoint, the same request as a job, and output files."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.deps import (
    IdempotencyKey,
    OwnerDep,
    ReadyDep,
    Services,
    failed_job_error,
    get_job,
    resolve_for_load,
    submit,
    wait_while_connected,
    with_given_pixels,
)
from service.errors import ApiError
from service.links import ContentLinks, signing_key
from service.queue import Job, JobStatus
from service.routers.common import (
    LIST_ERRORS,
    ListQueryDep,
    artifact_response,
    cancel_only,
    cancel_or_delete,
    image_stream,
    job_events,
    list_page,
    one_file,
    partial_response,
    read_body,
    uploaded,
    validated,
)
from service.schemas import (
    DeletedObject,
    ErrorResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageJobObject,
    ImagesResponse,
    ImageVariationRequest,
    ListResponse,
)
from service.views import image_job_object, images_response

router = APIRouter(prefix="/v1/images", tags=["images"])

ERRORS = {
    400: {"model": ErrorResponse, "description": "invalid request; `error.param` names the field"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    429: {
        "model": ErrorResponse,
        "description": "queue full, or the API key's live jobs or rate budget spent; see Retry-After",
    },
    503: {"model": ErrorResponse, "description": "loading, queue unavailable, or not started in `queue_timeout_s`"},
    504: {"model": ErrorResponse, "description": "not finished in time; `error.job_id` can be polled"},
}


def _multipart(model: type[BaseModel], **files: str) -> dict:
    """OpenAPI's multipart form of `model`'s text fields plus `files` (name -> description), the
    first of them required: what the official `openai` client sends for `images.edit` and
    `images.create_variation`."""
    schema = model.model_json_schema()
    binary = {name: {"type": "string", "format": "binary", "description": text} for name, text in files.items()}
    form = {**schema, "required": [*schema.get("required", []), next(iter(files))]}
    form["properties"] = {**schema["properties"], **binary}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


_IMAGE = "(PNG, JPEG or WEBP; resized to the output size)."
_EDIT_MASK = (
    "Optional RGBA PNG of the image's size: its fully transparent pixels are edited, the rest of the image kept "
    "at every step."
)
_EDIT_FORM = _multipart(ImageEditRequest, image=f"The image to edit {_IMAGE}", mask=_EDIT_MASK)
# An image job's form: an edit's, or without a prompt (and mask) a variation's.
_EDIT_SCHEMA = _EDIT_FORM["requestBody"]["content"]["multipart/form-data"]["schema"]
_JOB_FORM = {
    **_EDIT_SCHEMA,
    "required": [name for name in _EDIT_SCHEMA["required"] if name != "prompt"],
    "properties": {
        **_EDIT_SCHEMA["properties"],
        "prompt": {**{k: v for k, v in _EDIT_SCHEMA["properties"]["prompt"].items() if k != "minLength"},
                   "description": "What to draw. Empty or left out (and no mask): variations of the image, as "
                   "POST /v1/images/variations makes them."},
    },
}  # fmt: skip
# A sync image request's answers: the images, or with stream=true server-sent events.
IMAGE_ANSWERS = {**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "images, or events (stream)"}}


def content_links(request: Request, services: ReadyDep) -> ContentLinks:
    """How this request's answers link to images: at the address the client reached (or the
    configured public one), signed when API keys are on (`service/links.py`)."""
    base_url = (services.settings.public_base_url or str(request.base_url)).rstrip("/")
    return ContentLinks(base_url, signing_key(services.settings.api_key_set))


@router.post(
    "/generations",
    response_model=ImagesResponse,
    responses=IMAGE_ANSWERS,
    summary="Create images (sync)",
)
async def create_images(
    body: ImageGenerationRequest,
    request: Request,
    services: ReadyDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse | StreamingResponse:
    """OpenAI `images.generate`: waits for the images (up to `LESA_SYNC_TIMEOUT_S`).

    On timeout the answer is 504 with the job id in `error.job_id`; the job keeps running and
    can be fetched from `GET /v1/images/jobs/{job_id}`. With `stream: true`, server-sent events
    as OpenAI streams images: `partial_images` previews, then the image (`image_stream`).
    A client that goes away before the answer cancels the job, unless it sent an Idempotency-Key.
    """
    spec = await resolve_for_load(services, body, services.engine.resolve_image)
    job = await submit(services, spec, owner, idempotency_key, body)
    return await _images_answer(services, job, body, request, keep=idempotency_key is not None)


@router.post(
    "/edits",
    response_model=ImagesResponse,
    openapi_extra=_EDIT_FORM,
    responses=IMAGE_ANSWERS,
    summary="Edit an image (sync)",
)
async def edit_images(
    request: Request,
    services: ReadyDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse | StreamingResponse:
    """OpenAI `images.edit`: the image, redrawn to the prompt where the mask is transparent (no
    mask: everywhere, as far as `strength` lets it), answered as `/v1/images/generations` answers.
    Every acceleration level applies: forecasts never read the image."""
    data, files = await read_body(request, ImageEditRequest, files=("image", "mask"))
    body = validated(ImageEditRequest, data)
    image, mask = one_file(files, "image", required=True), one_file(files, "mask")
    spec = await resolve_for_load(services, body, services.engine.resolve_image)
    spec = await with_given_pixels(services, spec, image, mask, body.strength)
    job = await submit(services, spec, owner, idempotency_key, uploaded(body, image=image, mask=mask))
    return await _images_answer(services, job, body, request, keep=idempotency_key is not None)


@router.post(
    "/variations",
    response_model=ImagesResponse,
    openapi_extra=_multipart(ImageVariationRequest, image=f"The image to vary {_IMAGE}"),
    responses=IMAGE_ANSWERS,
    summary="Create variations of an image (sync)",
)
async def create_image_variations(
    request: Request,
    services: ReadyDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKey = None,
) -> ImagesResponse | StreamingResponse:
    """OpenAI `images.create_variation`: `n` images like the given one, each from its own seed:
    the image, noised as far as `strength` (0.5) lets it, redrawn without a prompt (or to LESA's
    optional `prompt`). Answered as `/v1/images/generations` answers."""
    data, files = await read_body(request, ImageVariationRequest, files=("image",))
    body = validated(ImageVariationRequest, data)
    image = one_file(files, "image", required=True)
    spec = await resolve_for_load(services, body, services.engine.resolve_image)
    spec = await with_given_pixels(services, spec, image, strength=body.strength, variation=True)
    job = await submit(services, spec, owner, idempotency_key, uploaded(body, image=image))
    return await _images_answer(services, job, body, request, keep=idempotency_key is not None)


async def _images_answer(
    services: Services, job: Job, body: ImageGenerationRequest, request: Request, *, keep: bool
) -> ImagesResponse | StreamingResponse:
    """A sync image request's answer: its events (stream), or its images once done (up to
    `LESA_SYNC_TIMEOUT_S`). `keep`: it came with an Idempotency-Key, so a retry collects the job,
    which is never cancelled when the client goes away."""
    assert services.queue is not None
    if body.stream:
        return image_stream(services, job.id, keep=keep)
    timeout = services.settings.sync_timeout_s
    job = await wait_while_connected(services, job, timeout, request.is_disconnected, keep=keep)
    if job.status == JobStatus.completed:
        return await images_response(
            job, services.queue, response_format=body.response_format, links=content_links(request, services),
        )  # fmt: skip
    if job.status == JobStatus.failed:
        raise failed_job_error(job)
    # OpenAI SDKs retry 409 and 5xx by default; a retry here would start a second generation
    # while the first continues (or was cancelled on purpose), so tell them not to.
    no_retry = {"x-should-retry": "false"}
    if job.status == JobStatus.cancelled:
        raise ApiError(409, f"job {job.id} was cancelled", code="cancelled", extra={"job_id": job.id},
                       headers=no_retry)  # fmt: skip
    raise ApiError(
        504,
        f"the images were not ready within {timeout:g} s; job {job.id} continues: poll GET /v1/images/jobs/{job.id}",
        type="timeout",
        code="timeout",
        extra={"job_id": job.id},
        headers=no_retry,
    )


@router.post(
    "/jobs",
    status_code=202,
    response_model=ImageJobObject,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ImageGenerationRequest.model_json_schema()},
                # an edit's form; without a prompt (and mask) a variation's
                "multipart/form-data": {"schema": _JOB_FORM},
            },
        }
    },
    responses=ERRORS,
    summary="Create images (as a job)",
)
async def create_image_job(
    request: Request,
    services: ReadyDep,
    owner: OwnerDep,
    idempotency_key: IdempotencyKey = None,
) -> ImageJobObject:
    """The body of `/v1/images/generations` (JSON), of `/v1/images/edits` (a multipart form with an
    `image`), or of `/v1/images/variations` (an `image` and no prompt), answered at once with a job
    to poll (long requests; the playground's edits and variations)."""
    data, files = await read_body(request, ImageEditRequest, files=("image", "mask"))
    image, mask = one_file(files, "image"), one_file(files, "mask")
    body: ImageGenerationRequest
    variation = image is not None and mask is None and data.get("prompt", "") == ""
    if image is None:
        if mask is not None:
            raise ApiError(400, "image: a mask needs the image it masks", param="image",
                           code="missing_required_parameter")  # fmt: skip
        body = validated(ImageGenerationRequest, data)
    elif variation:
        body = validated(ImageVariationRequest, data)
    else:
        body = validated(ImageEditRequest, data)
    if body.stream:
        raise ApiError(400, "stream=true is for POST /v1/images/generations; a job streams progress from "
                       "GET /v1/images/jobs/{job_id}/events", param="stream", code="unsupported_value")  # fmt: skip
    spec = await resolve_for_load(services, body, services.engine.resolve_image)
    if image is not None:
        strength = getattr(body, "strength", None)
        spec = await with_given_pixels(services, spec, image, mask, strength, variation=variation)
    job = await submit(services, spec, owner, idempotency_key, uploaded(body, image=image, mask=mask))
    assert services.queue is not None
    return await image_job_object(job, services.queue, content_links(request, services))


@router.get("/jobs", response_model=ListResponse, responses=LIST_ERRORS, summary="List image jobs")
async def list_image_jobs(request: Request, services: ReadyDep, owner: OwnerDep, query: ListQueryDep) -> ListResponse:
    """The caller's image jobs (sync requests' too), newest first: find a job whose answer was lost."""
    assert services.queue is not None
    queue, links = services.queue, content_links(request, services)

    async def view(job: Job) -> ImageJobObject:
        return await image_job_object(job, queue, links)

    return await list_page(services, "image", owner, query, view)


@router.get("/jobs/{job_id}", response_model=ImageJobObject, summary="Get an image job")
async def get_image_job(job_id: str, request: Request, services: ReadyDep, owner: OwnerDep) -> ImageJobObject:
    job = await get_job(services, job_id, "image", owner)
    assert services.queue is not None
    return await image_job_object(job, services.queue, content_links(request, services))


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
    summary="Image job progress as server-sent events",
)
async def image_job_events(job_id: str, request: Request, services: ReadyDep, owner: OwnerDep) -> StreamingResponse:
    """`event: <status>` + `data: <image job>` on every status or progress change; ends when the
    job does (the last event carries the image URLs)."""
    await get_job(services, job_id, "image", owner)
    links = content_links(request, services)

    async def render(job: Job) -> ImageJobObject:
        assert services.queue is not None
        return await image_job_object(job, services.queue, links)

    return job_events(services, job_id, "image", render)


@router.get(
    "/jobs/{job_id}/partials/{index}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
    summary="A preview of an image job while it denoises",
)
async def image_job_partial(
    job_id: str, index: Annotated[int, Path(ge=0, le=2)], services: ReadyDep, owner: OwnerDep
) -> Response:
    """Partial image `index` of a job that asked for `partial_images` (the job object counts the
    ones stored so far); kept as long as the job."""
    job = await get_job(services, job_id, "image", owner)
    return await partial_response(services, job, index)


@router.post("/jobs/{job_id}/cancel", response_model=ImageJobObject, summary="Cancel an image job (never deletes)")
async def cancel_image_job(job_id: str, request: Request, services: ReadyDep, owner: OwnerDep) -> ImageJobObject:
    """A queued or running job stops (status `cancelled`); a finished one is returned unchanged,
    its images kept. DELETE is the same on a live job but forgets a finished one."""
    job = await cancel_only(services, job_id, "image", owner)
    assert services.queue is not None
    return await image_job_object(job, services.queue, content_links(request, services))


@router.delete("/jobs/{job_id}", response_model=DeletedObject, summary="Cancel (or delete) an image job")
async def delete_image_job(job_id: str, services: ReadyDep, owner: OwnerDep) -> DeletedObject:
    return await cancel_or_delete(services, job_id, "image", owner, "image.job.deleted")


@router.head("/{job_id}/content", include_in_schema=False)  # the size, before a download
@router.get(
    "/{job_id}/content",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
    summary="Download one image of a job",
)
async def image_content(
    job_id: str,
    request: Request,
    services: ReadyDep,
    owner: OwnerDep,
    index: Annotated[int, Query(ge=0, le=7, description="which image of the job (0-based)")] = 0,
) -> Response:
    job = await get_job(services, job_id, "image", owner)
    return await artifact_response(services, job, request, index=index, variant="primary")
