"""`DiffusersBackend`: a stock diffusers pipeline (FLUX.1, Qwen-Image, Wan2.1, HunyuanVideo) behind
the same call contract as the reference `lesa_models.DigitsPipeline`, so the service serves either.

Per call it:

* draws each sample's noise from its own CPU `torch.Generator(seed)`: a sample never depends on
  its batch-mates, its chunk, or the device (the pipelines' `prepare_latents` take a list);
* attaches the LESA / baseline hooks to `pipe.transformer` for that call only (`enable_cache`,
  `disable_cache` in a `finally`), and starts the hooks' generation from inside the pipeline's
  own `scheduler.set_timesteps`, so the predictor sees exactly the sigmas the sampler uses
  (FLUX / Qwen-Image shift them by resolution, HunyuanVideo by `flow_shift`);
* relies on the pipelines' own `transformer.cache_context("cond" / "uncond")` around each
  transformer call for per-CFG-branch histories (all four pipelines do this in diffusers 0.42);
* reports progress and honours cancellation through `callback_on_step_end`;
* caps batch x pixels x frames per pipeline call and splits a batch on out-of-memory.

Output: `GenerationOutput.samples` is float32 in [0, 1], channels last: [B, H, W, 3] for images,
[B, F, H, W, 3] for videos. (The reference models are grey-scale and return [B, H, W] /
[B, F, H, W]: consumers tell the two apart by `samples.ndim` and the last axis.)
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import lesa_core
from lesa_core.pipeline_types import GenerationCancelled, GenerationOutput, PipelineInfo, Reference
from lesa_core.production.batching import plan_chunks, run_with_oom_split, sample_cost

logger = logging.getLogger(__name__)

DEFAULT_MIN_STEPS = 4
DEFAULT_MAX_STEPS = 100


@dataclass(frozen=True)
class PipelineFamily:
    """How one diffusers pipeline class is driven: what our `guidance_scale` means to it, etc."""

    pipeline_class: str
    kind: str  # "image" | "video"
    output_attr: str  # attribute of the pipeline's output holding the samples
    guidance_arg: str  # the pipeline keyword our `guidance_scale` is passed as
    # True CFG in Qwen-Image is only on with a negative prompt (its docs use " "); Wan always runs
    # CFG above 1 and takes "" by default. None = the pipeline's own default.
    negative_prompt: str | None
    default_guidance: float
    default_fps: int
    num_frames_multiple: int  # video frame counts must be k * multiple + 1 (VAE temporal stride)
    latent_channel_divisor: int  # FLUX / Qwen-Image pack 2x2 patches: latent channels = in_channels / 4
    latents_fp32: bool  # Wan / HunyuanVideo keep the latents in float32 whatever the weights' dtype
    # How the pipeline sets its sigmas: "shifted" (FLUX / Qwen-Image: linspace(1, 1/N, N) with a
    # resolution-dependent mu), "linear" (HunyuanVideo: linspace(1, 0, N + 1)[:-1]), "scheduler"
    # (Wan: the scheduler's own set_timesteps(N)).
    sigma_rule: str


FAMILIES: dict[str, PipelineFamily] = {
    family.pipeline_class: family
    for family in (
        # FLUX.1-dev is guidance-distilled: `guidance_scale` feeds its guidance embedding (one
        # transformer call per step, branch "cond").
        PipelineFamily("FluxPipeline", "image", "images", "guidance_scale", None, 3.5, 0, 1, 4, False, "shifted"),
        # Qwen-Image runs true CFG as two separate calls ("cond", "uncond").
        PipelineFamily("QwenImagePipeline", "image", "images", "true_cfg_scale", " ", 4.0, 0, 1, 4, False, "shifted"),
        # Wan2.1 runs CFG as two separate calls when guidance_scale > 1.
        PipelineFamily("WanPipeline", "video", "frames", "guidance_scale", None, 5.0, 16, 4, 1, True, "scheduler"),
        # HunyuanVideo is guidance-distilled like FLUX (embedded guidance, one call per step).
        PipelineFamily(
            "HunyuanVideoPipeline", "video", "frames", "guidance_scale", None, 6.0, 24, 4, 1, True, "linear"
        ),
    )
}


@dataclass(frozen=True)
class DiffusersPipelineInfo(PipelineInfo):
    """`PipelineInfo` plus what a production model adds: its frame rate and pipeline class."""

    fps: int = 0
    pipeline_class: str = ""


@dataclass
class BackendOptions:
    """Serving settings of one model (the `[models.NAME]` table of the model config file)."""

    name: str
    sizes: list[tuple[int, int]]  # (width, height)
    num_frames: list[int] = field(default_factory=lambda: [1])
    fps: int | None = None
    default_steps: int = 50
    default_guidance: float | None = None
    min_steps: int = DEFAULT_MIN_STEPS
    max_steps: int = DEFAULT_MAX_STEPS
    max_batch_pixels: int | None = None  # cap on batch x height x width x frames per pipeline call
    negative_prompt: str | None = None  # overrides the family's default
    guidance_arg: str | None = None  # overrides the family's default
    call_kwargs: dict[str, Any] = field(default_factory=dict)  # extra pipeline keywords, e.g. max_sequence_length


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on accelerators (the production models are trained and served in it), fp32 on CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


# image pipelines whose latents `decode_latents` and `encode_images` know: they preview, and take given pixels
IMAGE_LATENT_FAMILIES = ("FluxPipeline", "QwenImagePipeline")


def decode_latents(pipe: Any, family: PipelineFamily, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Packed image latents -> [B, H, W, 3] in [0, 1], as the pipeline's own closing decode does it
    (FLUX: scaling and shift factors; Qwen-Image: per-channel mean / std, a one-frame video VAE)."""
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    vae = pipe.vae
    if family.pipeline_class == "QwenImagePipeline":
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]
    else:
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return np.asarray(pipe.image_processor.postprocess(image, output_type="np"), dtype=np.float32)


