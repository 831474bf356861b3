"""The engine: loads the models and predictor bundles, turns requests into jobs, runs one batch.

Two halves:

* the *catalogue* (`ModelEntry`, `resolve_image`, `resolve_video`): what each model offers and the
  validation of a request against it, producing a fully-resolved `JobSpec` or an `ApiError`
  naming the offending field. The API uses only this half.
* the *runner* (`run_batch`): one pipeline call for a batch of compatible jobs, with a fresh
  `CacheConfig` per call (the cache hooks are reset per generation by the pipeline, so no state
  survives from one batch to the next), per-step progress and cancellation through the
  pipeline's callback, and encoding of the outputs. It is synchronous: workers call it in a
  thread so the event loop keeps serving HTTP.

Acceleration policy (documented for users in the README and in `/docs`):

* level "none" (or method "none") runs every step in full.
* Other levels use `lesa_core.level_schedule(level, steps)`. Method default: "lesa" when the
  model has a predictor bundle for that level *trained for this step count*, else "taylorseer".
* An explicit `method: "lesa"` where no matching bundle exists is a 400 naming `method`: a silent
  fallback would hand users a different quality than they asked for.
* "auto": the fastest level with a LESA bundle for this step count whose PSNR is >=
  `auto_min_psnr`; "none" if no bundle qualifies. The PSNR is the quality card's until the level
  has `auto_live_min_checks` shadow-checked samples, then their mean (the latest `QUALITY_WINDOW`):
  a level whose served quality drifts below the floor leaves "auto" until it recovers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lesa_core import given_images
from lesa_core.given_images import edit_strength
from lesa_core.pipeline_types import Reference, reference_steps
from service import media
from service.errors import ApiError, bad_request, not_found
from service.queue import JobSpec, OutputRef
from service.schemas import MAX_SEED, ImageGenerationRequest, VideoCreateRequest
from service.settings import Settings

if TYPE_CHECKING:
    from lesa_core.pipeline_types import GenerationOutput

log = logging.getLogger("lesa.engine")

ACCELERATED_METHODS = ("lesa", "taylorseer", "reuse")
DEFAULT_VIDEO_FPS = 8
PSNR_KEYS = ("psnr", "psnr_db", "psnr_vs_full", "psnr_mean")


@dataclass
class Bundle:
    """A trained LESA predictor for one level of one model."""

    level: str
    predictor: Any  # lesa_core.StagePredictor
    num_steps: int  # the schedule it was trained for
    quality: dict[str, Any]
    content_id: str | None = None  # which bundle files ran (`content_id`), echoed in every response

    @property
    def psnr(self) -> float | None:
        for key in PSNR_KEYS:
            value = self.quality.get(key)
            if isinstance(value, int | float):
                return float(value)
        return None


@dataclass
class ModelEntry:
    name: str
    kind: str  # "image" | "video"
    pipe: Any
    sizes: list[tuple[int, int]]
    num_frames: list[int]
    fps: int
    default_steps: int
    min_steps: int
    max_steps: int
    default_guidance: float
    levels: list[str]
    bundles: dict[str, Bundle] = field(default_factory=dict)
    description: str = ""
    created: int = 0  # models.toml's `created`: the same on every replica and after restarts
    revision: str | None = None  # which weights (`model_revision`), echoed in every response
    # the pipeline's `reference_mode`: the Pillow mode ("L", "RGB") of the given pixels it takes (an
    # edit's image, a video's first frame); None: it takes none
    reference_mode: str | None = None

    def bundle_for(self, level: str, steps: int) -> Bundle | None:
        bundle = self.bundles.get(level)
        return bundle if bundle is not None and bundle.num_steps == steps else None


@dataclass
class BatchOutput:
    """What one job of a batch produced."""

    outputs: list[OutputRef]
    artifacts: dict[str, bytes]
    lesa: dict[str, Any]
    samples: np.ndarray | None = None  # the job's samples before encoding (for a shadow quality check)
    # Seconds of each denoising step of the batch, by kind ("full" / "predicted"): shared by its jobs.
    step_seconds: dict[str, list[float]] = field(default_factory=dict)


class Engine:
    """Models + bundles + how to run them. Build with `Engine.load(settings)`."""

    def __init__(self, settings: Settings, models: dict[str, ModelEntry]) -> None:
        self.settings = settings
        self.models = models
        self.ready = False
        # (model, level) -> the latest shadow-check PSNRs, as the queue holds them (`set_live_quality`)
        self.live_psnr: dict[tuple[str, str], list[float]] = {}
        self.live_psnr_at = -float("inf")  # time.monotonic() of the last update
        # One generation at a time per engine: the cache hooks hold per-generation state on the
        # transformer, and on one device parallel generations only slow each other down.
        self._run_lock = threading.Lock()

    # ------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Load the models of `deploy/models.toml` (LESA_MODELS_CONFIG) through lesa_core.production:
        the reference digits models and, on GPU nodes, FLUX.1 / Qwen-Image / Wan2.1 / HunyuanVideo,
        each with the LESA bundles that load and fit it."""
        from lesa_core.allocator import retain_freed_memory
        from lesa_core.production import load_models, read_config

        if settings.retain_freed_memory:
            retain_freed_memory()
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        t0 = time.perf_counter()
        # read once: the weights root it resolves (as the API's catalogue resolves it) names the revision
        config = read_config(settings.models_config, settings.weights_dir)
        served = load_models(config, settings.model_list or None, device=settings.device, dtype=settings.dtype)
        models: dict[str, ModelEntry] = {}
        for name, model in served.items():
            entry = entry_from_pipeline(model.pipe, name=name, fps=model.config.fps,
                                        description=model.config.description)  # fmt: skip
            entry.revision = model_revision(model.config, config.weights_root)
            entry.created = model.config.created
            paths = model.config.bundle_paths()
            entry.bundles = {
                level: Bundle(
                    level,
                    predictor,
                    predictor.schedule.num_steps,
                    dict(predictor.config.quality or {}),
                    content_id(paths[level]) if level in paths else None,
                )  # fmt: skip
                for level, predictor in model.bundles.items()
            }
            models[name] = entry
            log.info("model %s: LESA bundles %s", name,
                     ", ".join(f"{b.level}@{b.num_steps}" for b in entry.bundles.values()) or "none")  # fmt: skip
        if not models:
            raise RuntimeError("no model could be loaded: check LESA_MODELS / LESA_WEIGHTS_DIR / deploy/models.toml")
        log.info("models loaded in %.1fs", time.perf_counter() - t0)
        return cls(settings, models)

    @classmethod
    def catalogue(cls, settings: Settings) -> Engine:
        """The API tier of a Redis deployment: what each model offers, without loading weights.

        Read from the model config, the reference checkpoints' `model_index.json` and each LESA
        bundle's `config.json` (schedule + quality card). The API validates requests and answers
        GET /v1/models from it; GPU workers (`lesa worker`) load the real models. Without this an
        API on a CPU node could not accept requests for a GPU-only model. (A bundle the workers'
        loader rejects fails its jobs with a message; `lesa worker` logs why at start-up.)
        """
        from lesa_core import CacheSchedule
        from lesa_core.production import FAMILIES, read_config
        from lesa_core.production.backend import DEFAULT_MAX_STEPS, DEFAULT_MIN_STEPS

        config = read_config(settings.models_config, settings.weights_dir)
        # Unnamed, only the models enabled everywhere: a GPU-only model offered by an API whose
        # workers cannot run it would queue jobs forever. Name the workers' models in LESA_MODELS.
        names = settings.model_list or [n for n, m in config.models.items() if m.enabled is True]
        unknown = [n for n in names if n not in config.models]
        if unknown:
            raise ValueError(f"{config.path}: unknown model(s) {unknown}; configured: {', '.join(config.models)}")
        models: dict[str, ModelEntry] = {}
        for name in names:
            model = config.models[name]
            if model.backend == "digits":
                index = _digits_index(model, config.weights_root)
                kind, sizes = index["kind"], [(int(w), int(h)) for w, h in index["sizes"]]
                frames = [int(f) for f in index.get("num_frames", [1])]
                default_steps, guidance = int(index.get("default_steps", 50)), float(index.get("default_guidance", 4.0))
                min_steps, max_steps, fps = DEFAULT_MIN_STEPS, DEFAULT_MAX_STEPS, model.fps
            else:
                family = FAMILIES[model.pipeline or ""]
                kind, sizes, frames = family.kind, list(model.sizes), list(model.num_frames)
                default_steps, min_steps, max_steps = model.default_steps, model.min_steps, model.max_steps
                guidance = float(
                    model.default_guidance if model.default_guidance is not None else family.default_guidance
                )
                fps = model.fps or family.default_fps
            entry = ModelEntry(
                name=name, kind=kind, pipe=None, sizes=sizes, num_frames=frames if kind == "video" else [1],
                fps=int(fps or DEFAULT_VIDEO_FPS), default_steps=default_steps, min_steps=min_steps,
                max_steps=max_steps, default_guidance=guidance, levels=list(_levels()),
                description=model.description, revision=model_revision(model, config.weights_root),
                created=model.created, reference_mode=reference_mode(model),
            )  # fmt: skip
            for level, path in model.bundle_paths().items():
                try:
                    data = json.loads((path / "config.json").read_text())
                    schedule = CacheSchedule.from_dict(data["schedule"])
                except (OSError, ValueError, KeyError, TypeError) as error:
                    log.warning("model %s: bundle %s unreadable, level %s not offered as LESA: %s",
                                name, path, level, error)  # fmt: skip
                    continue
                if level in entry.levels and level != "none":
                    quality = dict(data.get("quality") or {})
                    entry.bundles[level] = Bundle(level, None, schedule.num_steps, quality, content_id(path))
            models[name] = entry
        if not models:
            raise RuntimeError("no model in the catalogue: check LESA_MODELS / LESA_WEIGHTS_DIR / deploy/models.toml")
        engine = cls(settings, models)
        engine.ready = True  # nothing to warm up: this process never generates
        return engine

    def warmup(self) -> None:
        """One tiny generation per model (plain, then cached) so the first request isn't slow."""
        for entry in self.models.values():
            width, height = entry.sizes[0]
            steps = max(self.settings.warmup_steps, entry.min_steps)
            for level, method in (("none", "none"), ("2x", "taylorseer")):
                spec = JobSpec(
                    kind=entry.kind,  # type: ignore[arg-type]
                    model=entry.name,
                    prompt="warm-up",
                    width=width,
                    height=height,
                    num_frames=entry.num_frames[0] if entry.kind == "video" else None,
                    fps=entry.fps,
                    num_inference_steps=steps,
                    guidance_scale=entry.default_guidance,
                    level=level,
                    method=method,
                    seed=0,
                    output_format="mp4" if entry.kind == "video" else "png",
                )
                self.run_batch([spec])
        self.ready = True

    # ----------------------------------------------------------------------------- catalogue

    def _model(self, name: str | None, kind: str) -> ModelEntry:
        if name is None:
            for entry in self.models.values():
                if entry.kind == kind:
                    return entry
            raise bad_request(f"no {kind} model is served here; pass `model`", "model", "model_not_found")
        entry = self.models.get(name)
        if entry is None:
            raise not_found(
                f"model {name!r} not found; served models: {', '.join(self.models)}", "model", "model_not_found"
            )
        if entry.kind != kind:
            a = {"image": "an image", "video": "a video"}
            fitting = ", ".join(n for n, e in self.models.items() if e.kind == kind) or "none here"
            raise bad_request(
                f"model {name!r} is {a[entry.kind]} model, not {a[kind]} model; {kind} models: {fitting}",
                "model",
                "wrong_model_kind",
            )
        return entry

    @staticmethod
    def _size(entry: ModelEntry, size: str | None) -> tuple[int, int]:
        if size is None or size == "auto":
            return entry.sizes[0]
        width, height = (int(v) for v in size.split("x"))
        if (width, height) not in entry.sizes:
            supported = ", ".join(f"{w}x{h}" for w, h in entry.sizes)
            raise bad_request(f"size {size} is not supported by {entry.name}; supported: {supported}", "size",
                              "unsupported_size")  # fmt: skip
        return width, height

    def _acceleration(
        self, entry: ModelEntry, requested: str | None, method: str | None, steps: int
    ) -> tuple[str, str]:
        level = self.settings.default_level if requested is None else requested
        if level != "auto" and level not in entry.levels:
            raise bad_request(
                f"unknown acceleration level {level!r} for {entry.name}; available: {', '.join(entry.levels)}, auto",
                "acceleration",
                "unknown_level",
            )
        if method == "none":
            if requested not in (None, "none"):  # a level named and then switched off: say so, never guess
                raise bad_request(
                    f'method "none" runs every step, which contradicts acceleration {requested!r}: leave method '
                    'out (or name a forecasting method), or ask for acceleration "none"',
                    "method",
                    "method_conflicts_level",
                )
            return "none", "none"
        if level == "auto":
            candidates = [
                b
                for b in entry.bundles.values()
                if b.num_steps == steps and (psnr := self.judged_psnr(entry.name, b)[0]) is not None
                and psnr >= self.settings.auto_min_psnr
            ]  # fmt: skip
            if method not in (None, "lesa"):
                raise bad_request(
                    f'"auto" chooses among measured LESA levels; to use method {method!r}, name a level '
                    f"({', '.join(entry.levels)})",
                    "acceleration",
                    "auto_needs_lesa",
                )
            if not candidates:
                # "auto" promises measured quality; only LESA bundles carry a measurement.
                return "none", "none"
            best = max(candidates, key=lambda b: theoretical_speedup(b.level, steps))
            return best.level, "lesa"
        if level == "none":
            if method is not None:  # never a silent fallback to full compute
                raise bad_request(
                    f"method {method!r} forecasts skipped steps, and level 'none' skips none: name a level "
                    f"({', '.join(lv for lv in entry.levels if lv != 'none')}) or leave method out",
                    "method",
                    "method_needs_level",
                )
            return "none", "none"
        bundle = entry.bundle_for(level, steps)
        if method is None:
            return level, "lesa" if bundle is not None else "taylorseer"
        if method == "lesa" and bundle is None:
            trained = entry.bundles.get(level)
            why = (
                f"its predictor was trained for {trained.num_steps} steps, not {steps}"
                if trained
                else "no LESA predictor has been trained for it"
            )
            raise bad_request(
                f"method 'lesa' is not available for {entry.name} at level {level}: {why}; "
                "use method 'taylorseer' or 'reuse', or another level (see GET /v1/models)",
                "method",
                "method_unavailable",
            )
        return level, method

    def _common(
        self, entry: ModelEntry, body: ImageGenerationRequest | VideoCreateRequest
    ) -> tuple[int, float, str, str, int]:
        if len(body.prompt) > self.settings.max_prompt_chars:
            raise bad_request(f"prompt is longer than {self.settings.max_prompt_chars} characters", "prompt",
                              "prompt_too_long")  # fmt: skip
        # spaces, zero-width, controls; "" only where the schema allows it (variations: no text)
        if body.prompt and not any(unicodedata.category(c)[0] not in "ZC" for c in body.prompt):
            raise bad_request("prompt is empty (no visible characters)", "prompt", "empty_prompt")
        steps = body.num_inference_steps or entry.default_steps
        if not entry.min_steps <= steps <= entry.max_steps:
            raise bad_request(
                f"num_inference_steps must be in {entry.min_steps}..{entry.max_steps} for {entry.name}",
                "num_inference_steps",
                "out_of_range",
            )
        guidance = entry.default_guidance if body.guidance_scale is None else float(body.guidance_scale)
        level, method = self._acceleration(entry, body.acceleration, body.method, steps)
        if body.max_acceleration is not None:
            self._check_max_acceleration(entry, body.max_acceleration, body.method, steps, level)
        seed = body.seed if body.seed is not None else random.randint(0, MAX_SEED)
        return steps, guidance, level, method, seed

    def _check_max_acceleration(
        self, entry: ModelEntry, max_level: str, method: str | None, steps: int, level: str
    ) -> None:
        """Validated now, not when the server gets busy: a request that would fail only under load
        would fail at the worst moment."""
        if max_level == "auto":
            raise bad_request(f"max_acceleration names a level ({', '.join(entry.levels)}), not 'auto'",
                              "max_acceleration", "unknown_level")  # fmt: skip
        try:
            fast, _ = self._acceleration(entry, max_level, method, steps)
        except ApiError as error:
            raise bad_request(f"max_acceleration {max_level!r}: {error.message}", "max_acceleration",
                              error.code or "invalid_value") from None  # fmt: skip
        if theoretical_speedup(fast, steps) < theoretical_speedup(level, steps):
            raise bad_request(
                f"max_acceleration {max_level!r} is slower than the level the request resolves to ({level!r}): "
                "name a faster level, or leave it out",
                "max_acceleration",
                "max_below_level",
            )

    def _quality_level(self, entry: ModelEntry, body: ImageGenerationRequest, steps: int) -> str | None:
        """OpenAI's image `quality` as the level to run when the request names none (None: the
        server's default): the way an unmodified client picks speed or fidelity."""
        if body.quality in ("high", "hd"):
            if body.method not in (None, "none"):
                raise bad_request(
                    f"quality {body.quality!r} computes every step, which leaves method {body.method!r} nothing to "
                    "forecast: leave method out, or ask for another quality or an acceleration level",
                    "quality",
                    "method_conflicts_quality",
                )
            return "none"
        if body.quality == "low":
            # fastest at this step count; among levels that tie there (few steps), the nominally fastest
            return max(entry.levels, key=lambda level: (theoretical_speedup(level, steps), entry.levels.index(level)))
        return None

    def _queue_timeout(self, body: ImageGenerationRequest | VideoCreateRequest) -> float | None:
        return body.queue_timeout_s or self.settings.queue_timeout_s

    def resolve_image(self, body: ImageGenerationRequest) -> JobSpec:
        entry = self._model(body.model, "image")
        width, height = self._size(entry, body.size)
        if body.stream and body.n != 1:  # OpenAI's stream events carry no image index
            raise bad_request(f"stream=true returns one image; got n={body.n}", "n", "unsupported_value")
        if body.n > self.settings.max_batch:  # one job is one pipeline call: it would pass the operator's cap
            raise bad_request(f"n is {body.n} but this server generates at most {self.settings.max_batch} images per "
                              "batch (LESA_MAX_BATCH): send several requests", "n", "out_of_range")  # fmt: skip
        if body.acceleration is None and body.quality is not None:
            level = self._quality_level(entry, body, body.num_inference_steps or entry.default_steps)
            body = body.model_copy(update={"acceleration": level})
        steps, guidance, level, method, seed = self._common(entry, body)
        return JobSpec(
            kind="image", model=entry.name, prompt=body.prompt, n=body.n, width=width, height=height,
            num_inference_steps=steps, guidance_scale=guidance, level=level, method=method, seed=seed,
            output_format=body.output_format, output_compression=body.output_compression, user=body.user,
            partial_images=body.partial_images or 0, queue_timeout_s=self._queue_timeout(body),
            priority=body.priority or "normal",
            requested_acceleration=body.acceleration or self.settings.default_level, quality=body.quality,
        )  # fmt: skip

    def given_pixels(
        self,
        spec: JobSpec,
        image: bytes,
        mask: bytes | None = None,
        strength: float | None = None,
        *,
        variation: bool = False,
    ) -> JobSpec:
        """`spec` with an uploaded image the sampler keeps: a video's first frame (`input_reference`),
        or an image to edit, kept where the mask is opaque (OpenAI's mask: fully transparent pixels
        are edited; no mask: the whole image is) and everywhere followed for the first
        (1 - strength) of the steps (SDEdit; `edit_strength` gives the defaults, a `variation`'s
        without a prompt or not). Decoding and resizing a photo can take a second: callers on the
        event loop run this in a thread."""
        entry = self.models[spec.model]
        param = "image" if spec.kind == "image" else "input_reference"
        self._check_reference(entry, param)
        picture = self._upload(given_images.read_upload, image, param)
        sample = given_images.reference_sample(picture, spec.width, spec.height, entry.reference_mode)
        if spec.kind == "video":  # frame 0, kept at every step
            return spec.model_copy(update={"reference_image": media.sample_png(sample)})
        keep = None
        if mask is not None:
            opaque = self._upload(given_images.read_upload, mask, "mask")
            keep = self._upload(given_images.keep_mask, opaque, picture.size, spec.width, spec.height, param="mask")
        prompted = bool(spec.prompt) and not variation
        follow = reference_steps(
            edit_strength(strength, masked=mask is not None, prompted=prompted), spec.num_inference_steps
        )
        return spec.model_copy(
            update={
                "reference_image": media.sample_png(sample),
                "reference_keep": None if keep is None else media.sample_png(keep.astype(np.float32)),
                "reference_follow_until": follow,
            }
        )

    def _check_reference(self, entry: ModelEntry, param: str) -> None:
        if entry.reference_mode is None:
            raise bad_request(f"{entry.name} does not take a given image ({param}) yet", param, "unsupported")

    @staticmethod
    def _upload(read: Callable[..., Any], *args: Any, param: str | None = None) -> Any:
        """`read(*args)`, its ValueError (a message that names the field) as a 400 naming `param`
        (by default the upload's field, the last argument)."""
        try:
            return read(*args)
        except ValueError as error:
            raise bad_request(str(error), param or args[-1], "invalid_image") from None

    def resolve_video(self, body: VideoCreateRequest) -> JobSpec:
        """A video job (an `input_reference` image is added by `given_pixels`: frame 0 at every
        step, the model generating the rest to follow it)."""
        entry = self._model(body.model, "video")
        width, height = self._size(entry, body.size)
        if body.num_frames is not None:
            frames, param = body.num_frames, "num_frames"
            if body.seconds is not None and round(body.seconds * entry.fps) != frames:
                raise bad_request(
                    f"seconds {body.seconds:g} gives {round(body.seconds * entry.fps)} frames at {entry.fps} fps but "
                    f"num_frames is {frames}: give one of them",
                    "seconds",
                    "conflicting_length",
                )
        elif body.seconds is not None:
            frames, param = round(body.seconds * entry.fps), "seconds"
        else:
            frames, param = entry.num_frames[0], "num_frames"
        if frames not in entry.num_frames:
            allowed = ", ".join(f"{f} ({f / entry.fps:g} s)" for f in entry.num_frames)
            raise bad_request(
                f"{entry.name} generates {allowed} frames at {entry.fps} fps; {param} gives {frames} frames",
                param,
                "unsupported_length",
            )
        steps, guidance, level, method, seed = self._common(entry, body)
        spec = JobSpec(
            kind="video", model=entry.name, prompt=body.prompt, n=1, width=width, height=height,
            num_frames=frames, fps=entry.fps, num_inference_steps=steps, guidance_scale=guidance, level=level,
            method=method, seed=seed, output_format="mp4", user=body.user,
            queue_timeout_s=self._queue_timeout(body), priority=body.priority or "normal",
            requested_acceleration=body.acceleration or self.settings.default_level,
        )  # fmt: skip
        return spec

    # -------------------------------------------------------------------------------- runner

    def cache_config(self, spec: JobSpec) -> Any:
        """A fresh CacheConfig for one generation (None = plain, every step full)."""
        if spec.method == "none" or spec.level == "none":
            return None
        import lesa_core

        entry = self.models[spec.model]
        schedule = lesa_core.level_schedule(spec.level, spec.num_inference_steps)
        if spec.method == "lesa":
            bundle = entry.bundle_for(spec.level, spec.num_inference_steps)
            if bundle is None:  # resolved specs never get here; a worker with other bundles could
                raise RuntimeError(f"no LESA bundle for {spec.model} {spec.level} @ {spec.num_inference_steps} steps")
            return lesa_core.CacheConfig(method="lesa", schedule=bundle.predictor.schedule, predictor=bundle.predictor)
        return lesa_core.CacheConfig(method=spec.method, schedule=schedule)

    def run_batch(
        self,
        specs: Sequence[JobSpec],
        on_step: Callable[[int, int], bool | None] | None = None,
        on_partial: Callable[[int, int, bytes], None] | None = None,
    ) -> list[BatchOutput]:
        """Run compatible jobs as one pipeline call; returns one `BatchOutput` per job, in order.

        `on_step(done, total)` is called after every denoising step; returning False stops the
        generation (the pipeline raises `lesa_models.GenerationCancelled`, which propagates).
        `on_partial(job index, partial index, encoded image)` delivers the partial images that jobs
        ask for (`JobSpec.partial_images`), where the pipeline can preview (`supports_preview`).
        """
        first = specs[0]
        key = first.batch_key()
        if any(s.batch_key() != key for s in specs):
            raise ValueError("run_batch needs compatible jobs (equal JobSpec.batch_key())")
        cache = self.cache_config(first)
        previews = self._previews(specs, on_partial) if on_partial is not None else {}
        schedule = cache.schedule if cache is not None else None

        # Step timing, to estimate what the batch would have cost with every step full: the
        # realised speed-up is measured on this very batch, not against a stale benchmark.
        step_times: list[float] = []
        last = [time.perf_counter()]

        def callback(done: int, total: int) -> bool | None:
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            return on_step(done, total) if on_step is not None else None

        with self._run_lock:
            started_at = time.time()
            t0 = time.perf_counter()
            last[0] = t0
            output = self._call(specs, cache, callback, **previews)
            pipeline_s = time.perf_counter() - t0
            results = self._encode(specs, output.samples)
            generation_s = time.perf_counter() - t0
        # Where the time went, in order (a pipeline that does not split its call is one stage).
        stages = dict(output.stats.get("stage_seconds") or {"pipeline": pipeline_s})
        stages["encode_output"] = generation_s - pipeline_s
        stage_ms = {stage: round(seconds * 1000.0, 2) for stage, seconds in stages.items()}

        steps = first.num_inference_steps
        full = schedule.num_full if schedule is not None else steps
        realised = _realised_speedup(step_times, schedule, pipeline_s)
        cache_counts = output.stats.get("cache")
        by_kind: dict[str, list[float]] = {"full": [], "predicted": []}
        for i, seconds in enumerate(step_times):  # (a chunked batch counts each chunk's steps in turn)
            if i % steps == 0:  # a generation's first step also carries its text encoding and setup
                continue
            full_step = schedule is None or schedule.is_full(i % steps)
            by_kind["full" if full_step else "predicted"].append(seconds)
        entry = self.models[first.model]
        bundle = entry.bundle_for(first.level, steps) if first.method == "lesa" else None
        for result, spec in zip(results, specs, strict=True):
            result.step_seconds = by_kind
            result.lesa.update(
                model_revision=entry.revision, predictor=bundle.content_id if bundle is not None else None,
                model=spec.model, level=spec.level, method=spec.method, num_inference_steps=steps,
                guidance_scale=spec.guidance_scale, full_steps=full, predicted_steps=steps - full,
                theoretical_speedup=round(steps / full, 3), realised_speedup=realised,
                seed=spec.seed, seeds=[spec.seed + i for i in range(spec.n)], batch_size=len(output.samples),
                generation_ms=round(generation_s * 1000.0, 2), stage_ms=stage_ms, generation_started_at=started_at, cache_stats=cache_counts,
            )  # fmt: skip
        return results

    def judged_psnr(self, model: str, bundle: Bundle) -> tuple[float | None, str]:
        """The PSNR "auto" judges a LESA level by, and whence: the mean of its shadow checks once it
        has `auto_live_min_checks` of them ("live"), else its quality card's ("card")."""
        live = self.live_psnr.get((model, bundle.level), [])
        needed = self.settings.auto_live_min_checks
        if needed and len(live) >= needed:
            return sum(live) / len(live), "live"
        return bundle.psnr, "card"

    def set_live_quality(self, live: dict[tuple[str, str], list[float]], at: float) -> None:
        """New shadow-check figures (from the queue); logs each level that leaves or rejoins "auto"."""
        floor = self.settings.auto_min_psnr

        def eligible() -> dict[tuple[str, str], bool]:
            return {
                (name, b.level): (psnr := self.judged_psnr(name, b)[0]) is not None and psnr >= floor
                for name, entry in self.models.items()
                for b in entry.bundles.values()
            }

        before = eligible()
        self.live_psnr, self.live_psnr_at = live, at
        for (model, level), now in eligible().items():
            if now != before[(model, level)]:
                psnr, source = self.judged_psnr(model, self.models[model].bundles[level])
                log.warning("%s %s %s \"auto\": %s PSNR %.2f dB vs floor %.2f dB", model, level,
                            "rejoins" if now else "leaves", source, psnr or float("nan"), floor)  # fmt: skip

    def acceleration_levels(self, entry: ModelEntry) -> list[dict[str, Any]]:
        """The acceleration part of GET /v1/models for one model, with what "auto" judges each by."""
        import lesa_core

        levels = []
        for name in entry.levels:
            schedule = lesa_core.level_schedule(name, entry.default_steps)
            bundle = entry.bundles.get(name)
            methods = ["none"] if name == "none" else (["lesa"] if bundle else []) + ["taylorseer", "reuse"]
            live = self.live_psnr.get((entry.name, name), [])
            levels.append(
                dict(
                    level=name, methods=methods, full_steps=schedule.num_full,
                    theoretical_speedup=round(schedule.speedup, 3), lesa_available=bundle is not None,
                    lesa_steps=bundle.num_steps if bundle else None, predictor=bundle.content_id if bundle else None,
                    quality=json.loads(json.dumps(bundle.quality)) if bundle else None,
                    live_psnr=round(sum(live) / len(live), 3) if live else None, live_checks=len(live),
                    auto_judged_by=self.judged_psnr(entry.name, bundle)[1] if bundle else None,
                )
            )  # fmt: skip
        return levels

    def quality_cards(self) -> list[tuple[str, str, str, float]]:
        """(model, level, method, mean PSNR vs full compute) from each bundle's quality card: LESA's,
        and the training-free methods' measured beside it (the service's taylorseer is order 1)."""
        cards = []
        for name, entry in self.models.items():
            for level, bundle in entry.bundles.items():
                if bundle.psnr is not None:
                    cards.append((name, level, "lesa", bundle.psnr))
                baselines = bundle.quality.get("baselines_same_level")
                for method, key in (("taylorseer", "taylorseer1"), ("reuse", "reuse")):
                    psnr = baselines.get(key, {}).get("psnr") if isinstance(baselines, dict) else None
                    if isinstance(psnr, int | float):
                        cards.append((name, level, method, float(psnr)))
        return cards

    def shadow_eligible(self, spec: JobSpec) -> bool:
        """Whether a job may be shadow-checked: accelerated, and, where its level has a quality card,
        at the card's step count and guidance (quality moves with both), so live and card compare.
        Levels without a card are checked at any settings: there is nothing to compare with, but the
        live figure still shows how far from full compute the served samples are."""
        if spec.level == "none" or spec.method == "none":
            return False
        bundle = self.models[spec.model].bundles.get(spec.level)
        if bundle is None:
            return True
        guidance = bundle.quality.get("guidance")
        same_guidance = not isinstance(guidance, int | float) or abs(float(guidance) - spec.guidance_scale) < 1e-6
        return bundle.num_steps == spec.num_inference_steps and same_guidance

    def shadow_psnr(
        self, spec: JobSpec, samples: np.ndarray, on_step: Callable[[int, int], bool | None] | None = None
    ) -> list[float]:
        """PSNR in dB of an accelerated job's samples against the same job with every step full.

        The online quality check (`LESA_SHADOW_FRACTION`): same prompt, seeds, size, steps and
        guidance, so acceleration is the only difference. Each sample depends only on its own seed
        (the pipeline contract), so the reference need not share the original batch. `on_step`
        returning False abandons it (the pipeline raises GenerationCancelled).
        """
        from lesa_core.benchmark import psnr_per_sample

        full = spec.model_copy(update={"level": "none", "method": "none"})
        with self._run_lock:
            reference = self._call([full], cache=None, callback=on_step).samples
        return [round(float(v), 3) for v in psnr_per_sample(samples, reference)]

    def _previews(self, specs: Sequence[JobSpec], on_partial: Callable[[int, int, bytes], None]) -> dict[str, Any]:
        """The pipeline's `preview` / `preview_steps` arguments for the jobs' partial images (or none)."""
        if not getattr(self.models[specs[0].model].pipe, "supports_preview", False):
            return {}  # allowed by OpenAI's contract: fewer partial images than asked for
        wanted: dict[int, list[tuple[int, int, int]]] = {}  # step -> (job, partial index, first sample)
        offset = 0
        for j, spec in enumerate(specs):
            for k, step in enumerate(partial_steps(spec.partial_images, spec.num_inference_steps)):
                wanted.setdefault(step, []).append((j, k, offset))
            offset += spec.n
        if not wanted:
            return {}

        def preview(step: int, samples: np.ndarray, first: int = 0) -> None:
            # samples of batch items first, first + 1, ... (a production backend previews per chunk)
            for j, k, item in wanted.get(step, []):
                if first <= item < first + len(samples):
                    spec = specs[j]
                    on_partial(
                        j, k, media.encode_image(samples[item - first], spec.output_format, spec.output_compression)
                    )

        return {"preview": preview, "preview_steps": frozenset(wanted)}

    def _call(
        self,
        specs: Sequence[JobSpec],
        cache: Any,
        callback: Callable[[int, int], bool | None] | None = None,
        **previews: Any,
    ) -> GenerationOutput:
        """One pipeline call for compatible jobs: sample j of job i uses seed + j. The given pixels
        go only to a call that has some (pipelines that take none need not know the keyword)."""
        first = specs[0]
        given = {"reference": _reference(specs)} if any(s.reference_image is not None for s in specs) else {}
        return self.models[first.model].pipe(
            [s.prompt for s in specs for _ in range(s.n)],
            seeds=[s.seed + i for s in specs for i in range(s.n)],
            height=first.height,
            width=first.width,
            num_frames=first.num_frames,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            cache=cache,
            callback=callback,
            **previews,
            **given,
        )

    def _encode(self, specs: Sequence[JobSpec], samples: np.ndarray) -> list[BatchOutput]:
        results: list[BatchOutput] = []
        offset = 0
        for spec in specs:
            outputs: list[OutputRef] = []
            artifacts: dict[str, bytes] = {}
            for i in range(spec.n):
                sample = samples[offset + i]
                if spec.kind == "image":
                    name = f"{i}.{media.extension(spec.output_format)}"
                    artifacts[name] = media.encode_image(sample, spec.output_format, spec.output_compression)
                    outputs.append(OutputRef(name=name, content_type=media.content_type(spec.output_format), index=i))
                else:
                    artifacts["video.mp4"] = media.encode_video(sample, spec.fps or DEFAULT_VIDEO_FPS)
                    outputs.append(OutputRef(name="video.mp4", content_type="video/mp4", index=i))
                    artifacts["thumbnail.png"] = media.encode_thumbnail(sample)
                    artifacts["spritesheet.png"] = media.encode_spritesheet(sample)
                    outputs += [
                        OutputRef(name=f"{variant}.png", content_type="image/png", index=i, variant=variant)
                        for variant in ("thumbnail", "spritesheet")
                    ]
            results.append(
                BatchOutput(outputs=outputs, artifacts=artifacts, lesa={}, samples=samples[offset : offset + spec.n])
            )
            offset += spec.n
        return results


