"""Model names -> committed pipeline directories (package data, so `pip install` carries the weights)."""

from __future__ import annotations

import threading
from pathlib import Path

from lesa_models.pipeline import MODEL_INDEX, DigitsPipeline

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_NAMES: tuple[str, ...] = ("digits-image", "digits-video")

_loaded: dict[str, DigitsPipeline] = {}
_lock = threading.Lock()


def model_path(name: str) -> Path:
    """Directory of a named reference model; ValueError listing the known names otherwise."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return WEIGHTS_DIR / name


def load_pipeline(name_or_path: str | Path, *, shared: bool = True) -> DigitsPipeline:
    """Load `digits-image` / `digits-video` or a pipeline directory.

    With `shared` (the default) a named model is loaded once per process and reused, because the
    service, the CLI and the benchmarks all ask for the same few models.
    """
    text = str(name_or_path)
    if text in MODEL_NAMES:
        with _lock:
            if shared and text in _loaded:
                return _loaded[text]
            pipe = DigitsPipeline.from_pretrained(model_path(text))
            if shared:
                _loaded[text] = pipe
            return pipe
    path = Path(text)
    if (path / MODEL_INDEX).is_file():
        return DigitsPipeline.from_pretrained(path)
    raise ValueError(f"unknown model name {text!r}; known models: {', '.join(MODEL_NAMES)} (or a pipeline directory)")
