"""Helpers shared by the image and video job routes."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from service import media
from service.deps import Services, cancel, client_gone, get_job, read_job, unavailable
from service.errors import ApiError, bad_request, body_validation_error
from service.queue import Job, JobKind, JobStatus, QueueUnavailable, UnknownCursor
from service.schemas import DeletedObject, ErrorResponse, ListResponse
from service.views import image_stream_event

log = logging.getLogger("lesa.api")
Body = TypeVar("Body", bound=BaseModel)
Uploads = dict[str, list[bytes]]  # a form's files by field name


@functools.cache
def _field_types(model: type[BaseModel]) -> dict[str, set[str]]:
    """Each field of a request model with its JSON types ("integer", "number", "boolean", ...)."""
    return {
        name: {prop.get("type"), *(p.get("type") for p in prop.get("anyOf", []))} - {None}
        for name, prop in model.model_json_schema()["properties"].items()
    }


def _form_value(types: set[str], value: str) -> Any:
    """A form field's string as the JSON value it spells for a field of JSON types `types` (a form
    sends every field as a string); a string that spells none is kept, and the strict field refuses
    it, naming the field, as it refuses `true` or "8" in JSON."""
    try:
        if "integer" in types:
            return int(value)
        if "number" in types:
            return float(value)
    except ValueError:
        return value
    if "boolean" in types and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


async def read_body(
    request: Request, model: type[BaseModel], files: Collection[str] = ()
) -> tuple[dict[str, Any], Uploads]:
    """A request body as JSON (or with no Content-Type, as FastAPI reads the image routes' bodies),
    or as a multipart / urlencoded form, the way the official `openai` client sends `images.edit`
    and `videos.create`: its fields as values for `model_validate(model, ...)` (a form's strings
    read as the numbers and booleans they spell for `model`'s fields), and the bytes of the files
    named in `files` (an array of files comes as `name[]`; only a form carries files).
    A file where text is expected, text where a file is, or a body that is neither is a 400."""
    content_type = request.headers.get("content-type", "").lower()  # media types are case-insensitive
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return await _read_form(request, model, files)
    media_type = content_type.split(";")[0].strip()
    if media_type and not (media_type == "application/json" or media_type.endswith("+json")):
        raise ApiError(400, "the body must be a JSON object, sent with Content-Type: application/json "
                       "(or a multipart / urlencoded form)", code="invalid_json")  # fmt: skip
    body = await request.body()
    if not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    for name in files:
        if name in data:
            raise ApiError(400, f"{name}: send the image as a file in a multipart form (as the openai client does)",
                           param=name, code="invalid_value")  # fmt: skip
    return data, {}


async def _read_form(
    request: Request, model: type[BaseModel], files: Collection[str]
) -> tuple[dict[str, Any], Uploads]:
    types = _field_types(model)
    form = await request.form()
    data: dict[str, Any] = {}
    uploads: Uploads = {}
    for name, value in form.multi_items():
        field_name = name[:-2] if name.endswith("[]") and name[:-2] in files else name
        if field_name in files:
            if isinstance(value, str):
                raise ApiError(400, f"{field_name}: expected a file, got a text field", param=field_name,
                               code="invalid_value")  # fmt: skip
            uploads.setdefault(field_name, []).append(await value.read())
            continue
        if not isinstance(value, str):  # dropped, the field would silently take its default
            raise ApiError(400, f"{name}: expected a text field, got a file", param=name, code="invalid_value")
        if "\ufffd" in value:  # the form parser's stand-in for bytes that are not UTF-8 (JSON refuses them)
            raise ApiError(400, f"{name}: not valid UTF-8", param=name, code="invalid_value")
        data[name] = _form_value(types[name], value) if name in types else value
    return data, uploads


def validated(model: type[Body], data: dict[str, Any]) -> Body:
    """`model.model_validate(data)`, its errors as FastAPI reports a body's: a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise body_validation_error(error) from None


def one_file(uploads: Uploads, name: str, required: bool = False) -> bytes | None:
    """The one file a form sent as `name` (None if none and not `required`); else a 400 naming it."""
    sent = uploads.get(name, [])
    if len(sent) > 1 or (required and not sent):
        raise ApiError(400, f"{name}: send one image file, got {len(sent)}", param=name,
                       code="invalid_value" if sent else "missing_required_parameter")  # fmt: skip
    return sent[0] if sent else None


class _RequestWithFiles(BaseModel):
    request: dict[str, Any]
    files: dict[str, str]


def uploaded(body: BaseModel, **files: bytes | None) -> BaseModel:
    """What an Idempotency-Key remembers of a request that came with files: its fields and each
    file's SHA-256, so a retry with other pixels is told apart (a request without files: itself)."""
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items() if data is not None}
    return _RequestWithFiles(request=body.model_dump(mode="json"), files=digests) if digests else body


async def artifact_response(services: Services, job: Job, request: Request, *, index: int, variant: str) -> Response:
    """The bytes of one output (or the byte range `request` asks); 404 naming what is missing
    (not ready, wrong index, expired)."""
    if job.status in (JobStatus.failed, JobStatus.cancelled):
        raise ApiError(409, f"job {job.id} is {job.status.value}: it has no content and never will",
                       code=f"job_{job.status.value}")  # fmt: skip
    if job.status != JobStatus.completed or job.result is None:
        raise ApiError(404, f"job {job.id} is {job.status.value}: no content yet", code="not_ready")
    ref = next((r for r in job.result.outputs if r.index == index and r.variant == variant), None)
    if ref is None:
        raise ApiError(404, f"job {job.id} has no {variant} output {index}", param="index", code="not_found")
    assert services.queue is not None
    content = await services.queue.get_artifact(job.id, ref.name)
    if content is None:
        raise ApiError(404, f"outputs of job {job.id} have expired", code="expired")
    headers = {
        # Generated content never changes for a job id: let clients and proxies cache it.
        "Cache-Control": "private, max-age=3600",
        "ETag": f'"{job.id}-{ref.name}"',
        "Content-Disposition": f'inline; filename="{job.id}-{ref.name}"',  # not every download "0.png"
    }
    return ranged_response(content, ref.content_type, headers, request)


def ranged_response(content: bytes, media_type: str, headers: dict[str, str], request: Request) -> Response:
    """`content`, or the one byte range the request asks (RFC 9110 §14): what a <video> element
    (Safari plays nothing without it) and a resumed download send. 304 to a revalidation with
    `headers["ETag"]`; only the headers to a HEAD."""
    etag, size = headers["ETag"], len(content)
    headers = {**headers, "Accept-Ranges": "bytes"}
    if etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=304, headers=headers)
    status, start, end = 200, 0, size
    asked, if_range = request.headers.get("range"), request.headers.get("if-range")
    if asked is not None and if_range in (None, etag):  # another If-Range: the file changed, send it all
        span = _byte_range(asked, size)
        if span == "unsatisfiable":
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if span is not None:
            (start, end), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    body = content[start:end]
    if request.method == "HEAD":
        headers["Content-Length"], body = str(len(body)), b""
    return Response(body, status_code=status, media_type=media_type, headers=headers)


