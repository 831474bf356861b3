"""Server configuration: environment variables with the `LESA_` prefix, or a `.env` file.

Example: `LESA_MAX_BATCH=8 LESA_API_KEYS=key1,key2 lesa serve`. Every field is documented
here because this class *is* the configuration reference.
"""

from __future__ import annotations

import base64
import re
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # allow_inf_nan=False: "nan" or "inf" in a number would pass every bound and then mean nothing
    model_config = SettingsConfigDict(env_prefix="LESA_", env_file=".env", extra="ignore", allow_inf_nan=False)

    # ---- network ----
    host: str = Field("127.0.0.1", description="interface `lesa serve` binds to")
    port: int = Field(8000, ge=0, le=65535)
    keep_alive_s: int = Field(
        75,
        ge=1,
        description="idle keep-alive connections are closed after this; keep it above the idle timeout of "
        "clients and load balancers (uvicorn's 5 s default equals httpx's, so a reused connection can race the close)",
    )
    public_base_url: str | None = Field(
        None,
        description="base URL clients reach this server at, used to build `url` outputs "
        "(default: the URL of the incoming request)",
    )

    # ---- models ----
    models: str = Field(
        "", description="comma-separated model names to serve; empty = every model the config enables on this node"
    )
    models_config: Path | None = Field(
        None, description="model config file (default: deploy/models.toml; see docs/PRODUCTION.md)"
    )
    weights_dir: Path | None = Field(
        None, description="weights tree: <model>/ and <model>/predictors/<level>/ (default: the config's)"
    )
    device: str = Field("auto", description='torch device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1"')
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="weights/compute dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads for CPU generation (default: torch's choice); 1 avoids "
        "oversubscription when the cores are shared with other processes",
    )
    retain_freed_memory: bool = Field(
        True,
        description="keep memory a generation frees for its next step instead of returning it to the kernel "
        "(glibc only; lesa_core/allocator.py): faster steps, resident memory stays near its peak",
    )
    warmup: bool = Field(True, description="run one tiny generation per model before reporting ready")
    warmup_steps: int = Field(4, ge=1, le=100)
    default_level: str = Field(
        "auto",
        description='acceleration level when a request names none; "auto" = the fastest LESA level whose '
        "quality card meets auto_min_psnr, else none",
    )
    auto_min_psnr: float = Field(
        28.0,
        description='"auto" picks the fastest level whose quality card PSNR (vs full compute) is at least this',
    )
    auto_live_min_checks: int = Field(
        8,
        ge=0,
        description='shadow-checked samples (shadow_fraction) a LESA level needs before "auto" judges it by '
        "their mean PSNR instead of its quality card, so a level whose served quality drifts below "
        "auto_min_psnr leaves auto until it recovers; 0: by the card only",
    )
    tracing: Literal["off", "otlp", "console"] = Field(
        "off",
        description="OpenTelemetry traces (`service/tracing.py`): `otlp` to OTEL_EXPORTER_OTLP_ENDPOINT "
        "(the SDK's variables), `console` to stdout",
    )
    queue_timeout_s: float | None = Field(
        None,
        gt=0,
        description="a job no worker started within this many seconds fails (`queue_timeout`) and never runs; "
        "a request's `queue_timeout_s` overrides it; unset = no limit",
    )
    load_queue_depth: int = Field(
        16,
        ge=0,
        description="jobs queued (not started) from which a request that allows it (`max_acceleration`) runs at "
        "that faster level instead of waiting longer; 0 = always. Jobs of the request's model (with Redis: "
        "every API replica sees the same)",
    )

    # ---- queue and worker ----
    embedded_worker: bool = Field(True, description="run a worker inside the API process (local demo default)")
    max_batch: int = Field(
        8, ge=1, le=64, description="most samples per batched generation, so also the largest `n` a request may ask for"
    )
    max_wait_ms: float = Field(
        50.0,
        ge=0,
        description="how long a worker waits for compatible jobs before starting a batch (only when "
        "requests are arriving concurrently: a lone client never waits)",
    )
    max_jobs_per_key: int = Field(
        0,
        ge=0,
        description="jobs one API key may have queued or running at once; more get 429 `rate_limit_exceeded` "
        "(0 = no limit; keys come from LESA_API_KEYS, requests without authentication have no limit)",
    )
    requests_per_minute_per_key: int = Field(
        0,
        ge=0,
        description="jobs one API key may create per minute (a whole minute's worth at once, then earned back "
        "evenly); more get 429 `rate_limit_exceeded` with Retry-After and OpenAI's x-ratelimit-* headers (0 = no "
        "limit; requests without authentication have none; `service/rate_limits.py`)",
    )
    steps_per_minute_per_key: int = Field(
        0,
        ge=0,
        description="full denoising steps one API key's jobs may cost per minute: steps computed, not predicted, "
        "times images, a video's frames counting as images (a 50-step image costs 50 at full compute, 10 at 5x); "
        "as LESA_REQUESTS_PER_MINUTE_PER_KEY otherwise. A job costing more than this alone gets 400",
    )
    max_backlog: int = Field(
        256,
        ge=1,
        description="queued jobs beyond which requests get 429 (with Redis: per model, so a model no "
        "worker serves fills only its own backlog)",
    )
    result_ttl_s: float = Field(3600.0, gt=0, description="how long finished jobs and outputs are kept")
    max_jobs_kept: int = Field(1000, ge=1, description="in-process queue: most finished jobs remembered")
    redis_url: str | None = Field(None, description="use the Redis queue at this URL instead of in-process")
    shadow_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of accelerated jobs a worker reruns at full compute, when idle, to export the PSNR "
        "between the two (`lesa_shadow_psnr_db`, online quality monitoring); each check costs one "
        "full-compute generation",
    )

    webhook_url: str | None = Field(
        None,
        description="POST a signed event here when a video or image job completes or fails (OpenAI's event "
        "shape and signing: `service/webhooks.py`); sent by the workers, at least once",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="signing secret of the webhooks (`whsec_<base64>` or any string); required with the URL"
    )
    webhook_attempts: int = Field(
        5, ge=1, le=20, description="tries per event (exponential back-off from 1 s, at most 60 s)"
    )

    # ---- requests ----
    sync_timeout_s: float = Field(
        300.0, gt=0, description="a synchronous image request answers 504 (with its job id) after this"
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_upload_bytes: int = Field(
        25_000_000,
        ge=1024,
        description="the limit instead of max_body_bytes for a multipart form on the routes that take image files "
        "(images/edits, images/jobs, videos: an edit's image and mask, input_reference); larger ones get 413",
    )
    api_keys: str = Field("", description="comma-separated Bearer keys required on /v1/*; empty = no authentication")
    priority_aging_s: float | None = Field(
        None,
        gt=0,
        description="a queued job goes before any job of the next higher `priority` submitted more than this many "
        "seconds after it (two classes up: twice that), so steady high traffic cannot hold the others back for "
        "ever; unset = strict (every higher-class job goes first). With Redis, give the API and the workers the same",
    )
    high_priority_keys: str = Field(
        "",
        description='comma-separated keys of LESA_API_KEYS whose requests may ask for `priority: "high"` (others '
        "get 403 naming `priority`); empty = every caller may",
    )
    cors_origins: str = Field(
        "",
        description="comma-separated origins whose web apps may call the API from a browser (CORS), e.g. "
        "`https://app.example.com`; `*` = any; empty = none (the playground is same-origin and needs none)",
    )
    max_prompt_chars: int = Field(2000, ge=1)
    log_level: str = Field("info")

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in _split(value):
            # a browser's Origin is scheme://host[:port]: anything else would never match
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com (or *)")
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_or_nothing(cls, value: str) -> str:
        keys = _split(value)
        # "," or " " would parse to no key at all, i.e. silently no authentication
        if value.strip() and not keys:
            raise ValueError("holds no key (only commas / spaces); leave it empty for no authentication")
        if not all(k.isascii() and k.isprintable() for k in keys):
            raise ValueError("keys must be printable ASCII (they travel in an HTTP header)")
        return value

    @model_validator(mode="after")
    def _high_priority_keys_are_api_keys(self) -> Settings:
        # checked at start: a typo here would quietly refuse "high" to the key it meant
        strangers = [k for k in _split(self.high_priority_keys) if k not in self.api_key_set]
        if strangers:
            raise ValueError(
                f"LESA_HIGH_PRIORITY_KEYS holds {len(strangers)} key(s) that are not in LESA_API_KEYS "
                "(without API keys no caller can be told apart: leave it empty)"
            )
        return self

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str) -> str:
        # checked here, not by torch when the first model loads (a RuntimeError listing 20 device types)
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", value.strip()):
            raise ValueError(f'{value!r} is not a device: expected "auto", "cpu", "cuda" or "cuda:N"')
        return value.strip()

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _webhook_secret_with_url(self) -> Settings:
        # Unsigned events would let anyone who can reach the receiver fake a completion.
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret else ""
        if self.webhook_url and not secret:
            raise ValueError("LESA_WEBHOOK_URL needs LESA_WEBHOOK_SECRET (events are always signed)")
        if secret.startswith("whsec_"):  # checked now: at the first event, every delivery would fail
            try:
                base64.b64decode(secret[len("whsec_") :], validate=True)
            except ValueError:
                raise ValueError("LESA_WEBHOOK_SECRET: after whsec_ must come base64 (Standard Webhooks)") from None
        return self

    @field_validator("default_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        from lesa_core.levels import LEVELS

        if value != "auto" and value not in LEVELS:
            raise ValueError(f"unknown level {value!r}; known: auto, {', '.join(LEVELS)}")
        return value

    @cached_property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(_split(self.api_keys))

    @cached_property
    def high_priority_key_set(self) -> frozenset[str]:
        return frozenset(_split(self.high_priority_keys))

    @cached_property
    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins)

    @cached_property
    def model_list(self) -> list[str]:
        return _split(self.models)


def _split(text: str) -> list[str]:
    """A comma-separated setting's non-empty items, trimmed."""
    return [item.strip() for item in text.split(",") if item.strip()]
