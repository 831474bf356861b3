"""Request and response bodies of the HTTP API (OpenAI shapes plus LESA's own fields).

The bounds here are the model-independent ones; limits that depend on the model (its sizes,
frame counts, step range, acceleration levels) are checked against the catalogue when the
request is resolved into a job (`service/engine.py: Engine.resolve_*`), with the same error shape.
Every field carries a description and an example because `/docs` is generated from this file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

from service.queue import Priority

MAX_SEED = 2**31 - 1 - 8  # sample i of a job uses seed + i, which must stay a valid 31-bit seed
MethodName = Literal["lesa", "taylorseer", "reuse", "none"]

_ACCELERATION = Field(
    None,
    max_length=32,
    description='Acceleration level the model offers ("none", "2x", "3.3x", "5x", "6.25x": see GET /v1/models), '
    'or "auto" = the fastest level whose measured quality card meets the server\'s PSNR floor. '
    "Default: the server's `LESA_DEFAULT_LEVEL`.",
    examples=["5x"],
)
_QUEUE_TIMEOUT = Field(
    None,
    gt=0,
    le=86400,
    allow_inf_nan=False,
    description="Seconds the job may wait for a worker: one not started by then fails with error code "
    "`queue_timeout` and never runs (a sync image request answers 503). Default: `LESA_QUEUE_TIMEOUT_S` "
    "(unset: no limit). A job started in time whose worker then dies runs again, deadline or not.",
    examples=[30],
)
_PRIORITY = Field(
    None,
    description='Where the job stands in line: workers take every queued "high" job (oldest first) before any '
    '"normal" one, and those before "low" ones; a batch holds jobs of one priority. Strict unless the server '
    "sets LESA_PRIORITY_AGING_S (then a job goes before any job one class higher submitted that many seconds "
    'after it); queue_timeout_s bounds a wait either way. Default: "normal".',
    examples=["high"],
)
_QUEUE_POSITION = Field(
    None, description="while queued: jobs of the same model that workers take before this one (0: next)"
)
_ATTEMPTS = Field(
    0,
    description="runs of this job a worker has started: 0 while it first waits, 1 once running; 2 or more when a "
    "worker stopped mid-run (crashed, killed, lost its node) and another started it over, `progress` from 0 again",
)
_MAX_ACCELERATION = Field(
    None,
    max_length=32,
    description="A faster level (as `acceleration`) the server may use instead when it is busy (at least "
    "`LESA_LOAD_QUEUE_DEPTH` jobs queued): the request then waits less and `lesa.raised_from` names the level it "
    "would have had. It must resolve with the request's method and be at least as fast as `acceleration`. "
    "Default: never faster than asked.",
    examples=["6.25x"],
)
_METHOD = Field(
    None,
    description='How skipped steps are forecast. Default: "lesa" where the model has a trained predictor for '
    'this level and step count, otherwise the training-free "taylorseer". Asking for "lesa" where no predictor '
    'exists is a 400 (never a silent fallback). Level "none" runs every step: leave method out (or "none").',
    examples=["lesa"],
)
_SEED = Field(
    None, ge=0, le=MAX_SEED, description="Seed of the first sample (sample i uses seed + i). Default: random.",
    examples=[1234],
)  # fmt: skip
_STEPS = Field(
    None, ge=1, le=1000,
    description="Denoising steps (the model's step range applies, see GET /v1/models). Default: the model's.",
    examples=[50],
)  # fmt: skip
_GUIDANCE = Field(
    None, ge=0, le=50, allow_inf_nan=False,
    description="Classifier-free guidance scale; 1 or less disables CFG. Default: the model's.", examples=[3.0],
)  # fmt: skip
_PROMPT_LIMIT = "At most `LESA_MAX_PROMPT_CHARS` characters (default 2000; never more than 4000)."


class StrictBody(BaseModel):
    # Unknown fields are rejected with their name rather than ignored: a typo such as
    # "acceleraton" must not silently run the unaccelerated default.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """`"n": null` means "the default", as in OpenAI's API (clients send null for unset fields)."""
        if isinstance(data, dict):
            defaults = {name for name, f in cls.model_fields.items() if not f.is_required() and f.default is not None}
            data = {k: v for k, v in data.items() if not (v is None and k in defaults)}
        return data


