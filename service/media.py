"""Encoding of generated samples (float32 in [0, 1]) into files clients can open.

Samples are grey-scale (`[H, W]`, clips `[F, H, W]`: the reference models) or RGB channels-last
(`[H, W, 3]`, clips `[F, H, W, 3]`: the production diffusers models). Grey samples go through
`lesa_models.media` when it provides an encoder, so the service and the benchmarks write
identical files; RGB and the fallbacks use Pillow and imageio-ffmpeg here.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from typing import Any

import numpy as np
from PIL import Image

_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "mp4": "mp4"}
_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIN_VIDEO_SIDE = 128  # tiny reference clips are upscaled so players show more than a dot


def extension(fmt: str) -> str:
    return _EXTENSIONS[fmt]


def content_type(fmt: str) -> str:
    return _CONTENT_TYPES[fmt]


def _shared(name: str) -> Any:
    try:
        from lesa_models import media
    except ImportError:
        return None
    return getattr(media, name, None)


def to_uint8(sample: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(sample, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _is_rgb(array: np.ndarray, still_ndim: int) -> bool:
    return array.ndim == still_ndim + 1 and array.shape[-1] == 3


def encode_image(sample: np.ndarray, fmt: str = "png", quality: int | None = None) -> bytes:
    """[H, W] or [H, W, 3] float in [0, 1] -> PNG / JPEG / WEBP bytes. `quality` (0-100, a request's
    `output_compression`) sets JPEG's and WEBP's quality; by default JPEG 95, WEBP lossless (as at 100)."""
    rgb = _is_rgb(sample, 2)
    shared = None if rgb else _shared("image_bytes")
    if shared is not None:
        return shared(sample, fmt, quality=quality)
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if fmt == "jpeg":
        options = {"quality": 95 if quality is None else quality}
    elif fmt == "webp":
        options = {"lossless": True} if quality is None or quality >= 100 else {"quality": quality}
    Image.fromarray(to_uint8(sample), mode="RGB" if rgb else "L").save(buffer, format=_PIL_FORMATS[fmt], **options)
    return buffer.getvalue()


def encode_video(frames: np.ndarray, fps: int) -> bytes:
    """[F, H, W] or [F, H, W, 3] float in [0, 1] -> H.264 MP4 bytes playable in browsers (yuv420p)."""
    rgb = _is_rgb(frames, 3)
    shared = None if rgb else _shared("encode_mp4")
    if shared is not None:
        return shared(frames, fps=fps)
    import imageio.v2 as imageio

    pixels = to_uint8(frames)
    if not rgb:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    scale = max(1, MIN_VIDEO_SIDE // max(pixels.shape[1:3]))
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    # ffmpeg writes to a path (it seeks back to put the index first for streaming): use a temp file.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        with imageio.get_writer(
            path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
            macro_block_size=2, output_params=["-movflags", "+faststart"], ffmpeg_log_level="error",
        ) as writer:  # fmt: skip
            for frame in pixels:
                writer.append_data(frame)
        with open(path, "rb") as f:
            return f.read()


# A clip's spritesheet (OpenAI's `variant=spritesheet`): at most this many frames, evenly spaced,
# each scaled to this long side (tiny clips up, nearest; large ones down, bilinear), in rows of 4.
SPRITESHEET_FRAMES = 16
SPRITESHEET_SIDE = 128
SPRITESHEET_COLUMNS = 4


def encode_spritesheet(frames: np.ndarray) -> bytes:
    """PNG of up to 16 evenly spaced frames of a clip ([F, H, W] or [F, H, W, 3]), left to right
    then top to bottom, for scrubbing previews."""
    frames = np.asarray(frames)
    rgb = _is_rgb(frames, 3)
    count = len(frames)
    shown = min(count, SPRITESHEET_FRAMES)
    picks = [round(i * (count - 1) / max(1, shown - 1)) for i in range(shown)]  # first and last included
    height, width = frames.shape[1:3]
    scale = SPRITESHEET_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
    columns = min(len(picks), SPRITESHEET_COLUMNS)
    rows = -(-len(picks) // columns)
    sheet = Image.new("RGB" if rgb else "L", (columns * size[0], rows * size[1]))
    for at, index in enumerate(picks):
        frame = Image.fromarray(to_uint8(frames[index]), mode="RGB" if rgb else "L").resize(size, resample)
        row, column = divmod(at, columns)
        sheet.paste(frame, (column * size[0], row * size[1]))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_thumbnail(frames: np.ndarray) -> bytes:
    """PNG of the middle frame of a clip."""
    shared = None if _is_rgb(frames, 3) else _shared("thumbnail")
    if shared is not None:
        return shared(frames)
    return encode_image(frames[len(frames) // 2], "png")


def sample_png(sample: np.ndarray) -> str:
    """A sample in [0, 1] (grey [H, W] or RGB [H, W, 3]: a reference; a keep mask as 0 / 1) as
    base64 PNG: how a job carries it."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(sample), mode="RGB" if _is_rgb(sample, 2) else "L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_sample(data: str) -> np.ndarray:
    """`sample_png`'s inverse: float32 [H, W] or [H, W, 3] in [0, 1]."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image, dtype=np.float32) / 255.0
