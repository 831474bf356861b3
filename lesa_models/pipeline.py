"""`DigitsPipeline`: text-to-image (FLUX transformer) and text-to-video (Wan transformer) in pixel space.

There is no VAE: the "latent" is the grey-scale image itself, scaled to [-1, 1]. For the image model
the pixels are packed into 2x2 patch tokens exactly as `FluxPipeline._pack_latents` packs latents,
with FLUX's (0, row, col) image ids and all-zero text ids, and the transformer gets the timestep as
sigma (FLUX multiplies by 1000 inside). For the video model the clip goes in as [B, 1, F, H, W] and
Wan patchifies it itself; it gets the timestep on the 0..1000 scale, as `WanPipeline` passes it.

The call contract (the service, the trainers and the benchmarks rely on it) is documented on
`DigitsPipeline.denoise`, which `__call__` runs under no_grad.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, WanTransformer3DModel

from lesa_core.pipeline_types import GenerationCancelled, GenerationOutput, PipelineInfo, Reference
from lesa_models.text_encoder import DEFAULT_MAX_LENGTH, PACKAGE_NAME, TextEncoder, TextEncoding, get_text_encoder

if TYPE_CHECKING:  # lesa_core is only needed when acceleration is asked for
    from lesa_core import CacheConfig

MIN_STEPS = 4
MAX_STEPS = 100
MODEL_INDEX = "model_index.json"


# ------------------------------------------------------------------------------------- FLUX packing


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4], the same layout as `FluxPipeline._pack_latents`."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` (as `FluxPipeline._unpack_latents`, without the VAE factor)."""
    b, _, d = x.shape
    c = d // 4
    x = x.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


@functools.lru_cache(maxsize=32)
def image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX positional ids of the packed tokens: (0, row, col), as `_prepare_latent_image_ids`.

    Cached (read-only): the sampler asks for them on every transformer call."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


@functools.lru_cache(maxsize=32)
def _text_ids(length: int, device: torch.device) -> torch.Tensor:
    """FLUX's all-zero text ids (cached, read-only)."""
    return torch.zeros(length, 3, device=device)


def _load_transformer(cls: type, directory: Path) -> FluxTransformer2DModel | WanTransformer3DModel:
    """Config + safetensors state dict, strictly.

    Not `cls.from_pretrained`: without `accelerate` installed, diffusers refuses to load Wan (its
    `keep_in_fp32_modules` requires low_cpu_mem_usage, which needs accelerate). These models are a
    few MB, so building from the config and loading the tensors is just as fast.
    """
    from safetensors.torch import load_file

    model = cls.from_config(cls.load_config(directory))
    model.load_state_dict(load_file(directory / "diffusion_pytorch_model.safetensors"), strict=True)
    return model


# ---------------------------------------------------------------------------------------- pipeline