class ImageGenerationRequest(StrictBody):
    # Numbers are strict: `true`, "2" or 2.0 for n is a client bug to report, not a guess to make
    # (the video request is as strict in JSON; its multipart form's strings are read as numbers first)
    prompt: str = Field(
        ..., min_length=1, max_length=4000, description=f"What to draw. {_PROMPT_LIMIT}", examples=["a seven"]
    )
    model: str | None = Field(
        None,
        max_length=256,
        description="Model id from GET /v1/models. Default: the first image model.",
        examples=["digits-image"],
    )
    n: StrictInt = Field(1, ge=1, le=8, description="Number of images (one job, batched).", examples=[1])
    size: str | None = Field(
        None,
        pattern=r"^([0-9]{1,5}x[0-9]{1,5}|auto)$",
        description='"WIDTHxHEIGHT", one of the model\'s sizes, or "auto". Default: the model\'s first size.',
        examples=["16x16"],
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json",
        description='"b64_json": images inline; "url": links to GET /v1/images/{job_id}/content?index=i '
        "(valid until the job expires).",
    )
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="Encoding of the images.")
    output_compression: StrictInt | None = Field(
        None,
        ge=0,
        le=100,
        description="Quality of jpeg and webp outputs, 0-100 (OpenAI's field); 100 makes webp lossless. Default: "
        "jpeg at 95, webp lossless. png ignores it.",
    )
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = Field(
        None,
        description='OpenAI\'s quality, as an acceleration level when `acceleration` is not given: "high" (or '
        '"hd") computes every step, "low" takes the model\'s fastest level, "medium", "standard" and "auto" the '
        "server's default (LESA_DEFAULT_LEVEL). `acceleration` wins over it.",
    )
    user: str | None = Field(None, max_length=256, description="End-user id, echoed in logs only.")
    # OpenAI parameters that have no meaning for these models: accepted so that unmodified clients
    # work, and ignored.
    style: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    background: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    moderation: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    # strict: "stream": "yes" or 1 is a client bug to report, not a guess to make (the answer's
    # whole shape depends on it: server-sent events or one JSON object)
    stream: StrictBool = Field(
        False,
        description="POST /v1/images/generations only: answer with server-sent events as OpenAI streams "
        "images: `image_generation.partial_image` events (see partial_images), then one "
        "`image_generation.completed` with the image (n must be 1).",
    )
    partial_images: StrictInt | None = Field(
        None,
        ge=0,
        le=3,
        description="Previews of the (first) image while it denoises, 0-3, evenly spaced over the steps: the "
        "sampler's current estimate of the clean image. Sent as events with stream=true; for a job, at "
        "GET /v1/images/jobs/{id}/partials/{k} as they come.",
    )
    # LESA extensions
    seed: StrictInt | None = _SEED
    num_inference_steps: StrictInt | None = _STEPS
    guidance_scale: StrictFloat | None = _GUIDANCE  # `true` is not 1.0 (which would turn CFG off)
    acceleration: str | None = _ACCELERATION
    max_acceleration: str | None = _MAX_ACCELERATION
    method: MethodName | None = _METHOD
    queue_timeout_s: StrictFloat | None = _QUEUE_TIMEOUT
    priority: Priority | None = _PRIORITY


class ImageEditRequest(ImageGenerationRequest):
    """POST /v1/images/edits: the text fields of its multipart form (the official `openai` client's
    `images.edit`); the image and the mask are the form's files."""

    strength: StrictFloat | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="How far the image may change where it is edited, 0-1 (LESA's field, as diffusers' img2img "
        "`strength`): the first (1 - strength) of the steps follow the image, noised as the step is. Default: 1 "
        "with a mask (the transparent part is drawn anew), 0.6 without (the whole image is reworked).",
        examples=[0.6],
    )
    input_fidelity: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")


class ImageVariationRequest(ImageEditRequest):
    """POST /v1/images/variations: the text fields of its multipart form (the official `openai`
    client's `images.create_variation`); the image is the form's file."""

    prompt: str = Field(
        "",
        max_length=4000,
        description="LESA's: what the variations should show. Default: none, so the image alone decides (the "
        "model's unconditional prediction, as OpenAI's variations take no prompt).",
    )
    strength: StrictFloat | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="How far each variation may move from the image, 0-1 (as an edit's `strength`). Default: 0.5.",
        examples=[0.5],
    )