def _byte_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """[start, end) of a single `bytes=a-b`, `bytes=a-` or `bytes=-n`; None for what a server may
    ignore (several ranges, another unit, garbage): the whole content is the answer then."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or not dash or "," in spec:
        return None
    first, last = first.strip(), last.strip()
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == "") or first == last == "":
        return None
    if first == "":  # the last n bytes
        return (max(0, size - int(last)), size) if int(last) > 0 and size else "unsatisfiable"
    if last and int(last) < int(first):
        return None
    if int(first) >= size:
        return "unsatisfiable"
    return int(first), min(size, int(last) + 1) if last else size


async def partial_response(services: Services, job: Job, index: int) -> Response:
    """The bytes of one partial image; 404 naming why there is none (not made yet, or never)."""
    if index >= job.spec.partial_images:
        raise ApiError(404, f"job {job.id} asked for {job.spec.partial_images} partial images; there is no {index}",
                       param="index", code="not_found")  # fmt: skip
    assert services.queue is not None
    content = await services.queue.get_partial(job.id, index) if index < job.partials else None
    if content is None:
        made = f"it is {job.status.value} and made {job.partials}" if job.status.terminal else "not made yet"
        raise ApiError(404, f"partial image {index} of job {job.id}: {made}", param="index",
                       code="not_found" if job.status.terminal else "not_ready")  # fmt: skip
    fmt = job.spec.output_format
    return Response(content, media_type=media.content_type(fmt), headers={"Cache-Control": "private, max-age=3600"})


async def cancel_or_delete(
    services: Services, job_id: str, kind: str, owner: str | None, object_name: str, param: str = "id"
) -> DeletedObject:
    """DELETE on a live job cancels it (kept, status `cancelled`); on a finished one forgets it."""
    job = await get_job(services, job_id, kind, owner, param)
    assert services.queue is not None
    if not job.status.terminal:
        job = await cancel(services, job)
        return DeletedObject(id=job_id, object=object_name, deleted=True, status=job.status.value)
    await services.queue.delete(job_id)
    return DeletedObject(id=job_id, object=object_name, deleted=True, status=job.status.value)


async def cancel_only(services: Services, job_id: str, kind: str, owner: str | None, param: str = "id") -> Job:
    """POST .../cancel: stop a live job and return its record; a finished job is returned as it is.

    Unlike DELETE (OpenAI's verb, which forgets a finished job), a cancel that crosses the job's
    completion keeps the result: the client asked to stop work, not to throw away what is done."""
    job = await get_job(services, job_id, kind, owner, param)
    return await cancel(services, job) if not job.status.terminal else job


EVENT_POLL_S = 0.1  # how often an event stream re-reads its job (works the same on every queue backend)
EVENT_KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream


def job_events(
    services: Services, job_id: str, kind: str, render: Callable[[Job], Awaitable[BaseModel]]
) -> StreamingResponse:
    """Server-sent events: one `data:` line with the job object whenever its status or progress
    changes, ending after the terminal state. Lets a browser show per-step progress without polling."""

    async def stream() -> AsyncIterator[bytes]:
        last: tuple[str, int, int | None] | None = None
        quiet_since = time.monotonic()
        while True:
            assert services.queue is not None
            try:
                job = await read_job(services, job_id)
                if job is None or job.spec.kind != kind:
                    yield b'event: error\ndata: {"code": "not_found"}\n\n'
                    return
                state = (job.status.value, job.progress, job.queue_position)
                payload = (await render(job)).model_dump_json() if state != last else ""
            except QueueUnavailable as down:  # the response has started: end it with an event, not a 500
                yield _sse("error", {"code": "queue_unavailable", "message": f"job queue unavailable: {down}"})
                return
            if state != last:
                last = state
                quiet_since = time.monotonic()
                yield f"event: {job.status.value}\ndata: {payload}\n\n".encode()
                if job.status.terminal:
                    return
            elif time.monotonic() - quiet_since > EVENT_KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            await asyncio.sleep(EVENT_POLL_S)

    return sse_response(stream())


def sse_response(events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies (nginx honours X-Accel-Buffering)."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )


def _sse(event: str, payload: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


@dataclass
class ListQuery:
    """A list request's cursor query, OpenAI's: `after` (the last id of the previous page), `limit`, `order`."""

    after: str | None
    limit: int
    order: Literal["asc", "desc"]


def list_query(
    after: Annotated[str | None, Query(description="id of the last item of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query(description="by creation time")] = "desc",
) -> ListQuery:
    return ListQuery(after, limit, order)


ListQueryDep = Annotated[ListQuery, Depends(list_query)]
LIST_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "`after` names a job that is gone (deleted, expired)"}
}


async def list_page(
    services: Services,
    kind: JobKind,
    owner: str | None,
    query: ListQuery,
    view: Callable[[Job], Awaitable[BaseModel]],
) -> ListResponse:
    """One page of `owner`'s jobs of `kind`, OpenAI's list shape; a gone `after` is a 400 naming it."""
    assert services.queue is not None
    after, limit, order = query.after, query.limit, query.order
    try:
        jobs, has_more = await services.queue.list(kind=kind, after=after, limit=limit, order=order, owner=owner)
    except UnknownCursor:
        raise bad_request(
            f"cannot list after {after!r}: no such {kind} job (unknown, deleted or expired); list again from the "
            "start, without `after`",
            "after",
        ) from None
    except QueueUnavailable as down:
        raise unavailable(services, down) from None
    data = [await view(job) for job in jobs]  # each object's id is its job's
    first, last = (jobs[0].id, jobs[-1].id) if jobs else (None, None)
    return ListResponse(data=data, first_id=first, last_id=last, has_more=has_more)


_BACKGROUND: set[asyncio.Task[None]] = set()


def _in_background(work: Awaitable[None]) -> None:
    """Run `work` in a task of its own: a cancelled stream's own awaits would be cancelled too."""
    task = asyncio.get_running_loop().create_task(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _client_gone_mid_stream(services: Services, job_id: str, keep: bool) -> None:
    assert services.queue is not None
    try:
        job = await services.queue.get(job_id)
        if job is not None and not job.status.terminal:
            log.info("%s", await client_gone(services, job, keep=keep))
    except QueueUnavailable:
        pass  # the job runs on; nothing else to do for a client that is gone


def image_stream(services: Services, job_id: str, *, keep: bool) -> StreamingResponse:
    """A streamed `POST /v1/images/generations`: each partial image as soon as the worker stored it,
    then the image; a failure, cancellation or `LESA_SYNC_TIMEOUT_S` ends it with an `error`
    event (which the openai client raises as APIError). The `X-Job-Id` header names the job.
    A client that goes away mid-stream cancels the job unless `keep` (`client_gone`)."""
    timeout = services.settings.sync_timeout_s

    def error(message: str, code: str, type_: str = "server_error") -> bytes:
        return _sse("error", {"error": {"message": message, "type": type_, "code": code, "job_id": job_id}})

    async def events() -> AsyncIterator[bytes]:
        assert services.queue is not None
        sent = 0
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while True:
            try:
                job = await read_job(services, job_id)
                if job is None:
                    yield error(f"job {job_id} expired", "expired")
                    return
                while sent < job.partials:  # stored before completion, so none is skipped
                    content = await services.queue.get_partial(job_id, sent)
                    if content is None:
                        break
                    yield _sse("image_generation.partial_image", image_stream_event(job, content, sent))
                    sent, quiet_since = sent + 1, time.monotonic()
                if job.status == JobStatus.completed:
                    assert job.result is not None
                    content = await services.queue.get_artifact(job_id, job.result.outputs[0].name)
                    if content is None:
                        yield error(f"outputs of job {job_id} have expired", "expired")
                    else:
                        yield _sse("image_generation.completed", image_stream_event(job, content, None))
                    return
            except QueueUnavailable as down:
                yield error(f"job queue unavailable: {down}", "queue_unavailable")
                return
            if job.status == JobStatus.failed:
                yield error(job.error.message if job.error else "generation failed",
                            job.error.code if job.error else "generation_failed")  # fmt: skip
                return
            if job.status == JobStatus.cancelled:
                yield error(f"job {job_id} was cancelled", "cancelled", "invalid_request_error")
                return
            if time.monotonic() > deadline:
                yield error(f"the image was not ready within {timeout:g} s; job {job_id} continues: poll "
                            f"GET /v1/images/jobs/{job_id}", "timeout", "timeout")  # fmt: skip
                return
            if time.monotonic() - quiet_since > EVENT_KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            await asyncio.sleep(EVENT_POLL_S)

    async def stream() -> AsyncIterator[bytes]:
        ended = False
        try:
            async for chunk in events():
                yield chunk
            ended = True
        finally:
            if not ended:  # the client went away: Starlette cancelled the stream, or dropped it at a send
                _in_background(_client_gone_mid_stream(services, job_id, keep))

    # The job id comes first, so a client can cancel (DELETE /v1/images/jobs/{id}) mid-stream.
    return sse_response(stream(), {"X-Job-Id": job_id})
