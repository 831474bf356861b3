"""Production models: stock diffusers pipelines (FLUX.1, Qwen-Image, Wan2.1, HunyuanVideo) served
with LESA, configured by one TOML file (`deploy/models.toml`). No web dependencies.

    from lesa_core.production import load_models
    served = load_models()                      # every model enabled on this node
    model = served["flux.1-dev"]
    out = model.pipe(["a cat"], seeds=[0], height=1024, width=1024,
                     cache=CacheConfig(method="lesa", schedule=p.schedule, predictor=p))  # p = model.bundles["5x"]
"""

from lesa_core.production.backend import (
    FAMILIES,
    BackendOptions,
    DiffusersBackend,
    DiffusersPipelineInfo,
    PipelineFamily,
    default_dtype,
    normalised_times,
)
from lesa_core.production.batching import is_out_of_memory, plan_chunks, run_with_oom_split
from lesa_core.production.config import (
    ConfigError,
    ModelConfig,
    ModelsConfig,
    ServedModel,
    build_pipeline,
    load_bundles,
    load_models,
    read_config,
)

__all__ = [
    "FAMILIES",
    "BackendOptions",
    "ConfigError",
    "DiffusersBackend",
    "DiffusersPipelineInfo",
    "ModelConfig",
    "ModelsConfig",
    "PipelineFamily",
    "ServedModel",
    "build_pipeline",
    "default_dtype",
    "is_out_of_memory",
    "load_bundles",
    "load_models",
    "normalised_times",
    "plan_chunks",
    "read_config",
    "run_with_oom_split",
]
