"""Training and evaluation data: sklearn's bundled 8x8 digits, captioned, and procedural moving-digit clips.

Everything is generated from `sklearn.datasets.load_digits` (shipped inside scikit-learn, no download),
so the recipe is reproducible offline. The digits are split once, with a fixed seed, into the part the
generators train on and a held-out part that only the evaluator's classifier sees: the quality judge
never shares images with the models it judges.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 0
HOLDOUT_FRACTION = 1 / 3

# Stroke and size attributes are rendered, so the text carries information beyond the digit class.
STROKE_WORDS = {"thick": ("bold", "thick"), "thin": ("thin", "light")}
SIZE_WORDS = {"small": ("small", "tiny")}

IMAGE_TEMPLATES = (
    "a {a}handwritten {word}",
    "the {a}number {d}",
    "{a}digit {d}",
    "a {a}{word}",
    "the {a}digit {word}",
    "an image of a {a}{d}",
)

# Direction name -> (dx, dy) in pixels per frame (y grows downwards) and the phrases used in captions.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up-left": (-1, -1),
    "up-right": (1, -1),
    "down-left": (-1, 1),
    "down-right": (1, 1),
}
DIRECTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left", "left", "leftwards"),
    "right": ("to the right", "right", "rightwards"),
    "up": ("up", "upwards"),
    "down": ("down", "downwards"),
    "up-left": ("up and to the left", "to the upper left", "diagonally up-left"),
    "up-right": ("up and to the right", "to the upper right", "diagonally up-right"),
    "down-left": ("down and to the left", "to the lower left", "diagonally down-left"),
    "down-right": ("down and to the right", "to the lower right", "diagonally down-right"),
}
VIDEO_TEMPLATES = (
    "digit {d} moving {p}",
    "a {word} moving {p}",
    "the number {d} moves {p}",
    "a handwritten {word} sliding {p}",
)

VIDEO_FRAMES = 8
VIDEO_SIZE = 16  # canvas; the 8x8 digit moves one pixel per frame
DIGIT_SIZE = 8


@dataclass(frozen=True)
class DigitSplit:
    images: np.ndarray  # [N, 8, 8] float32 in [0, 1]
    labels: np.ndarray  # [N] int64


@lru_cache(maxsize=1)
def digit_splits() -> tuple[DigitSplit, DigitSplit]:
    """(generator-training split, held-out evaluator split), stratified and fixed by SPLIT_SEED."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    tr_x, ho_x, tr_y, ho_y = train_test_split(
        images, labels, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return DigitSplit(tr_x, tr_y), DigitSplit(ho_x, ho_y)