class DigitsPipeline:
    """A pixel-space flow-matching pipeline around a diffusers transformer and the MiniLM text encoder."""

    supports_preview = True  # `preview=` (partial images of streamed requests): see `denoise`
    reference_mode = "L"  # `reference=` (image edits, a video's first frame) takes grey samples: see `denoise`

    def __init__(
        self,
        transformer: FluxTransformer2DModel | WanTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: TextEncoder,
        *,
        name: str,
        kind: str,
        sizes: Sequence[tuple[int, int]],
        num_frames: Sequence[int] = (1,),
        default_steps: int = 50,
        default_guidance: float = 4.0,
    ) -> None:
        if kind not in ("image", "video"):
            raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
        self.transformer = transformer.eval()
        self.dtype: torch.dtype = next(transformer.parameters()).dtype  # what the transformer computes in
        self._device: torch.device = next(transformer.parameters()).device  # kept by `to`: read on every call
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.name = name
        self.kind = kind
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.num_frames_options = [int(f) for f in num_frames]
        self.default_steps = default_steps
        self.default_guidance = float(default_guidance)
        # Directory this pipeline was loaded from; LESA bundles live in <root>/predictors/<level>/.
        self.root: Path | None = None
        # The cache hooks keep per-generation state on the transformer: one generation at a time.
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------- loading

    @property
    def info(self) -> PipelineInfo:
        cfg = self.transformer.config
        hidden = int(cfg.num_attention_heads * cfg.attention_head_dim)
        return PipelineInfo(
            name=self.name,
            kind=self.kind,
            sizes=list(self.sizes),
            num_frames=list(self.num_frames_options),
            default_steps=self.default_steps,
            default_guidance=self.default_guidance,
            min_steps=MIN_STEPS,
            max_steps=MAX_STEPS,
            hidden_size=hidden,
            transformer_class=type(self.transformer).__name__,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DigitsPipeline:
        """Load a diffusers-style directory: model_index.json, transformer/, scheduler/, text_encoder/."""
        root = Path(path)
        index_path = root / MODEL_INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: not a DigitsPipeline directory")
        try:
            return cls._load(root, index_path)
        except Exception as error:  # noqa: BLE001 - any damage (JSON, keys, types, tensors): name the directory
            raise ValueError(
                f"{root}: not a usable DigitsPipeline directory ({type(error).__name__}: {error})"
            ) from error

    @classmethod
    def _load(cls, root: Path, index_path: Path) -> DigitsPipeline:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        settings = index["lesa_digits"]
        transformer_cls = {
            "FluxTransformer2DModel": FluxTransformer2DModel,
            "WanTransformer3DModel": WanTransformer3DModel,
        }[index["transformer"][1]]
        transformer = _load_transformer(transformer_cls, root / "transformer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
        te_config = json.loads((root / "text_encoder" / "config.json").read_text())
        if te_config.get("package") != PACKAGE_NAME:
            raise ValueError(f"text_encoder/config.json names package {te_config.get('package')!r}")
        text_encoder = get_text_encoder(int(te_config.get("max_length", DEFAULT_MAX_LENGTH)))
        pipe = cls(
            transformer,
            scheduler,
            text_encoder,
            name=settings["name"],
            kind=settings["kind"],
            sizes=[tuple(s) for s in settings["sizes"]],
            num_frames=settings.get("num_frames", [1]),
            default_steps=settings.get("default_steps", 50),
            default_guidance=settings.get("default_guidance", 4.0),
        )
        pipe.root = root
        return pipe

    def save_pretrained(self, path: str | Path) -> None:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(root / "transformer", safe_serialization=True)
        self.scheduler.save_pretrained(root / "scheduler")
        (root / "text_encoder").mkdir(exist_ok=True)
        te_config = {"package": PACKAGE_NAME, "model": "all-MiniLM-L6-v2", "max_length": self.text_encoder.max_length}
        (root / "text_encoder" / "config.json").write_text(json.dumps(te_config, indent=2) + "\n")
        import diffusers

        index = {
            "_class_name": "DigitsPipeline",
            "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", type(self.transformer).__name__],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "text_encoder": ["lesa_models", "TextEncoder"],
            "lesa_digits": {
                "name": self.name,
                "kind": self.kind,
                "sizes": [list(s) for s in self.sizes],
                "num_frames": self.num_frames_options,
                "default_steps": self.default_steps,
                "default_guidance": self.default_guidance,
            },
        }
        (root / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    # ---------------------------------------------------------------------------- device, dtype

    @property
    def device(self) -> torch.device:
        """Where the transformer computes; move it with `to`, which keeps this up to date."""
        return self._device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DigitsPipeline:
        """Move the transformer to `device` / `dtype` (e.g. "cuda", torch.bfloat16), like a diffusers pipeline.

        Modules the family keeps in float32 (`_keep_in_fp32_modules`, e.g. Wan's norms and time
        embedder) stay float32, as diffusers' `from_pretrained(torch_dtype=...)` leaves them. The
        frozen text encoder stays on the CPU (its embeddings are cached per prompt and moved per
        call); noise is still drawn on the CPU per seed, so a seed starts from the same noise on any
        device, and the sampler's state stays float32 whatever the transformer's dtype.
        """
        keep = set(getattr(self.transformer, "_keep_in_fp32_modules", None) or ())
        if dtype is not None:
            self.dtype = dtype
        for name, tensor in [*self.transformer.named_parameters(), *self.transformer.named_buffers()]:
            wanted = torch.float32 if keep & set(name.split(".")) else self.dtype
            tensor.data = tensor.data.to(device=device, dtype=wanted if tensor.is_floating_point() else None)
        self._device = next(self.transformer.parameters()).device
        return self

    # ------------------------------------------------------------------------------ model calls

    def encode(self, prompts: list[str]) -> TextEncoding:
        return self.text_encoder.encode(prompts)

    def predict_velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """Velocity (noise - x0) for pixel-space x ([B,1,H,W] or [B,1,F,H,W]) at per-sample sigma [B].

        Shared by training and sampling so both feed the transformer identically.
        """
        return self._velocity(self._transformer_output(self._transformer_input(x), x, sigma, text), x)

    def _transformer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the transformer takes for the sample x (FLUX: packed 2x2 patches); both CFG branches
        of a step share it."""
        return (pack_latents(x) if self.kind == "image" else x).to(self.device, self.dtype)

    def _transformer_output(
        self, hidden: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, text: TextEncoding
    ) -> torch.Tensor:
        """The transformer's output for one branch, in x's dtype and still in the transformer's layout
        (the CFG mix is elementwise, so it can run before `_velocity` unpacks)."""
        device, dtype = self.device, self.dtype
        tokens = text.tokens.to(device, dtype)
        if self.kind == "image":
            h, w = x.shape[-2:]
            return self.transformer(
                hidden_states=hidden,
                encoder_hidden_states=tokens,
                pooled_projections=text.pooled.to(device, dtype),
                timestep=sigma.to(device, dtype),  # FLUX scales by 1000 inside, as FluxPipeline passes t / 1000
                img_ids=image_ids(h, w).to(device),
                txt_ids=_text_ids(tokens.shape[1], device),
                return_dict=False,
            )[0].to(x.dtype)
        return self.transformer(
            hidden_states=hidden,
            timestep=(sigma * 1000.0).to(device, dtype),
            encoder_hidden_states=tokens,
            return_dict=False,
        )[0].to(x.dtype)

    @staticmethod
    def _reference_step(
        reference: Reference, noise: torch.Tensor, num_inference_steps: int
    ) -> Callable[[torch.Tensor, int, float], torch.Tensor]:
        """`Reference.put_back` in this sampler's space: pixels scaled to [-1, 1], [B, 1, ...]."""
        reference.check((noise.shape[0], *noise.shape[2:]), num_inference_steps)
        target = (torch.from_numpy(np.asarray(reference.samples, np.float32)) * 2.0 - 1.0).unsqueeze(1)
        keep = torch.from_numpy(np.asarray(reference.keep, bool)).unsqueeze(1)
        return reference.put_back(target, keep, noise)

    def _velocity(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return unpack_latents(output, *x.shape[-2:]) if self.kind == "image" else output

    def noise_shape(self, height: int, width: int, num_frames: int | None) -> tuple[int, ...]:
        if self.kind == "image":
            return (1, height, width)
        return (1, int(num_frames or self.num_frames_options[0]), height, width)

    def initial_noise(
        self, seeds: Sequence[int], height: int, width: int, num_frames: int | None = None
    ) -> torch.Tensor:
        """Per-seed Gaussian noise: one CPU generator per sample, so a sample never depends on its batch."""
        shape = self.noise_shape(height, width, num_frames)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Normalised schedule times: num_steps + 1 sigmas, 1 = noise ... 0 = clean (as lesa_core wants)."""
        sched = self._fresh_scheduler(num_inference_steps)
        return sched.sigmas.clone()

    def _fresh_scheduler(self, num_inference_steps: int) -> FlowMatchEulerDiscreteScheduler:
        # A scheduler instance carries a step index; a fresh one per call keeps concurrent calls apart.
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        # Same sigma spacing as FluxPipeline: linspace(1, 1/N, N), then the scheduler appends 0.
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps).tolist()
        sched.set_timesteps(sigmas=sigmas)
        return sched

    # ------------------------------------------------------------------------------- validation

    def validate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        height: int,
        width: int,
        num_frames: int | None,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> int | None:
        """What `__call__` checks before it generates: a ValueError naming the field, else the clip
        length (None for an image model). Callers such as `lesa generate` refuse bad input with it
        before any output is made."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] is a {type(prompt).__name__}, not a string")
            if prompt and not prompt.strip():  # "" is no text: the model's unconditional prediction (variations)
                raise ValueError(f'prompts[{i}] is blank: give text, or "" for none')
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds must have one seed per prompt ({len(prompts)}), got {len(seeds)}")
        if (width, height) not in self.sizes:
            supported = ", ".join(f"{w}x{h}" for w, h in self.sizes)
            raise ValueError(f"size {width}x{height} (width x height) not supported by {self.name}: {supported}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int | np.integer):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        if not MIN_STEPS <= num_inference_steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be in {MIN_STEPS}..{MAX_STEPS}, got {num_inference_steps}")
        if not math.isfinite(float(guidance_scale)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if self.kind == "image":
            if num_frames not in (None, 1):
                raise ValueError(f"num_frames must be None for the image model {self.name}, got {num_frames}")
            return None
        frames = self.num_frames_options[0] if num_frames is None else num_frames
        if frames not in self.num_frames_options:
            raise ValueError(f"num_frames {frames} not supported by {self.name}: {self.num_frames_options}")
        return frames

    # -------------------------------------------------------------------------------- sampling

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
        cache: CacheConfig | None = None,
        callback: Callable[[int, int], bool | None] | None = None,
        latents: torch.Tensor | None = None,
        preview: Callable[[int, np.ndarray], None] | None = None,
        preview_steps: Collection[int] = (),
        reference: Reference | None = None,
    ) -> GenerationOutput:
        """Generate one sample per prompt (the contract: see `denoise`); samples as float32 numpy in [0, 1]."""
        x, stats = self.denoise(
            prompts,
            seeds=seeds,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            cache=cache,
            callback=callback,
            latents=latents,
            preview=preview,
            preview_steps=preview_steps,
            reference=reference,
        )
        decoding = time.perf_counter()
        samples = x.clamp(0.0, 1.0).cpu().numpy().astype(np.float32)  # pixel space: decoding is a copy
        stats["stage_seconds"]["decode"] = time.perf_counter() - decoding
        return GenerationOutput(samples=samples, stats=stats)

    def denoise(
        self,
        prompts: list[str],
        *,
        seeds: list[int],
        height: int,
        width: int,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        cache: CacheConfig | None = None,
        callback: Callable[[int, int], bool | None] | None = None,
        latents: torch.Tensor | None = None,
        preview: Callable[[int, np.ndarray], None] | None = None,
        preview_steps: Collection[int] = (),
        reference: Reference | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Generate one sample per prompt: the samples as a float32 tensor on the [0, 1] scale
        (unclamped; [B, H, W] or [B, F, H, W]) and the call's stats.

        Runs under whatever autograd mode the caller chose: `__call__` runs it under no_grad;
        sample-space predictor training (lesa_core.training, phase 3) backpropagates through it.

        - Sample i starts from noise drawn by its own generator seeded with seeds[i] (or `latents[i]`,
          shaped like `initial_noise(...)`), so it does not depend on the rest of the batch.
        - True CFG: the conditional and unconditional ("" prompt) branches are separate transformer
          calls inside `transformer.cache_context("cond")` / `("uncond")`; uncond is skipped when
          guidance_scale <= 1.
        - `cache`: LESA / baseline acceleration through lesa_core's hooks, reset per generation.
        - `callback(step_done, total)` runs after every step; returning False raises GenerationCancelled.
        - `preview(step_done, samples)` runs after each step in `preview_steps` with the sampler's
          current estimate of the clean samples (float32 numpy in [0, 1], shaped like the output):
          the partial images of a streamed request. (The production backend, which may split a
          batch into chunks, adds `first=`: the batch index of samples[0].)
        """
        if guidance_scale is None:
            guidance_scale = self.default_guidance
        frames = self.validate(prompts, seeds, height, width, num_frames, num_inference_steps, guidance_scale)
        expected = (len(prompts), *self.noise_shape(height, width, frames))
        if latents is None:
            x = self.initial_noise(seeds, height, width, frames)
        else:
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {list(expected)}, got {list(latents.shape)}")
            x = latents.detach().to(torch.float32).clone()
        x = x.to(self.device)
        keep_reference = self._reference_step(reference, x, num_inference_steps) if reference is not None else None

        do_cfg = guidance_scale > 1.0
        encoding = time.perf_counter()
        cond = self.encode(list(prompts))
        uncond = self.encode([""] * len(prompts)) if do_cfg else None
        sched = self._fresh_scheduler(num_inference_steps)
        steps_dt = (sched.sigmas[1:] - sched.sigmas[:-1]).tolist()  # float32 differences, as step() takes them
        total = len(sched.timesteps)
        started = time.perf_counter()
        calls = 0

        with self._lock:
            if cache is not None:
                import lesa_core

                lesa_core.enable_cache(self.transformer, cache)
            try:
                if cache is not None:
                    lesa_core.new_generation(self.transformer, timesteps=sched.sigmas.clone())
                for i, t in enumerate(sched.timesteps):
                    sigma = (t / 1000.0).expand(x.shape[0]).to(x.device, torch.float32)
                    # predict_velocity per branch, with the input packed once and the output unpacked
                    # once per step: on a predicted step these copies cost as much as the forecast
                    hidden = self._transformer_input(x)
                    with self.transformer.cache_context("cond"):
                        out = self._transformer_output(hidden, x, sigma, cond)
                    calls += 1
                    if uncond is not None:
                        with self.transformer.cache_context("uncond"):
                            out_uncond = self._transformer_output(hidden, x, sigma, uncond)
                        calls += 1
                        out = out_uncond + guidance_scale * (out - out_uncond)
                    # FlowMatchEulerDiscreteScheduler.step's arithmetic (bit for bit) without its
                    # per-call bookkeeping, which costs as much as a predicted step's forecast
                    velocity = self._velocity(out, x)
                    if preview is not None and i + 1 in preview_steps:
                        # x_t = (1 - s) x0 + s noise and v = noise - x0, so x0 = x_t - s v
                        clean = (x - float(sched.sigmas[i]) * velocity)[:, 0]
                        preview(i + 1, ((clean + 1.0) / 2.0).clamp(0.0, 1.0).detach().cpu().numpy())
                    x = x + steps_dt[i] * velocity
                    if keep_reference is not None:
                        x = keep_reference(x, i + 1, float(sched.sigmas[i + 1]))
                    if callback is not None and callback(i + 1, total) is False:
                        raise GenerationCancelled(f"cancelled after step {i + 1} of {total}")
                stats: dict[str, Any] = {}
                if cache is not None:
                    stats["cache"] = lesa_core.cache_stats(self.transformer)
            finally:
                if cache is not None:
                    lesa_core.disable_cache(self.transformer)

        denoised = time.perf_counter()
        stats.update(
            wall_time_s=denoised - started,
            stage_seconds={"encode_prompts": started - encoding, "denoise": denoised - started},
            num_inference_steps=num_inference_steps,
            guidance_scale=float(guidance_scale),
            batch_size=len(prompts),
            transformer_calls=calls,
        )
        return (x[:, 0] + 1.0) / 2.0, stats
