"""The project's own quality judge: a digit classifier and a motion-direction estimator.

The classifier is a tiny CNN trained only on the held-out digits split (the generators never saw
those images), at 16x16. Image samples are resized to 16x16; a video frame is first cropped to the
8x8 window around its centre of mass, which puts the moving digit in the same full-frame pose as a
still image, so one classifier judges both models. Motion is the least-squares slope of the centre of
mass over the frames, binned into the eight compass directions the video captions use.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lesa_models import data

EVALUATOR_DIR = Path(__file__).resolve().parent / "weights" / "evaluator"
INPUT_SIZE = 16
STATIC_SPEED = 0.35  # px/frame below which a clip counts as not moving


class DigitClassifier(nn.Module):
    """Three small conv layers and a linear head on a 16x16 grey image in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 16, 16] -> logits [B, 10]
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.dropout(F.relu(self.fc1(x.flatten(1))), 0.2, self.training))


# ------------------------------------------------------------------------------------- training


def _augmented_batch(split: data.DigitSplit, batch: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out digits with the generators' attributes and softening, up to 2px shifts, contrast jitter."""
    idx = [rng.randrange(len(split.labels)) for _ in range(batch)]
    strokes = [rng.choice((None, None, "thick", "thin")) for _ in idx]
    sizes = [rng.choice((None, None, None, "small")) for _ in idx]
    digits8 = split.images[idx].copy()
    for i in range(batch):  # the video model is trained on softened strokes (data.soften)
        if rng.random() < 0.3:
            digits8[i] = data.soften(digits8[i][None])[0]
    x = data.render_images(torch.from_numpy(digits8), INPUT_SIZE, strokes, sizes)
    out = torch.zeros_like(x)
    for i in range(batch):
        dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
        out[i] = torch.roll(x[i], shifts=(dy, dx), dims=(0, 1))
        out[i] *= rng.uniform(0.7, 1.0)
    return out[:, None], torch.tensor([int(split.labels[i]) for i in idx])


def train_classifier(steps: int = 1500, batch: int = 64, seed: int = 0, output: Path | None = None) -> dict[str, float]:
    """Train on the held-out split, report accuracy on the generators' split, save safetensors."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_split, holdout = data.digit_splits()
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        x, y = _augmented_batch(holdout, batch, rng)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test = data.upsample(torch.from_numpy(train_split.images), INPUT_SIZE)
    with torch.no_grad():
        acc = (model(test[:, None]).argmax(1).numpy() == train_split.labels).mean()
    output = Path(output or EVALUATOR_DIR)
    output.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), output / "classifier.safetensors")
    return {"accuracy_on_generator_split": float(acc)}


@lru_cache(maxsize=1)
def load_classifier() -> DigitClassifier:
    model = DigitClassifier()
    model.load_state_dict(load_file(EVALUATOR_DIR / "classifier.safetensors"))
    return model.eval()


# ------------------------------------------------------------------------------------- judging


def classify_digits(samples: np.ndarray) -> np.ndarray:
    """Digit labels [N] for still images [N, H, W] (or one [H, W]) in [0, 1]."""
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    if x.dim() == 2:
        x = x[None]
    if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
        x = F.interpolate(x[:, None], size=(INPUT_SIZE, INPUT_SIZE), mode="area")[:, 0]
    with torch.no_grad():
        return load_classifier()(x[:, None]).argmax(1).numpy()


def centre_of_mass(frame: np.ndarray) -> tuple[float, float]:
    """(x, y) intensity centroid, ignoring faint background noise; canvas centre if the frame is empty."""
    w = np.clip(frame - 0.2, 0, None)
    total = w.sum()
    if total < 1e-6:
        return (frame.shape[1] - 1) / 2, (frame.shape[0] - 1) / 2
    ys, xs = np.indices(frame.shape)
    return float((w * xs).sum() / total), float((w * ys).sum() / total)


def crop_digit(frame: np.ndarray, size: int = data.DIGIT_SIZE) -> np.ndarray:
    """The size x size window of a clip frame centred on its centre of mass (clamped to the canvas)."""
    cx, cy = centre_of_mass(frame)
    x0 = int(round(cx - (size - 1) / 2))
    y0 = int(round(cy - (size - 1) / 2))
    x0 = min(max(x0, 0), frame.shape[1] - size)
    y0 = min(max(y0, 0), frame.shape[0] - size)
    return frame[y0 : y0 + size, x0 : x0 + size]


def classify_frames(clip: np.ndarray) -> np.ndarray:
    """Digit label per frame [F] of a clip [F, H, W]."""
    crops = np.stack([crop_digit(f) for f in np.asarray(clip, dtype=np.float32)])
    up = data.upsample(torch.from_numpy(crops), INPUT_SIZE).numpy()
    return classify_digits(up)


def motion_direction(clip: np.ndarray) -> str:
    """One of data.DIRECTIONS, or "static", from the slope of the centre-of-mass track."""
    track = np.array([centre_of_mass(f) for f in np.asarray(clip, dtype=np.float32)])
    t = np.arange(len(track)) - (len(track) - 1) / 2
    vx, vy = (t[:, None] * (track - track.mean(0))).sum(0) / (t**2).sum()
    if np.hypot(vx, vy) < STATIC_SPEED:
        return "static"
    angle = np.degrees(np.arctan2(-vy, vx)) % 360  # counter-clockwise from "right", y up
    sectors = ["right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right"]
    return sectors[int(((angle + 22.5) % 360) // 45)]


_DIGIT_RE = re.compile(r"\b(" + "|".join(data.DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def parse_prompt_digit(prompt: str) -> int | None:
    """The digit a prompt asks for ("a bold seven", "digit 7"), or None."""
    m = _DIGIT_RE.search(prompt)
    if m is None:
        return None
    token = m.group(1).lower()
    return int(token) if token.isdigit() else data.DIGIT_WORDS.index(token)


def parse_prompt_direction(prompt: str) -> str | None:
    """The motion a prompt asks for, as a data.DIRECTIONS name, or None."""
    text = prompt.lower()
    up = re.search(r"\b(up|upwards?|upper)\b", text) is not None
    down = re.search(r"\b(down|downwards?|lower)\b", text) is not None
    left = re.search(r"\b(left|leftwards?)\b", text) is not None
    right = re.search(r"\b(right|rightwards?)\b", text) is not None
    vertical = "up" if up and not down else "down" if down and not up else ""
    horizontal = "left" if left and not right else "right" if right and not left else ""
    name = "-".join(p for p in (vertical, horizontal) if p)
    return name or None


# ------------------------------------------------------------------------------------ model eval


@dataclass
class EvalResult:
    model: str
    samples: int
    digit_accuracy: float  # image: share of samples; video: share of frames
    direction_accuracy: float | None
    steps: int
    guidance: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


EVAL_SEED_OFFSET = 10_000  # training draws its noise from torch's global RNG, never from these seeds


def eval_prompts(kind: str, per_class: int) -> list[str]:
    """Fixed evaluation prompts: every digit (and, for video, every direction), varied wording."""
    prompts = []
    if kind == "image":
        for d in range(10):
            for k in range(per_class):
                template = data.IMAGE_TEMPLATES[k % len(data.IMAGE_TEMPLATES)]
                prompts.append(template.format(a="", d=d, word=data.DIGIT_WORDS[d]))
    else:
        names = list(data.DIRECTIONS)
        for d in range(10):
            for k in range(per_class):
                direction = names[(d + k) % len(names)]
                template = data.VIDEO_TEMPLATES[k % len(data.VIDEO_TEMPLATES)]
                phrase = data.DIRECTION_PHRASES[direction][0]
                prompts.append(template.format(d=d, word=data.DIGIT_WORDS[d], p=phrase))
    return prompts


def evaluate_pipeline(
    pipe: Any,
    *,
    per_class: int = 10,
    steps: int = 50,
    guidance: float | None = None,
    batch_size: int = 20,
    seed_offset: int = EVAL_SEED_OFFSET,
    cache: Any = None,
) -> tuple[EvalResult, np.ndarray, list[str]]:
    """Generate the evaluation prompts and judge them; returns (result, samples, prompts)."""
    import time

    prompts = eval_prompts(pipe.kind, per_class)
    width, height = pipe.sizes[0]
    guidance = pipe.default_guidance if guidance is None else guidance
    started = time.perf_counter()
    chunks = []
    for i in range(0, len(prompts), batch_size):
        part = prompts[i : i + batch_size]
        seeds = [seed_offset + i + j for j in range(len(part))]
        out = pipe(
            part,
            seeds=seeds,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            cache=cache,
        )
        chunks.append(out.samples)
    samples = np.concatenate(chunks)
    wanted = np.array([parse_prompt_digit(p) for p in prompts])
    direction_acc = None
    if pipe.kind == "image":
        digit_acc = float((classify_digits(samples) == wanted).mean())
    else:
        frame_hits = [(classify_frames(clip) == w).mean() for clip, w in zip(samples, wanted, strict=True)]
        digit_acc = float(np.mean(frame_hits))
        dirs = [motion_direction(clip) == parse_prompt_direction(p) for clip, p in zip(samples, prompts, strict=True)]
        direction_acc = float(np.mean(dirs))
    result = EvalResult(
        pipe.name, len(prompts), digit_acc, direction_acc, steps, float(guidance), time.perf_counter() - started
    )
    return result, samples, prompts
