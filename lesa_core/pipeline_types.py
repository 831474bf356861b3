"""What every pipeline served here promises its callers: the call contract's result and info types.

The reference `DigitsPipeline` (lesa_models) and the production `DiffusersBackend`
(lesa_core.production) both return these, so the service, training and benchmark code treat
any model alike. They live in lesa_core because the library must not depend on lesa_models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


class GenerationCancelled(Exception):
    """Raised when the step callback returns False (the service cancels a job this way)."""


@dataclass(frozen=True)
class PipelineInfo:
    """What a caller may ask of a pipeline; the service builds its API limits from this."""

    name: str
    kind: str  # "image" | "video"
    sizes: list[tuple[int, int]]  # supported (width, height)
    num_frames: list[int]  # supported clip lengths; [1] for images
    default_steps: int
    default_guidance: float
    min_steps: int
    max_steps: int
    hidden_size: int
    transformer_class: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationOutput:
    """samples: float32 in [0, 1], [B, H, W] (image) or [B, F, H, W] (video); stats: timings, cache use.

    `stats["stage_seconds"]`: where the call's time went, in order: `encode_prompts` (the text
    encoder, for every CFG branch), `denoise` (the sampling loop), `decode` (latents to pixels: the
    VAE, or a copy for a pixel-space model). The service reports them per job and per stage.
    """

    samples: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reference:
    """Given pixels the sampler keeps (an image to edit, a video's first frame), per sample.

    After every step the sampler puts the reference, noised to that step's level with the sample's
    own starting noise, into the sample: everywhere up to step `follow_until[i]` (an edit's
    strength: the steps after it start from the reference as noisy as they are, as SDEdit and
    diffusers' img2img pipelines start), and where `keep[i]` is true at every step (kept pixels end
    equal to the reference; the others are generated to fit them). A sample whose keep is all false
    and follow_until 0 is generated as if it had no reference, so samples with and without one
    share a batch.

    `samples`: float32 on the output scale [0, 1], shaped like the pipeline's output ([B, H, W] or
    [B, F, H, W] grey, [B, H, W, 3] RGB: the pipeline's `reference_mode`); `keep`: bool of the same
    shape. A pipeline that samples in a latent space encodes both into it (`put_back` works there).
    """

    samples: np.ndarray
    keep: np.ndarray
    follow_until: Sequence[int]

    def check(self, shape: tuple[int, ...], num_inference_steps: int) -> None:
        """ValueError unless this reference fits a batch of samples shaped `shape`."""
        if tuple(self.samples.shape) != tuple(shape) or tuple(self.keep.shape) != tuple(shape):
            raise ValueError(
                f"reference samples and keep must have the batch's shape {list(shape)}, got "
                f"{list(self.samples.shape)} and {list(self.keep.shape)}"
            )
        if len(self.follow_until) != shape[0]:
            raise ValueError(
                f"reference follow_until needs one step per sample ({shape[0]}), got {len(self.follow_until)}"
            )
        if any(not 0 <= int(s) <= num_inference_steps for s in self.follow_until):
            raise ValueError(
                f"reference follow_until must be in 0..{num_inference_steps}, got {list(self.follow_until)}"
            )

    def select(self, samples: slice | Sequence[int]) -> Reference:
        """These samples' given pixels (a chunk of a batch), by slice or indices."""
        picked = np.arange(len(self.follow_until))[samples]
        return Reference(self.samples[picked], self.keep[picked], [int(self.follow_until[i]) for i in picked])

    def put_back(
        self, target: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor
    ) -> Callable[[torch.Tensor, int, float], torch.Tensor]:
        """`(x, step, sigma) -> x` with the reference put back after step `step`, whose sample is at
        noise level `sigma`: on the flow's line from the sample's own starting `noise` to `target`,
        x = (1 - sigma) target + sigma noise. `target` and `keep` are the reference and where it is
        kept in the sampler's own space and layout (pixels, or latents), shaped like `noise`."""
        until = torch.as_tensor([int(s) for s in self.follow_until], device=noise.device)
        until = until.view(-1, *([1] * (noise.ndim - 1)))
        target, keep, noise = target.to(noise.device, noise.dtype), keep.to(noise.device), noise.clone()

        def put_back(x: torch.Tensor, step: int, sigma: float) -> torch.Tensor:
            return torch.where(keep | (step <= until), (1.0 - sigma) * target + sigma * noise, x)

        return put_back


def reference_steps(strength: float, num_inference_steps: int) -> int:
    """The step up to which an edit of `strength` (0 = keep the image, 1 = a new one) follows its
    reference: the first (1 - strength) of the steps, those diffusers' img2img pipelines skip."""
    return int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
