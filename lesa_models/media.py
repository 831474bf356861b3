"""Encoding samples for people: PNG/JPEG/WEBP stills, MP4/GIF clips, clip thumbnails, grids.

Samples are float arrays in [0, 1] ([H, W] images, [F, H, W] clips) at the models' tiny native
resolution; `scale` enlarges them with nearest-neighbour so a 32x32 digit is viewable in a browser
without blurring the pixels the model actually produced.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
from PIL import Image

IMAGE_FORMATS = ("png", "jpeg", "webp")
VIDEO_FORMATS = ("mp4", "gif")


def to_uint8(sample: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(sample, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _enlarge(frame: np.ndarray, scale: int) -> Image.Image:
    img = Image.fromarray(to_uint8(frame), mode="L")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def image_bytes(sample: np.ndarray, fmt: str = "png", scale: int = 1, quality: int | None = None) -> bytes:
    """Encode one still [H, W] as PNG, JPEG or WEBP. `quality` (0-100) sets JPEG's and WEBP's
    quality; by default JPEG 95 and WEBP lossless (the images are tiny), as WEBP at 100."""
    fmt = fmt.lower().replace("jpg", "jpeg")
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    buf = io.BytesIO()
    img = _enlarge(sample, scale)
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=95 if quality is None else quality)
    elif fmt == "webp":
        lossless = quality is None or quality >= 100
        img.save(buf, format="WEBP", **({"lossless": True} if lossless else {"quality": quality}))
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes(clip: np.ndarray, fps: int = 8, scale: int = 8) -> bytes:
    """Looping GIF of a clip [F, H, W]."""
    frames = [_enlarge(f, scale) for f in clip]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def mp4_bytes(clip: np.ndarray, fps: int = 8, scale: int = 16) -> bytes:
    """H.264 MP4 of a clip [F, H, W] through imageio-ffmpeg (yuv420p, so browsers play it).

    The default scale keeps both sides a multiple of 16 for the encoder's macroblocks.
    """
    import imageio.v2 as imageio

    frames = [np.asarray(_enlarge(f, scale).convert("RGB")) for f in clip]
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = imageio.get_writer(
            path,
            format="FFMPEG",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=1,
            output_params=["-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)


def video_bytes(clip: np.ndarray, fmt: str = "mp4", fps: int = 8, scale: int = 16) -> bytes:
    fmt = fmt.lower()
    if fmt == "mp4":
        return mp4_bytes(clip, fps=fps, scale=scale)
    if fmt == "gif":
        return gif_bytes(clip, fps=fps, scale=scale)
    raise ValueError(f"video format must be one of {VIDEO_FORMATS}, got {fmt!r}")


def thumbnail_png(clip: np.ndarray, scale: int = 4) -> bytes:
    """PNG of a clip's middle frame (the poster for a video result)."""
    return image_bytes(np.asarray(clip)[len(clip) // 2], "png", scale=scale)


def grid(samples: np.ndarray, rows: int, pad: int = 1, value: float = 0.25) -> np.ndarray:
    """Tile [N, H, W] stills into rows x ceil(N/rows) with a thin grey border; returns [H', W'] in [0,1]."""
    samples = np.asarray(samples, dtype=np.float32)
    n, h, w = samples.shape
    cols = -(-n // rows)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), value, np.float32)
    for i, s in enumerate(samples):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = s
    return out


def clip_strip(clips: np.ndarray, pad: int = 1) -> np.ndarray:
    """[N, F, H, W] clips -> [F, H', W']: the clips side by side, frame by frame (one animated row each)."""
    clips = np.asarray(clips, dtype=np.float32)
    return np.stack([grid(clips[:, f], rows=1, pad=pad) for f in range(clips.shape[1])])


# Names the service's media module looks up (service/media.py delegates to these when present).
def encode_mp4(frames: np.ndarray, fps: int = 8) -> bytes:
    return mp4_bytes(frames, fps=fps)


def thumbnail(frames: np.ndarray) -> bytes:
    return thumbnail_png(frames)
