"""Tiny reference DiTs trained here: `digits-image` (FLUX architecture) and `digits-video` (Wan)."""

from lesa_models.pipeline import DigitsPipeline, GenerationCancelled, GenerationOutput, PipelineInfo
from lesa_models.registry import MODEL_NAMES, load_pipeline

__all__ = [
    "MODEL_NAMES",
    "DigitsPipeline",
    "GenerationCancelled",
    "GenerationOutput",
    "PipelineInfo",
    "load_pipeline",
]
