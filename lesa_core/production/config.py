"""The model config file (`deploy/models.toml`): which models a node serves, and their LESA bundles.

`read_config(path)` parses and validates the file (a `ConfigError` names the offending key);
`load_models(...)` loads every enabled model and its level bundles. A level whose bundle is
missing, corrupt, or made for another schedule / model is disabled with a logged warning:
start-up never fails because of a bundle (that level still serves the training-free methods).

The file format is documented in `deploy/models.toml` itself and in docs/PRODUCTION.md.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lesa_core
from lesa_core.production.backend import (
    FAMILIES,
    BackendOptions,
    DiffusersBackend,
    as_dtype,
    require_device,
    resolve_device,
    unknown_call_arguments,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "deploy" / "models.toml"
CONFIG_ENV = "LESA_MODELS_CONFIG"  # path of the config file, overriding the default
WEIGHTS_ENV = "LESA_WEIGHTS_DIR"  # overrides `weights_root` (the containers mount the weights tree at /models)
BACKENDS = ("diffusers", "digits")

_MODEL_KEYS = {
    "backend", "source", "pipeline", "enabled", "sizes", "num_frames", "fps", "default_steps",
    "default_guidance", "min_steps", "max_steps", "max_batch_pixels", "dtype", "device", "revision",
    "variant", "cpu_offload", "vae_tiling", "vae_dtype", "negative_prompt", "guidance_arg", "call_kwargs",
    "levels", "levels_dir", "description", "scheduler_config", "created",
}  # fmt: skip


class ConfigError(ValueError):
    """The model config file is malformed: the message names the file and the key."""


@dataclass
class ModelConfig:
    """One `[models.NAME]` table."""

    name: str
    backend: str  # "diffusers" (a stock pipeline) | "digits" (a lesa_models reference model)
    source: str  # HF id or local path (diffusers); model name or pipeline directory (digits)
    pipeline: str | None = None  # diffusers pipeline class
    enabled: bool | str = True  # true | false | "gpu" (only where CUDA is available)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height)
    num_frames: list[int] = field(default_factory=lambda: [1])
    fps: int | None = None
    default_steps: int = 50
    default_guidance: float | None = None
    min_steps: int = 4
    max_steps: int = 100
    max_batch_pixels: int | None = None
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 on CPU
    device: str | None = None  # default: the loader's device ("auto")
    revision: str | None = None
    variant: str | None = None
    cpu_offload: bool = False
    vae_tiling: bool = False
    vae_dtype: str | None = None
    negative_prompt: str | None = None
    guidance_arg: str | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. Wan's flow_shift
    levels: dict[str, Path] = field(default_factory=dict)  # level -> bundle directory
    levels_dir: Path | None = None  # a directory of <level>/ bundles (as `lesa train-predictor` lays them out)
    description: str = ""
    # Unix seconds GET /v1/models reports as `created`: fixed by the file, so every replica and
    # restart says the same (0 where the file names none).
    created: int = 0

    def enabled_on(self, device: str) -> bool:
        if self.enabled == "gpu":  # a node with CUDA, whatever this entry's own `device` asks for
            return torch.device(device).type == "cuda" and torch.cuda.is_available()
        return bool(self.enabled)

    def bundle_paths(self) -> dict[str, Path]:
        """Explicit `levels` entries win over what `levels_dir` holds."""
        paths: dict[str, Path] = {}
        if self.levels_dir is not None and self.levels_dir.is_dir():
            for child in sorted(self.levels_dir.iterdir()):
                if child.is_dir():
                    paths[child.name] = child
        paths.update(self.levels)
        return paths


@dataclass
class ModelsConfig:
    path: Path
    weights_root: Path
    models: dict[str, ModelConfig]


@dataclass
class ServedModel:
    """A loaded model: the pipeline (call contract of `DigitsPipeline`) and its usable bundles."""

    name: str
    config: ModelConfig
    pipe: Any
    bundles: dict[str, lesa_core.StagePredictor]  # level -> predictor; only bundles that loaded and fit


def config_path(path: str | Path | None = None) -> Path:
    if path is not None:
        return Path(path)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def read_config(path: str | Path | None = None, weights_root: str | Path | None = None) -> ModelsConfig:
    """Parse and check the file; `weights_root` (e.g. the service's LESA_WEIGHTS_DIR setting) wins over the file."""
    path = config_path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: model config file not found (set {CONFIG_ENV} to the right file)") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from error
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; known: defaults, models")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - {"weights_root"}:
        raise ConfigError(f"{path}: [defaults] takes only weights_root, got {defaults!r}")
    # The same tree the service reads (LESA_WEIGHTS_DIR): one folder per model, bundles in <model>/predictors/.
    root_text = weights_root or os.environ.get(WEIGHTS_ENV) or defaults.get("weights_root", ".")
    weights_root = _resolve(path.parent, str(root_text))
    tables = data.get("models", {})
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{path}: no [models.NAME] tables")
    models = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [models.{name}] must be a table, got {table!r}")
        try:
            models[name] = _model(path, weights_root, name, table)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError) as error:  # a value of the wrong type somewhere
            raise ConfigError(f"{path}: [models.{name}]: a value has the wrong type ({error})") from None
    return ModelsConfig(path=path, weights_root=weights_root, models=models)