def encode_images(pipe: Any, family: PipelineFamily, images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] in [0, 1] -> packed image latents, as the family's img2img pipeline encodes an
    image (`decode_latents` inverted; the latent distribution's mode, so no generator)."""
    vae = pipe.vae
    pixels = (images.permute(0, 3, 1, 2) * 2.0 - 1.0).to(vae.device, vae.dtype)
    if family.pipeline_class == "QwenImagePipeline":
        latents = vae.encode(pixels[:, :, None]).latent_dist.mode()  # a one-frame video: [B, z, 1, h, w]
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = (latents - mean) / std
    else:
        latents = vae.encode(pixels).latent_dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    batch, channels, height, width = latents.shape[0], latents.shape[1], latents.shape[-2], latents.shape[-1]
    return pipe._pack_latents(latents, batch, channels, height, width)


def keep_latents(pipe: Any, keep: torch.Tensor, channels: int) -> torch.Tensor:
    """[B, H, W] bool (kept pixels) -> the packed latents' layout: a latent is kept where all the
    pixels it encodes are (the edited part's edge is redrawn rather than kept half-way)."""
    factor = pipe.vae_scale_factor
    pooled = -F.max_pool2d(-keep[:, None].float(), factor)  # min over each latent's pixels
    batch, _, height, width = pooled.shape
    mask = pooled.expand(batch, channels, height, width).contiguous()
    return pipe._pack_latents(mask, batch, channels, height, width) > 0.5


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def require_device(device: str) -> None:
    """A ValueError naming `device` when this machine cannot place weights on it (torch would
    fail later with an AssertionError, "Torch not compiled with CUDA enabled", or deep in a load)."""
    place = torch.device(device)
    if place.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                         'use "cpu" or "auto"')  # fmt: skip
    if place.index is not None and place.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def unknown_call_arguments(pipeline_class: str, names: Collection[str]) -> list[str]:
    """The `names` the pipeline's `__call__` does not take (a typo in `call_kwargs` or
    `guidance_arg` would otherwise fail every request with a TypeError)."""
    import diffusers

    parameters = inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    return [name for name in names if name not in parameters]