# ---------------------------------------------------------------------------------- helpers


def _reference(specs: Sequence[JobSpec]) -> Reference:
    """The given pixels of a batch's samples (`JobSpec.reference_*`), zeros and nothing kept for
    jobs without any: such a sample is generated as it would be alone."""
    images = {id(s): media.png_sample(s.reference_image) for s in specs if s.reference_image is not None}
    pixel = next(iter(images.values())).shape  # (H, W), or (H, W, 3) for an RGB model
    first = specs[0]
    shape = pixel if first.kind == "image" else (first.num_frames or 1, *pixel)
    samples, keeps, until = [], [], []
    for spec in specs:
        sample, keep = np.zeros(shape, np.float32), np.zeros(shape, bool)
        image = images.get(id(spec))
        if image is not None:
            sample[:] = image  # a video's other frames too, though only its first frame is kept
            if spec.kind == "video":
                keep[0] = True
            elif spec.reference_keep is not None:
                mask = media.png_sample(spec.reference_keep) >= 0.5
                keep[:] = mask if mask.ndim == len(pixel) else mask[..., None]
        for _ in range(spec.n):
            samples.append(sample)
            keeps.append(keep)
            until.append(spec.reference_follow_until if image is not None else 0)
    return Reference(samples=np.stack(samples), keep=np.stack(keeps), follow_until=until)