# Value types of the optional keys (checked: a value of the wrong type otherwise fails far from
# the file, unnamed). Counts must also be at least 1.
_COUNT_KEYS = ("fps", "default_steps", "min_steps", "max_steps", "max_batch_pixels")
_TEXT_KEYS = ("dtype", "device", "revision", "variant", "vae_dtype", "negative_prompt", "guidance_arg", "description",
              "levels_dir", "source", "pipeline", "backend")  # fmt: skip
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(_COUNT_KEYS, (int,)),
    **dict.fromkeys(_TEXT_KEYS, (str,)),
    **dict.fromkeys(("cpu_offload", "vae_tiling"), (bool,)),
    **dict.fromkeys(("call_kwargs", "scheduler_config", "levels"), (dict,)),
    **dict.fromkeys(("sizes", "num_frames"), (list,)),
    "default_guidance": (int, float),
}


def _created(where: str, value: Any) -> int:
    """`created`: a TOML date (2024-08-01), a date-time (UTC unless it says otherwise) or Unix seconds."""
    if isinstance(value, datetime.datetime):
        return int((value if value.tzinfo else value.replace(tzinfo=datetime.UTC)).timestamp())
    if isinstance(value, datetime.date):
        return int(datetime.datetime.combine(value, datetime.time(), datetime.UTC).timestamp())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigError(f"{where}.created: expected a date (2024-08-01), a date-time or Unix seconds >= 0, got {value!r}")


def _model(path: Path, weights_root: Path, name: str, table: dict[str, Any]) -> ModelConfig:
    where = f"{path}: [models.{name}]"
    unknown = set(table) - _MODEL_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_MODEL_KEYS)}")
    for key, types in _KEY_TYPES.items():
        value = table.get(key)
        if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            names = " or ".join("number" if t is float else t.__name__ for t in types)
            raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")
        if key in _COUNT_KEYS and value is not None and value < 1:
            raise ConfigError(f"{where}.{key}: must be at least 1, got {value}")
    backend = table.get("backend", "diffusers")
    if backend not in BACKENDS:
        raise ConfigError(f"{where}.backend: {backend!r} is not one of {BACKENDS}")
    if "source" not in table:
        raise ConfigError(f"{where}.source: required (Hugging Face id, local path, or reference model name)")
    pipeline = table.get("pipeline")
    if backend == "diffusers" and pipeline not in FAMILIES:
        raise ConfigError(f"{where}.pipeline: {pipeline!r} is not one of {', '.join(FAMILIES)}")
    enabled = table.get("enabled", True)
    if not (isinstance(enabled, bool) or enabled == "gpu"):  # (1 == True would pass `in`)
        raise ConfigError(f'{where}.enabled: use true, false or "gpu", got {enabled!r}')
    if table.get("device") not in (None, "", "auto"):  # "" and "auto": the loader's choice
        # A typo here is a config mistake, not a node without this model's weights: refused at
        # start, where load_models would otherwise skip the model with a warning.
        try:
            torch.device(table["device"])
        except RuntimeError as error:
            raise ConfigError(f'{where}.device: {table["device"]!r} is not a torch device ("cuda", "cuda:1", "cpu"): '
                              f"{error}") from None  # fmt: skip
    for key in ("dtype", "vae_dtype"):
        if table.get(key) is not None:
            try:
                as_dtype(table[key])
            except ValueError as error:
                raise ConfigError(f"{where}.{key}: {error}") from None
    guidance = table.get("default_guidance")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"{where}.default_guidance: must be a finite number >= 0, got {guidance}")
    try:
        sizes = [(int(w), int(h)) for w, h in table.get("sizes", [])]
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}.sizes: a list of [width, height] pairs ({error})") from error
    if any(w < 1 or h < 1 for w, h in sizes):
        raise ConfigError(f"{where}.sizes: widths and heights must be at least 1, got {table['sizes']}")
    if "num_frames" in table and (not table["num_frames"] or any(int(f) < 1 for f in table["num_frames"])):
        raise ConfigError(f"{where}.num_frames: one or more frame counts of at least 1, got {table['num_frames']}")
    if backend == "diffusers" and not sizes:
        raise ConfigError(f"{where}.sizes: required for a diffusers model")
    created = _created(where, table.get("created", 0))
    levels: dict[str, Path] = {}
    for level, bundle in table.get("levels", {}).items():
        levels[str(level)] = _resolve(weights_root, str(bundle))
    source = str(table["source"])
    if source.startswith((".", "/", "~")):
        source = str(_resolve(path.parent, source))  # a local directory, relative to this file (either backend)
    kwargs = {k: table[k] for k in (
        "fps", "default_steps", "default_guidance", "min_steps", "max_steps", "max_batch_pixels", "dtype", "device",
        "revision", "variant", "cpu_offload", "vae_tiling", "vae_dtype", "negative_prompt", "guidance_arg",
        "call_kwargs", "description", "scheduler_config",
    ) if k in table}  # fmt: skip
    config = ModelConfig(
        name=name,
        backend=backend,
        source=source,
        pipeline=pipeline,
        enabled=enabled,
        sizes=sizes,
        num_frames=[int(f) for f in table.get("num_frames", [1])],
        levels=levels,
        levels_dir=_resolve(weights_root, str(table["levels_dir"])) if "levels_dir" in table else None,
        created=created,
        **kwargs,
    )
    if backend == "diffusers":
        # The four pipelines need sides divisible by 16 (VAE /8, then 2x2 patches) and, for video,
        # 4k + 1 frames (VAE /4 in time); other values are silently rounded by diffusers, which
        # would hand users another size than they asked for.
        odd = [f"{w}x{h}" for w, h in sizes if w % 16 or h % 16]
        if odd:
            raise ConfigError(f"{where}.sizes: {odd} are not multiples of 16")
        family = FAMILIES[str(pipeline)]
        if family.kind == "video":
            bad = [f for f in config.num_frames if (f - 1) % family.num_frames_multiple]
            if bad:
                raise ConfigError(f"{where}.num_frames: {bad} are not {family.num_frames_multiple}k + 1")
    if not config.min_steps <= config.default_steps <= config.max_steps:
        raise ConfigError(
            f"{where}.default_steps: {config.default_steps} is outside {config.min_steps}..{config.max_steps}"
        )
    return config