class VideoCreateRequest(StrictBody):
    """Accepted as JSON or as multipart/form-data (the form the official `openai` client sends).

    JSON numbers are strict, as in the image request; a form's fields are all strings, so the router
    first reads a number field's string as the number it spells (`service/routers/videos.py`)."""

    prompt: str = Field(
        ..., min_length=1, max_length=4000, description=f"What to animate. {_PROMPT_LIMIT}", examples=["a seven"]
    )
    model: str | None = Field(
        None,
        max_length=256,
        description="Model id from GET /v1/models. Default: the first video model.",
        examples=["digits-video"],
    )
    seconds: StrictFloat | None = Field(
        None, gt=0, le=600, allow_inf_nan=False,
        description="Duration; converted to frames at the model's fps and must give one of its frame counts. "
        "Give `seconds` or `num_frames` (default: the model's first frame count).", examples=[2],
    )  # fmt: skip
    num_frames: StrictInt | None = Field(None, ge=1, le=1024, description="Frame count (one the model supports).")
    size: str | None = Field(
        None, pattern=r"^([0-9]{1,5}x[0-9]{1,5}|auto)$", description='"WIDTHxHEIGHT" (one of the model\'s sizes).',
        examples=["16x16"],
    )  # fmt: skip
    user: str | None = Field(None, max_length=256)
    seed: StrictInt | None = _SEED
    num_inference_steps: StrictInt | None = _STEPS
    guidance_scale: StrictFloat | None = _GUIDANCE
    acceleration: str | None = _ACCELERATION
    max_acceleration: str | None = _MAX_ACCELERATION
    method: MethodName | None = _METHOD
    queue_timeout_s: StrictFloat | None = _QUEUE_TIMEOUT
    priority: Priority | None = _PRIORITY

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds_as_openai_sends_them(cls, value: Any) -> Any:
        """OpenAI's `seconds` is a string ("4", "8", "12"), in JSON too: a numeric string is read
        as its number; anything else is left for the type check to refuse, naming the field."""
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value


class VideoRemixRequest(StrictBody):
    """`POST /v1/videos/{video_id}/remix`: a completed video again with a new prompt."""

    prompt: str = Field(
        ..., min_length=1, max_length=4000, description=f"The new prompt. {_PROMPT_LIMIT}", examples=["a four"]
    )


class LesaStats(BaseModel):
    """What actually ran, per job: the acceleration, its cost and effect, and how to reproduce it."""

    job_id: str
    model: str
    level: str = Field(description="resolved acceleration level (never 'auto')", examples=["5x"])
    requested_acceleration: str | None = Field(None, description="what the request asked for, e.g. 'auto'")
    raised_from: str | None = Field(
        None, description="the level the request resolved to, when the server ran it at max_acceleration under load"
    )
    method: str = Field(examples=["lesa"])
    num_inference_steps: int
    guidance_scale: float
    full_steps: int | None = Field(None, description="steps that ran every transformer block, per sample")
    predicted_steps: int | None = Field(None, description="steps whose blocks were skipped and forecast")
    theoretical_speedup: float | None = Field(None, description="steps / full steps")
    realised_speedup: float | None = Field(
        None, description="estimated full-compute generation time / measured generation time (same batch)"
    )
    seed: int
    seeds: list[int] = Field(default_factory=list)
    model_revision: str | None = Field(
        None, description="the weights that ran: models.toml's pinned `revision`, or a content hash of a "
        "reference model's files; null: unpinned hub weights", examples=["3f1c0a9b2e47"],
    )  # fmt: skip
    predictor: str | None = Field(
        None,
        description="content hash of the LESA bundle that forecast the skipped steps (method lesa)",
        examples=["9a2e47b3f1c0"],
    )
    batch_size: int | None = Field(None, description="samples in the batched generation this job ran in")
    queue_ms: float | None = Field(None, description="time from submission to a worker starting it")
    generation_ms: float | None = Field(None, description="time of the batched generation")
    stage_ms: dict[str, float] | None = Field(
        None, description="the batched generation's time by stage, in order: encode_prompts (text encoder), "
        "denoise (the sampling loop), decode (latents to pixels), encode_output (PNG / MP4 encoding); "
        "a pipeline that does not time its stages reports one `pipeline` stage instead of the first three",
        examples=[{"encode_prompts": 2.1, "denoise": 410.5, "decode": 0.4, "encode_output": 3.2}],
    )  # fmt: skip
    total_ms: float | None = Field(None, description="submission to completion")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = Field(None, description="the prompt as run (unchanged here)")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str | None = None
    quality: str | None = Field(None, description='the request\'s `quality` ("auto" where it gave none)')
    size: str | None = None
    lesa: LesaStats