def reference_mode(model: Any) -> str | None:
    """The `reference_mode` a configured model's pipeline will have, read without loading it (the
    API catalogue): the digits models take grey pixels; production image families whose latents the
    backend can encode, RGB."""
    if model.backend == "digits":
        return "L"
    from lesa_core.production import FAMILIES
    from lesa_core.production.backend import IMAGE_LATENT_FAMILIES

    return "RGB" if FAMILIES[model.pipeline or ""].pipeline_class in IMAGE_LATENT_FAMILIES else None


def partial_steps(count: int, steps: int) -> list[int]:
    """After which steps a job's `count` partial images are taken: evenly spaced, never the first
    (a diffusers pipeline shows its callbacks no latents from before step 1, so the flow's estimate
    needs two steps) nor the last; fewer on short runs. Partial index k is the k-th of these."""
    wanted = {min(steps - 1, max(2, round(steps * (k + 1) / (count + 1)))) for k in range(count)}
    return sorted(step for step in wanted if 2 <= step <= steps - 1)


def theoretical_speedup(level: str, steps: int) -> float:
    import lesa_core

    return lesa_core.level_schedule(level, steps).speedup


def _realised_speedup(step_times: list[float], schedule: Any, pipeline_s: float) -> float:
    """Estimated all-full generation time / actual time, from this batch's own step timings.

    Predicted steps are re-costed at the mean time of the batch's full steps. Step 1 (index 0)
    also carries the text encoding, so it is left out of the mean when other full steps exist.
    """
    if schedule is None or not step_times:
        return 1.0
    full = [t for i, t in enumerate(step_times) if schedule.is_full(i) and i > 0]
    if not full:
        full = [step_times[0]]
    predicted = [t for i, t in enumerate(step_times) if not schedule.is_full(i)]
    mean_full = sum(full) / len(full)
    estimate = pipeline_s + sum(mean_full - t for t in predicted)
    return round(estimate / pipeline_s, 3) if pipeline_s > 0 else 1.0