def _resolve(base: Path, text: str) -> Path:
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else (base / path).resolve()


def digits_source(config: ModelConfig, root: Path | None) -> str | Path:
    """What a `backend = "digits"` entry loads: the weights tree's copy (`root/<source>`, what
    LESA_WEIGHTS_DIR / the container's /models holds), else the package's reference model of that
    name, else a pipeline directory. Anything else is the file's mistake, not this node's, so a
    ConfigError (load_models and the API's catalogue stop on it rather than skip the model)."""
    from lesa_models import MODEL_NAMES
    from lesa_models.pipeline import MODEL_INDEX

    if root is not None and config.source and (root / config.source / MODEL_INDEX).is_file():
        return root / config.source
    if config.source in MODEL_NAMES:
        return config.source
    if config.source and (Path(config.source) / MODEL_INDEX).is_file():
        return Path(config.source)
    raise ConfigError(f"[models.{config.name}].source: {config.source!r} is not a reference model "
                      f"({', '.join(MODEL_NAMES)}) nor a pipeline directory (with {MODEL_INDEX})")  # fmt: skip


def build_pipeline(
    config: ModelConfig, device: str = "auto", dtype: str | None = None, root: Path | None = None
) -> Any:
    """The pipeline object for one model entry (no bundles); `root`: the config's weights_root."""
    device = resolve_device(config.device or device)
    require_device(device)
    if config.backend == "digits":
        import lesa_models

        wanted = as_dtype(config.dtype or dtype) or (torch.bfloat16 if torch.device(device).type == "cuda" else None)
        if torch.device(device).type == "cpu" and wanted in (None, torch.float32):
            return lesa_models.load_pipeline(digits_source(config, root))  # as loaded: the process's shared copy
        # Moved: a copy of its own, or every other user of the shared one would be moved too.
        return lesa_models.load_pipeline(digits_source(config, root), shared=False).to(device, wanted)
    unknown = unknown_call_arguments(str(config.pipeline), [*config.call_kwargs, *filter(None, [config.guidance_arg])])
    if unknown:
        key = "guidance_arg" if config.guidance_arg in unknown else "call_kwargs"
        raise ConfigError(f"[models.{config.name}].{key}: {config.pipeline} takes no argument(s) {unknown}")
    options = BackendOptions(
        name=config.name,
        sizes=config.sizes,
        num_frames=config.num_frames,
        fps=config.fps,
        default_steps=config.default_steps,
        default_guidance=config.default_guidance,
        min_steps=config.min_steps,
        max_steps=config.max_steps,
        max_batch_pixels=config.max_batch_pixels,
        negative_prompt=config.negative_prompt,
        guidance_arg=config.guidance_arg,
        call_kwargs=dict(config.call_kwargs),
    )
    return DiffusersBackend.from_pretrained(
        config.source, config.pipeline or "", options, device=device, dtype=config.dtype or dtype,
        revision=config.revision, variant=config.variant, cpu_offload=config.cpu_offload,
        vae_tiling=config.vae_tiling, vae_dtype=config.vae_dtype, scheduler_config=config.scheduler_config,
    )  # fmt: skip