# ---------------------------------------------------------------------------------------------- images


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, h, w] -> [N, size, size], bilinear (smooth strokes rather than 4x4 blocks)."""
    return F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def render_images(images8: torch.Tensor, size: int, strokes: list[str | None], sizes: list[str | None]) -> torch.Tensor:
    """Render 8x8 digits at `size` with per-sample stroke (thick/thin/None) and size (small/None)."""
    out = upsample(images8, size).clamp(0, 1)
    k = 3  # dilation kernel in pixels: one pixel of extra stroke on each side
    thick = F.max_pool2d(out[:, None], k, stride=1, padding=k // 2)[:, 0]
    thin = ((out - 0.45) / 0.55).clamp(0, 1) ** 1.5
    for i, stroke in enumerate(strokes):
        if stroke == "thick":
            out[i] = thick[i]
        elif stroke == "thin":
            out[i] = thin[i]
    for i, sz in enumerate(sizes):
        if sz == "small":
            small = size * 5 // 8
            shrunk = F.interpolate(out[i][None, None], size=(small, small), mode="bilinear", align_corners=False)
            canvas = torch.zeros(size, size)
            o = (size - small) // 2
            canvas[o : o + small, o : o + small] = shrunk[0, 0]
            out[i] = canvas
    return out.clamp(0, 1)


def image_caption(digit: int, stroke: str | None, size: str | None, rng: random.Random) -> str:
    words = []
    if size is not None:
        words.append(rng.choice(SIZE_WORDS[size]))
    if stroke is not None:
        words.append(rng.choice(STROKE_WORDS[stroke]))
    adj = "".join(w + " " for w in words)
    template = rng.choice(IMAGE_TEMPLATES)
    return template.format(a=adj, d=digit, word=DIGIT_WORDS[digit])


def all_image_captions() -> list[str]:
    """Every caption the image sampler can produce (used to pre-encode text once per training run)."""
    captions: set[str] = set()
    adjs = [""]
    for stroke_words in STROKE_WORDS.values():
        adjs += [w + " " for w in stroke_words]
    adjs += [s + " " + a for s in SIZE_WORDS["small"] for a in adjs]
    for template in IMAGE_TEMPLATES:
        for d in range(10):
            for a in adjs:
                captions.add(template.format(a=a, d=d, word=DIGIT_WORDS[d]))
    return sorted(captions)


def sample_image_batch(
    split: DigitSplit, batch: int, size: int, rng: random.Random
) -> tuple[torch.Tensor, list[str], list[int]]:
    """A random captioned batch: images [B, size, size] in [0, 1], captions, digit labels."""
    idx = [rng.randrange(len(split.labels)) for _ in range(batch)]
    strokes = [rng.choice((None, None, "thick", "thin")) for _ in idx]
    sizes = [rng.choice((None, None, None, "small")) for _ in idx]
    images = render_images(torch.from_numpy(split.images[idx]), size, strokes, sizes)
    labels = [int(split.labels[i]) for i in idx]
    captions = [image_caption(lab, st, sz, rng) for lab, st, sz in zip(labels, strokes, sizes, strict=True)]
    return images, captions, labels


# ---------------------------------------------------------------------------------------------- videos


def soften(clip: np.ndarray) -> np.ndarray:
    """Binomial [1, 2, 1] / 4 blur of every frame (edges padded with zeros), peak kept.

    The raw 8x8 digits are sharp at the canvas' pixel scale: the small video model then spends its
    budget on speckle. A softened stroke is what the evaluator compares against anyway (it reads
    bilinear-upsampled crops).
    """
    padded = np.pad(clip, ((0, 0), (1, 1), (1, 1)))
    rows = 0.25 * padded[:, :-2] + 0.5 * padded[:, 1:-1] + 0.25 * padded[:, 2:]
    out = 0.25 * rows[:, :, :-2] + 0.5 * rows[:, :, 1:-1] + 0.25 * rows[:, :, 2:]
    return np.clip(out / out.max(initial=1e-6) * clip.max(initial=0.0), 0.0, 1.0).astype(np.float32)


def render_clip(digit8: np.ndarray, direction: str, start: tuple[int, int], frames: int = VIDEO_FRAMES) -> np.ndarray:
    """Paste an 8x8 digit on a 16x16 canvas at `start` (x, y), moving one pixel per frame."""
    dx, dy = DIRECTIONS[direction]
    clip = np.zeros((frames, VIDEO_SIZE, VIDEO_SIZE), np.float32)
    x, y = start
    for f in range(frames):
        px, py = x + dx * f, y + dy * f
        clip[f, py : py + DIGIT_SIZE, px : px + DIGIT_SIZE] = digit8
    return clip


def random_start(
    direction: str, rng: random.Random, frames: int = VIDEO_FRAMES, centred: bool = False
) -> tuple[int, int]:
    """A start position keeping the whole track inside the canvas.

    `centred` keeps a still axis within one pixel of the canvas centre: every direction then has
    (nearly) one track, which the small video model learns several times faster.
    """
    dx, dy = DIRECTIONS[direction]
    span = VIDEO_SIZE - DIGIT_SIZE  # positions 0..span
    travel = frames - 1

    def axis(d: int) -> int:
        if d > 0:
            return rng.randint(0, span - travel)
        if d < 0:
            return rng.randint(travel, span)
        if centred:
            return rng.randint(span // 2 - 1, span // 2 + 1)
        return rng.randint(0, span)

    return axis(dx), axis(dy)


def video_caption(digit: int, direction: str, rng: random.Random) -> str:
    template = rng.choice(VIDEO_TEMPLATES)
    return template.format(d=digit, word=DIGIT_WORDS[digit], p=rng.choice(DIRECTION_PHRASES[direction]))


def all_video_captions() -> list[str]:
    captions = {
        t.format(d=d, word=DIGIT_WORDS[d], p=p)
        for t in VIDEO_TEMPLATES
        for d in range(10)
        for phrases in DIRECTION_PHRASES.values()
        for p in phrases
    }
    return sorted(captions)


def sample_video_batch(
    split: DigitSplit, batch: int, rng: random.Random, centred: bool = False, soft: bool = False
) -> tuple[torch.Tensor, list[str], list[int], list[str]]:
    """Clips [B, F, 16, 16] in [0, 1], captions, digit labels, direction names."""
    clips, captions, labels, directions = [], [], [], []
    names = list(DIRECTIONS)
    for _ in range(batch):
        i = rng.randrange(len(split.labels))
        direction = rng.choice(names)
        clip = render_clip(split.images[i], direction, random_start(direction, rng, centred=centred))
        clips.append(soften(clip) if soft else clip)
        labels.append(int(split.labels[i]))
        directions.append(direction)
        captions.append(video_caption(labels[-1], direction, rng))
    return torch.from_numpy(np.stack(clips)), captions, labels, directions
