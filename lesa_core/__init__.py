"""LESA: learnable stage-aware predictors that let a Diffusion Transformer skip its blocks."""

from lesa_core.ensemble import PredictorEnsemble
from lesa_core.forecasters import Forecaster, LesaForecaster, ReuseForecaster, TaylorSeerForecaster
from lesa_core.hooks import (
    CacheConfig,
    UnsupportedModelError,
    cache_stats,
    disable_cache,
    enable_cache,
    is_cache_enabled,
    new_generation,
)
from lesa_core.kan import KAN, KANLinear
from lesa_core.levels import LEVELS, level_schedule
from lesa_core.pipeline_types import GenerationCancelled, GenerationOutput, PipelineInfo
from lesa_core.predictor import BundleError, PredictorConfig, StagePredictor
from lesa_core.schedule import CacheSchedule

__all__ = [
    "KAN",
    "LEVELS",
    "BundleError",
    "CacheConfig",
    "CacheSchedule",
    "Forecaster",
    "GenerationCancelled",
    "GenerationOutput",
    "KANLinear",
    "LesaForecaster",
    "PipelineInfo",
    "PredictorConfig",
    "PredictorEnsemble",
    "ReuseForecaster",
    "StagePredictor",
    "TaylorSeerForecaster",
    "UnsupportedModelError",
    "cache_stats",
    "disable_cache",
    "enable_cache",
    "is_cache_enabled",
    "level_schedule",
    "new_generation",
]