def load_bundles(config: ModelConfig, info: Any) -> dict[str, lesa_core.StagePredictor]:
    """Every level bundle of `config` that loads and fits the model; the others are warned about."""
    bundles: dict[str, lesa_core.StagePredictor] = {}
    family = getattr(info, "transformer_class", None)
    hidden_size = getattr(info, "hidden_size", None)
    if config.levels_dir is not None and not config.levels_dir.is_dir():
        logger.warning("model %s: levels_dir %s is not a directory: no LESA bundle, every level runs "
                       "training-free (check weights_root / LESA_WEIGHTS_DIR)", config.name, config.levels_dir)  # fmt: skip
    for level, path in config.bundle_paths().items():
        if level not in lesa_core.LEVELS or level == "none":
            logger.warning("model %s: %r is not an acceleration level (%s); bundle %s skipped", config.name, level,
                           ", ".join(n for n in lesa_core.LEVELS if n != "none"), path)  # fmt: skip
            continue
        try:
            predictor = lesa_core.StagePredictor.from_pretrained(path)
            # The bundle must be the level's schedule at the step count it was trained for, and
            # made on this transformer family and width.
            expected = lesa_core.level_schedule(level, predictor.schedule.num_steps)
            predictor.check_compatible(expected, family, hidden_size)
        except lesa_core.BundleError as error:
            logger.warning("model %s: level %s disabled for LESA (training-free methods still serve it): %s",
                           config.name, level, error)  # fmt: skip
            continue
        bundles[level] = predictor
    return bundles


def load_models(
    path: str | Path | ModelsConfig | None = None,
    names: list[str] | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
    weights_root: str | Path | None = None,
) -> dict[str, ServedModel]:
    """Load the models of the config file: `names` (in that order), or every model enabled here.

    `path` may be a config already read (`read_config`), whose weights root then holds.
    An explicitly named model that is disabled in the file still loads (the operator asked for
    it); a "gpu" model named on a machine without CUDA is a clear error instead of a 50 GB
    download that cannot run.
    """
    if isinstance(path, ModelsConfig) and weights_root is not None:
        raise ValueError("weights_root is read with the config: pass it to read_config, not with a read config")
    config = path if isinstance(path, ModelsConfig) else read_config(path, weights_root)
    device = resolve_device(device)
    require_device(device)  # the node's device (LESA_DEVICE): every model would fail on it
    if names:
        unknown = [n for n in names if n not in config.models]
        if unknown:
            raise ConfigError(f"{config.path}: unknown model(s) {unknown}; configured: {', '.join(config.models)}")
        chosen = [config.models[n] for n in names]
        for model in chosen:
            if model.enabled == "gpu" and torch.device(resolve_device(model.device or device)).type != "cuda":
                raise ConfigError(f'model {model.name} needs a CUDA GPU (enabled = "gpu") and this node has none')
    else:
        chosen = [m for m in config.models.values() if m.enabled_on(resolve_device(m.device or device))]
    served: dict[str, ServedModel] = {}
    for model in chosen:
        try:
            pipe = build_pipeline(model, device, dtype, config.weights_root)
        except ConfigError:
            raise  # the file is wrong, not this node: serving the others would hide it
        except (OSError, ValueError, RuntimeError) as error:
            if names:
                raise  # asked for by name: the operator must see why it cannot serve
            # Enabled by the file but not loadable here (weights not in the HF cache, too little
            # GPU memory for every model at once): the node serves the others.
            logger.warning("model %s (%s) not served: %s", model.name, model.source, error)
            continue
        bundles = load_bundles(model, pipe.info)
        served[model.name] = ServedModel(model.name, model, pipe, bundles)
        logger.info("model %s (%s) ready; LESA levels: %s", model.name, model.source,
                    ", ".join(sorted(bundles)) or "none")  # fmt: skip
    return served
