"""What every pipeline served here promises its callers: the call contract's result and info types.

The reference `DigitsPipeline` (lesa_models) and the production `DiffusersBackend`
(lesa_core.production) both return these, so the service, training and benchmark code treat
any model alike. They live in lesa_core because the library must not depend on lesa_models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


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