def _levels() -> list[str]:
    import lesa_core

    return list(lesa_core.LEVELS)


def content_id(root: Path, skip: str | None = None) -> str:
    """12 hex digits of sha256 over every file under `root`, names and bytes (`skip`: a top-level
    folder left out): which weights or bundle made an output, for an audit or a rerun."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if skip is not None and relative.parts[0] == skip:
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        with path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def model_revision(model: Any, weights_root: Any) -> str | None:
    """The revision a model's outputs name: models.toml's `revision` (a hub commit) where it pins
    one; for a reference model, the content of its pipeline directory (without its predictors);
    otherwise None (unpinned hub weights: hashing tens of GB at every start is not worth it)."""
    if model.revision:
        return str(model.revision)
    if model.backend != "digits":
        return None
    from lesa_core.production.config import digits_source
    from lesa_models.registry import model_path

    source = digits_source(model, Path(weights_root) if weights_root is not None else None)
    return content_id(model_path(source) if isinstance(source, str) else Path(source), skip="predictors")


def _digits_index(model: Any, weights_root: Any) -> dict[str, Any]:
    """`lesa_digits` of a reference checkpoint's model_index.json, found as the loader finds it (a
    source that names none is a ConfigError, as it is for the workers)."""
    from lesa_core.production.config import digits_source
    from lesa_models.registry import model_path

    source = digits_source(model, Path(weights_root) if weights_root is not None else None)
    root = model_path(source) if isinstance(source, str) else source
    return json.loads((root / "model_index.json").read_text())["lesa_digits"]


def entry_from_pipeline(
    pipe: Any, *, name: str | None = None, fps: int | None = None, description: str = ""
) -> ModelEntry:
    """Catalogue entry from a pipeline's `info` (the lesa_models / production call contract)."""
    import lesa_core

    info = pipe.info
    fps = fps or getattr(info, "fps", None) or DEFAULT_VIDEO_FPS
    return ModelEntry(
        name=name or info.name,
        kind=info.kind,
        pipe=pipe,
        sizes=[(int(w), int(h)) for w, h in info.sizes],
        num_frames=list(info.num_frames) if info.kind == "video" else [1],
        fps=int(fps),
        default_steps=info.default_steps,
        min_steps=info.min_steps,
        max_steps=info.max_steps,
        default_guidance=float(info.default_guidance),
        levels=list(lesa_core.LEVELS),
        description=description,
        reference_mode=getattr(pipe, "reference_mode", None),
    )