def normalised_times(scheduler: Any) -> torch.Tensor:
    """The schedule's times, 1 = noise ... 0 = clean, num_steps + 1 values, as lesa_core wants.

    Flow-matching schedulers (FlowMatchEuler, UniPC / DPM with flow sigmas) keep sigmas in [0, 1]
    with the final 0 appended: those are the times. Otherwise timesteps / num_train_timesteps.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu().reshape(-1)
        if sigmas.numel() and float(sigmas.max()) <= 1.0 + 1e-6 and float(sigmas.min()) >= 0.0:
            return sigmas
    timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float32).detach().cpu().reshape(-1)
    train_steps = float(getattr(scheduler.config, "num_train_timesteps", 1000))
    return torch.cat([timesteps / train_steps, timesteps.new_zeros(1)])


class DiffusersBackend:
    """Serve a diffusers pipeline with the `DigitsPipeline` call contract (see `__call__`)."""

    def __init__(self, pipe: Any, options: BackendOptions) -> None:
        class_name = type(pipe).__name__
        if class_name not in FAMILIES:
            raise ValueError(f"{class_name} is not a supported pipeline; supported: {', '.join(FAMILIES)}")
        self.pipe = pipe
        self.family = FAMILIES[class_name]
        self.options = options
        self.transformer = pipe.transformer
        self.scheduler = pipe.scheduler
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # progress goes through `callback`
        # The cache hooks keep per-generation state on the transformer: one generation at a time.
        self._lock = threading.Lock()
        # Largest chunk (in batch x pixels x frames) that ran out of memory: later calls stay below it.
        self._oom_ceiling: int | None = None
        # (height, width, frames) of the latest call: `timesteps(steps)` without a size means that one.
        self._last_size: tuple[int, int, int | None] | None = None

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        pipeline_class: str,
        options: BackendOptions,
        *,
        device: str | None = "auto",
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        cpu_offload: bool = False,
        vae_tiling: bool = False,
        vae_dtype: torch.dtype | str | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ) -> DiffusersBackend:
        """Load `source` (a Hugging Face id, found in the local HF cache, or a local directory).

        dtype: default bf16 on CUDA, fp32 on CPU. `cpu_offload` keeps only the active component on
        the GPU (HunyuanVideo on < 80 GB); `vae_tiling` decodes in tiles (long / large videos);
        `vae_dtype` float32 for Wan, whose VAE is meant to decode in fp32 (its pipeline casts the
        latents to the VAE's dtype). `scheduler_config` overrides scheduler settings (Wan2.1:
        flow_shift 3.0 for 480p, 5.0 for 720p).
        """
        import diffusers

        if pipeline_class not in FAMILIES:
            raise ValueError(f"pipeline {pipeline_class!r} is not supported; supported: {', '.join(FAMILIES)}")
        device = resolve_device(device)
        offload = cpu_offload and torch.device(device).type == "cuda"
        if offload and importlib.util.find_spec("accelerate") is None:  # said before minutes of loading
            raise ValueError(
                "cpu_offload needs the accelerate package: pip install 'lesa-serving[production]' (or accelerate)"
            )
        require_device(device)
        dtype = as_dtype(dtype) or default_dtype(device)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if revision:
            kwargs["revision"] = revision
        if variant:
            kwargs["variant"] = variant
        pipe = getattr(diffusers, pipeline_class).from_pretrained(source, **kwargs)
        if scheduler_config:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **scheduler_config)
        if vae_dtype is not None:
            pipe.vae.to(dtype=as_dtype(vae_dtype))
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        if vae_tiling:
            pipe.vae.enable_tiling()
        return cls(pipe, options)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> DiffusersBackend:
        """Move the pipeline (as `DigitsPipeline.to`)."""
        self.pipe.to(device, dtype) if dtype is not None else self.pipe.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    # ------------------------------------------------------------------------------------ info

    @property
    def info(self) -> DiffusersPipelineInfo:
        cfg = self.transformer.config
        options, family = self.options, self.family
        return DiffusersPipelineInfo(
            name=options.name,
            kind=family.kind,
            sizes=list(options.sizes),
            num_frames=list(options.num_frames) if family.kind == "video" else [1],
            default_steps=options.default_steps,
            default_guidance=self.default_guidance,
            min_steps=options.min_steps,
            max_steps=options.max_steps,
            hidden_size=int(cfg.num_attention_heads * cfg.attention_head_dim),
            transformer_class=type(self.transformer).__name__,
            fps=int(options.fps or family.default_fps),
            pipeline_class=family.pipeline_class,
        )

    @property
    def default_guidance(self) -> float:
        value = self.options.default_guidance
        return float(self.family.default_guidance if value is None else value)

    # ------------------------------------------------------------------------------ validation

    def validate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        height: int,
        width: int,
        num_frames: int | None,
        num_inference_steps: int,
        guidance_scale: float,
        latents: torch.Tensor | None = None,
    ) -> int | None:
        """What `__call__` checks before it generates (the `DigitsPipeline.validate` contract): a
        ValueError naming the field, else the clip length (None for an image model). Callers such
        as `lesa generate` refuse bad input with it before any output is made."""
        name = self.options.name
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] is a {type(prompt).__name__}, not a string")
            if prompt and not prompt.strip():  # "" is no text: the model's unconditional prediction (variations)
                raise ValueError(f'prompts[{i}] is blank: give text, or "" for none')
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds must have one seed per prompt ({len(prompts)}), got {len(seeds)}")
        if (width, height) not in self.options.sizes:
            supported = ", ".join(f"{w}x{h}" for w, h in self.options.sizes)
            raise ValueError(f"size {width}x{height} (width x height) not supported by {name}: {supported}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int | np.integer):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        low, high = self.options.min_steps, self.options.max_steps
        if not low <= num_inference_steps <= high:
            raise ValueError(f"num_inference_steps must be in {low}..{high}, got {num_inference_steps}")
        if not math.isfinite(float(guidance_scale)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if latents is not None and latents.shape[0] != len(prompts):
            raise ValueError(f"latents must hold one entry per prompt ({len(prompts)}), got {latents.shape[0]}")
        if self.family.kind == "image":
            if num_frames not in (None, 1):
                raise ValueError(f"num_frames must be None for the image model {name}, got {num_frames}")
            return None
        frames = self.options.num_frames[0] if num_frames is None else int(num_frames)
        if frames not in self.options.num_frames:
            raise ValueError(f"num_frames {frames} not supported by {name}: {self.options.num_frames}")
        return frames

    # -------------------------------------------------------------------------------- sampling

    def timesteps(
        self,
        num_inference_steps: int,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        """Normalised times (num_steps + 1, 1 = noise ... 0 = clean) a generation at this size uses.

        Computed exactly as the pipeline computes them, on a fresh scheduler: FLUX and Qwen-Image
        shift their sigmas by the image's token count, so the size matters (default: the size of
        the latest call, else the model's first size: the recorder asks right after its call).
        """
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        steps = int(num_inference_steps)
        if height is None or width is None:
            height, width, _ = self._last_size or (self.options.sizes[0][1], self.options.sizes[0][0], None)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        config = scheduler.config
        rule = self.family.sigma_rule
        if rule == "shifted":
            sigmas = np.linspace(1.0, 1 / steps, steps)
            if getattr(config, "use_flow_sigmas", False):
                sigmas = None
            patch = self.pipe.vae_scale_factor * 2  # VAE downsampling, then 2x2 packing
            seq_len = (int(height) // patch) * (int(width) // patch)
            mu = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
            retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        elif rule == "linear":
            retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
        else:
            scheduler.set_timesteps(steps, device="cpu")
        return normalised_times(scheduler)

    def initial_noise(
        self, seeds: Sequence[int], height: int, width: int, num_frames: int | None = None
    ) -> torch.Tensor:
        """The starting latents a call with these seeds uses, in the pipeline's own layout and dtype.

        Made by the pipeline's own `prepare_latents` with the same per-seed CPU generators, so
        `pipe(..., latents=initial_noise(seeds, ...))` reproduces `pipe(..., seeds=seeds)` exactly:
        the trajectory recorder stores this and replays it.
        """
        import inspect

        pipe, family = self.pipe, self.family
        cfg = self.transformer.config
        dtype = torch.float32 if family.latents_fp32 else self.transformer.dtype
        arguments = {
            "batch_size": len(seeds),
            "num_channels_latents": int(cfg.in_channels) // family.latent_channel_divisor,
            "height": int(height),
            "width": int(width),
            "num_frames": int(num_frames or self.options.num_frames[0]),
            "dtype": dtype,
            "device": self.device,
            "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
            "latents": None,
        }
        accepted = inspect.signature(pipe.prepare_latents).parameters
        result = pipe.prepare_latents(**{k: v for k, v in arguments.items() if k in accepted})
        return result[0] if isinstance(result, tuple) else result

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        *,
        seeds: list[int],
        height: int,
        width: int,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        cache: lesa_core.CacheConfig | None = None,
        callback: Callable[[int, int], bool | None] | None = None,
        latents: torch.Tensor | None = None,
        preview: Callable[..., None] | None = None,
        preview_steps: Collection[int] = (),
        reference: Reference | None = None,
    ) -> GenerationOutput:
        """Generate one sample per prompt (the `DigitsPipeline.__call__` contract).

        - Sample i starts from noise drawn by a CPU generator seeded with seeds[i], or from
          `latents[i]` (the pipeline's own latent layout, as its `prepare_latents` returns it).
        - `cache`: LESA / baseline acceleration through lesa_core's hooks, fresh per pipeline call.
        - `callback(step_done, total)` after every step; returning False raises `GenerationCancelled`.
          When a batch runs as several chunks (memory cap, OOM split) `total` counts every chunk's
          steps and `step_done` grows across them.
        - samples: float32 in [0, 1], [B, H, W, 3] (image) or [B, F, H, W, 3] (video).
        - `preview(step_done, samples, first)` (image pipelines, `supports_preview`): after each step
          in `preview_steps`, the flow's estimate of the clean images of batch items first, first + 1,
          ... (one call per chunk), decoded as the output is. Not after step 1 (the sampler's
          starting latents are not shown to callbacks).
        - `reference` (`reference_mode`: RGB samples [B, H, W, 3]): given pixels, encoded by the VAE
          and put back into the latents after every step (`Reference.put_back`).
        """
        if guidance_scale is None:
            guidance_scale = self.default_guidance
        frames = self.validate(prompts, seeds, height, width, num_frames, num_inference_steps, guidance_scale, latents)
        if reference is not None:
            if self.reference_mode is None:
                raise ValueError(f"{self.family.pipeline_class} takes no reference (given pixels) here")
            reference.check((len(prompts), int(height), int(width), 3), num_inference_steps)
        self._last_size = (int(height), int(width), frames)
        cost = sample_cost(height, width, frames)
        cap = self.options.max_batch_pixels
        if self._oom_ceiling is not None:
            cap = min(cap, self._oom_ceiling - 1) if cap else self._oom_ceiling - 1
        chunks = plan_chunks(len(prompts), cost, cap)
        progress = _Progress(callback, num_inference_steps, len(chunks))
        stats: dict[str, Any] = {"chunks": [], "oom_splits": 0, "transformer_calls": 0}
        started = time.perf_counter()

        previewed: set[tuple[int, int]] = set()  # (step, sample): a chunk retried after OOM does not show them again

        def run(indices: list[int]) -> list[np.ndarray]:
            progress.start_chunk()
            unseen = frozenset(s for s in preview_steps if any((s, i) not in previewed for i in indices))

            def chunk_preview(step: int, samples: np.ndarray) -> None:
                assert preview is not None
                preview(step, samples, first=indices[0])
                previewed.update((step, i) for i in indices)

            return self._run_chunk(
                [prompts[i] for i in indices], [int(seeds[i]) for i in indices], height, width, frames,
                num_inference_steps, float(guidance_scale), cache, progress,
                None if latents is None else latents[indices], stats,
                None if preview is None else chunk_preview, unseen,
                None if reference is None else reference.select(indices),
            )  # fmt: skip

        def on_split(indices: list[int], error: BaseException) -> None:
            stats["oom_splits"] += 1
            ceiling = len(indices) * cost
            self._oom_ceiling = ceiling if self._oom_ceiling is None else min(self._oom_ceiling, ceiling)
            progress.split_chunk()

        with self._lock:
            parts: list[np.ndarray] = []
            start = 0
            for size in chunks:
                parts.extend(run_with_oom_split(range(start, start + size), run, on_split))
                start += size
        samples = np.stack(parts).astype(np.float32, copy=False)
        stats.update(
            wall_time_s=time.perf_counter() - started,
            num_inference_steps=num_inference_steps,
            guidance_scale=float(guidance_scale),
            batch_size=len(prompts),
        )
        return GenerationOutput(samples=samples, stats=stats)

    def _call_kwargs(self, batch: int, guidance_scale: float) -> dict[str, Any]:
        family, options = self.family, self.options
        kwargs: dict[str, Any] = dict(options.call_kwargs)
        kwargs[options.guidance_arg or family.guidance_arg] = guidance_scale
        negative = options.negative_prompt if options.negative_prompt is not None else family.negative_prompt
        if negative is not None and guidance_scale > 1.0:
            kwargs["negative_prompt"] = [negative] * batch
        return kwargs

    def _run_chunk(
        self,
        prompts: list[str],
        seeds: list[int],
        height: int,
        width: int,
        frames: int | None,
        steps: int,
        guidance_scale: float,
        cache: lesa_core.CacheConfig | None,
        progress: _Progress,
        latents: torch.Tensor | None,
        stats: dict[str, Any],
        preview: Callable[[int, np.ndarray], None] | None = None,
        preview_steps: frozenset[int] = frozenset(),
        reference: Reference | None = None,
    ) -> list[np.ndarray]:
        pipe, transformer, scheduler = self.pipe, self.transformer, self.scheduler
        # CPU generators: the same seed gives the same noise on any device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs = self._call_kwargs(len(prompts), guidance_scale)
        if frames is not None:
            kwargs["num_frames"] = frames
        put_back = None
        if reference is not None:
            # the starting noise the pipeline would draw, made here so the reference is noised with it
            if latents is None:
                latents = self.initial_noise(seeds, height, width, frames)
            with torch.no_grad():
                target = encode_images(pipe, self.family, torch.from_numpy(np.asarray(reference.samples, np.float32)))
            keep = keep_latents(pipe, torch.from_numpy(np.asarray(reference.keep, bool)).all(-1), target.shape[-1] // 4)
            put_back = reference.put_back(target, keep, latents.to(self.device))
        if latents is not None:
            kwargs["latents"] = latents.to(self.device)  # the pipeline casts to the dtype it samples in

        counts: dict[str, dict[str, int]] = {}
        before: list[torch.Tensor | None] = [kwargs.get("latents")]  # the step's starting latents
        # Stage boundaries inside the pipeline's call: it encodes the prompts, fixes its timesteps,
        # runs the steps, then decodes. (perf_counter when each was last seen)
        marks: dict[str, float] = {}

        def on_step_end(_pipe: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            marks["stepped"] = time.perf_counter()
            after = callback_kwargs["latents"]
            if preview is not None and i + 1 in preview_steps and before[0] is not None:
                with torch.no_grad():  # from the step the model made, before the reference goes back
                    preview(i + 1, self._clean_estimate(before[0], after, i, height, width))
            if put_back is not None:
                after = callback_kwargs["latents"] = put_back(after, i + 1, float(scheduler.sigmas[i + 1])).to(
                    after.dtype
                )
            before[0] = after
            if cache is not None:
                # Read now: the pipeline's closing `maybe_free_model_hooks` resets stateful hooks.
                counts.clear()
                counts.update(lesa_core.cache_stats(transformer))
            if progress.step() is False:
                # Raising stops the pipeline at once (`pipe._interrupt` would still decode the VAE).
                raise GenerationCancelled(f"cancelled after step {i + 1} of {steps}")
            return callback_kwargs

        calls = [0]

        def count_call(*_: Any) -> None:
            calls[0] += 1

        counter = transformer.register_forward_pre_hook(count_call)
        original_set_timesteps = scheduler.set_timesteps

        # Start the hooks' generation exactly when the pipeline fixes its sigmas. functools.wraps
        # keeps the signature, which `retrieve_timesteps` inspects to see whether sigmas are accepted.
        @functools.wraps(original_set_timesteps)
        def set_timesteps(*args: Any, **kw: Any) -> Any:
            result = original_set_timesteps(*args, **kw)
            marks.setdefault("timesteps", time.perf_counter())
            if cache is not None:
                lesa_core.new_generation(transformer, timesteps=normalised_times(scheduler))
            return result

        try:
            if cache is not None:
                lesa_core.enable_cache(transformer, cache)
            scheduler.set_timesteps = set_timesteps
            marks["called"] = time.perf_counter()
            output = pipe(
                prompt=list(prompts),
                height=height,
                width=width,
                num_inference_steps=steps,
                generator=generators,
                output_type="np",
                callback_on_step_end=on_step_end,
                **kwargs,
            )
            marks["returned"] = time.perf_counter()
            if cache is not None:
                stats["cache"] = _merge_counts(stats.get("cache"), counts)
        finally:
            counter.remove()
            scheduler.__dict__.pop("set_timesteps", None)  # back to the class's method
            if cache is not None:
                lesa_core.disable_cache(transformer)
        stages = stats.setdefault("stage_seconds", {"encode_prompts": 0.0, "denoise": 0.0, "decode": 0.0})
        timesteps = marks.get("timesteps", marks["called"])
        stepped = marks.get("stepped", timesteps)
        stages["encode_prompts"] += timesteps - marks["called"]  # with the latents' preparation
        stages["denoise"] += stepped - timesteps
        stages["decode"] += marks["returned"] - stepped  # the VAE and the pipeline's postprocessing
        stats["transformer_calls"] += calls[0]
        stats["chunks"].append(len(prompts))
        samples = np.asarray(getattr(output, self.family.output_attr), dtype=np.float32)
        return list(samples)

    @property
    def supports_preview(self) -> bool:
        return self.family.pipeline_class in IMAGE_LATENT_FAMILIES

    @property
    def reference_mode(self) -> str | None:
        """RGB samples for `reference=` where the family's image latents are known, else None."""
        return "RGB" if self.family.pipeline_class in IMAGE_LATENT_FAMILIES else None

    def _clean_estimate(self, before: torch.Tensor, after: torch.Tensor, i: int, height: int, width: int) -> np.ndarray:
        """The clean images step i points at: x_t = (1 - s) x0 + s noise moves along v = noise - x0,
        so the step's v = (after - before) / (s_next - s) and x0 = after - s_next v."""
        sigmas = self.scheduler.sigmas
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        after32 = after.to(torch.float32)
        velocity = (after32 - before.to(torch.float32)) / (s_next - s)
        clean = (after32 - s_next * velocity).to(after.dtype)
        return decode_latents(self.pipe, self.family, clean, height, width)


class _Progress:
    """(done, total) across the chunks of one call: `done` never goes back and never passes `total`.

    A chunk that runs out of memory becomes two chunks; the steps it had made stay done (the
    work was spent) and are added to the total, so a split lowers the percentage, never reverses it.
    """

    def __init__(self, callback: Callable[[int, int], bool | None] | None, steps: int, chunks: int) -> None:
        self.callback = callback
        self.steps = steps
        self.chunks = chunks
        self.done = 0
        self.spent = 0  # steps of chunks that ran out of memory
        self.chunk_started_at = 0

    def start_chunk(self) -> None:
        self.chunk_started_at = self.done

    def split_chunk(self) -> None:
        self.chunks += 1
        self.spent += self.done - self.chunk_started_at

    def step(self) -> bool | None:
        self.done += 1
        if self.callback is None:
            return None
        return self.callback(self.done, self.steps * self.chunks + self.spent)


def _merge_counts(
    total: dict[str, dict[str, int]] | None, counts: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    merged = {branch: dict(values) for branch, values in (total or {}).items()}
    for branch, values in counts.items():
        slot = merged.setdefault(branch, {"full": 0, "predicted": 0})
        for key, value in values.items():
            slot[key] = slot.get(key, 0) + value
    return merged


def as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from its name ("bfloat16", "float16", "float32") or a common alias ("bf16",
    "fp16", "half", "fp32", "float"); ValueError for anything else."""
    if value is None or isinstance(value, torch.dtype):
        return value
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}
    name = names.get(str(value), str(value))
    dtype = getattr(torch, name, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):  # (torch.int8 would load, and fail later)
        raise ValueError(f"unknown dtype {value!r}; use float32, bfloat16 or float16")
    return dtype