class JobErrorBody(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int = Field(ge=0, le=100, description="percent of denoising steps done, updated per step")
    queue_position: int | None = _QUEUE_POSITION
    attempts: int = _ATTEMPTS
    priority: Priority = "normal"
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    error: JobErrorBody | None = None
    prompt: str
    remixed_from_video_id: str | None = Field(None, description="the video this one remixes (POST .../remix)")
    seconds: str = Field(description="duration as OpenAI reports it (a string)")
    size: str
    num_frames: int
    fps: int
    lesa: LesaStats | None = Field(None, description="filled in when the video completes")


class ImageJobObject(BaseModel):
    """A long image request submitted as a job (POST /v1/images/jobs)."""

    id: str
    object: Literal["image.job"] = "image.job"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int
    queue_position: int | None = _QUEUE_POSITION
    attempts: int = _ATTEMPTS
    priority: Priority = "normal"
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    error: JobErrorBody | None = None
    prompt: str
    size: str
    n: int
    partial_images: int = Field(
        0, description="previews stored so far (the request's partial_images): GET /v1/images/jobs/{id}/partials/{k}"
    )
    result: ImagesResponse | None = Field(None, description="when completed: the images as `url`s")


class ListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class DeletedObject(BaseModel):
    id: str
    object: str
    deleted: bool
    status: str | None = Field(None, description="the job's status after the call (e.g. 'cancelled')")


class QualityCard(BaseModel):
    """Measured by the benchmark and stored in the predictor bundle's metadata."""

    model_config = ConfigDict(extra="allow")


class AccelerationLevel(BaseModel):
    level: str = Field(examples=["5x"])
    methods: list[str] = Field(description="methods available at this level (at `lesa_steps` for 'lesa')")
    full_steps: int = Field(description="full steps at the model's default step count")
    theoretical_speedup: float
    lesa_available: bool
    lesa_steps: int | None = Field(None, description="the step count the LESA predictor was trained for")
    predictor: str | None = Field(None, description="content hash of the LESA bundle (as `lesa.predictor`)")
    quality: dict[str, Any] | None = Field(None, description="the LESA predictor's quality card (PSNR vs full, …)")
    live_psnr: float | None = Field(
        None, description="mean PSNR vs full compute of this level's latest shadow checks (LESA_SHADOW_FRACTION; "
        "LESA samples at the quality card's steps and guidance)",
    )  # fmt: skip
    live_checks: int = Field(0, description="shadow-checked samples behind live_psnr (the latest 32 at most)")
    auto_judged_by: Literal["card", "live"] | None = Field(
        None, description='which PSNR "auto" compares with its floor (LESA_AUTO_MIN_PSNR): the quality card\'s, '
        "or live_psnr once live_checks reaches LESA_AUTO_LIVE_MIN_CHECKS",
    )  # fmt: skip


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(
        description="Unix seconds: when the weights were released, from the model's entry in deploy/models.toml "
        "(0 where it names none); the same on every replica"
    )
    owned_by: str = "lesa"
    kind: Literal["image", "video"]
    description: str = Field("", description="one line from the model's entry in deploy/models.toml")
    sizes: list[str]
    num_frames: list[int] | None = None
    fps: int | None = None
    default_steps: int
    step_range: tuple[int, int]
    default_guidance_scale: float
    default_acceleration: str
    revision: str | None = Field(None, description="the weights served (as `lesa.model_revision`)")
    image_input: bool = Field(
        False,
        description="whether it takes a given image: POST /v1/images/edits (image models), `input_reference` "
        "(video models: the first frame)",
    )
    acceleration: list[AccelerationLevel]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
