"""Given images as a sampler keeps them: a file read into a `Reference`'s pixels and keep mask.

The API's uploads (an edit's image and mask, a variation's image, a video's `input_reference`)
and `lesa generate --image / --mask` read their files here, so both give the sampler the same
pixels. Each reader raises a ValueError whose message starts with the field or file it names.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

EDIT_STRENGTH = 0.6  # an edit without mask or strength: as diffusers' img2img pipelines default
# A variation without strength. On digits-image (benchmarks/bench_variation_strength.py: 10 sources
# x 8 seeds, full compute) unprompted variations keep the source's digit in 99% / 91% / 65% of
# cases at 0.5 / 0.6 / 0.7, and 8 variations of one source differ from each other 1.9x as much as 8
# edits prompted with its digit at the same strength (1.5x as much as those at 0.8).
# benchmarks/bench_edits.py (`variation`, 32 held-out seeds) reads 94% at 0.5.
VARIATION_STRENGTH = 0.5


def edit_strength(strength: float | None, *, masked: bool, prompted: bool = True) -> float:
    """An edit's strength, or its default: 1 with a mask (the transparent part drawn anew),
    `VARIATION_STRENGTH` without a prompt, else `EDIT_STRENGTH`."""
    if strength is not None:
        return strength
    return 1.0 if masked else EDIT_STRENGTH if prompted else VARIATION_STRENGTH


# Decoding checks the size from the header first: a small compressed file may claim a huge canvas.
MAX_UPLOAD_PIXELS = 4096 * 4096


def read_upload(data: bytes, param: str) -> Image.Image:
    """An uploaded file as an image, or ValueError saying why not (the message starts with `param`)."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_UPLOAD_PIXELS:
            raise ValueError(f"{param}: {image.width}x{image.height} is more than {MAX_UPLOAD_PIXELS} pixels")
        image.load()
    except ValueError:
        raise
    except (OSError, Image.DecompressionBombError, SyntaxError):  # what Pillow raises for a file it cannot read
        raise ValueError(f"{param}: not an image Pillow can read (send PNG, JPEG or WEBP)") from None
    return image


def reference_sample(image: Image.Image, width: int, height: int, mode: str = "L") -> np.ndarray:
    """An uploaded image as a sample in [0, 1] of the job's size, in a model's `reference_mode`:
    "L" [height, width] (the reference models are grey), "RGB" [height, width, 3]. Transparency
    is dropped, the pixels underneath kept."""
    converted = image.convert(mode)
    if converted.size != (width, height):
        resample = Image.Resampling.BOX if converted.width >= width else Image.Resampling.BICUBIC
        converted = converted.resize((width, height), resample)
    return np.asarray(converted, dtype=np.float32) / 255.0


def keep_mask(
    mask: Image.Image, image_size: tuple[int, int], width: int, height: int, param: str = "mask"
) -> np.ndarray:
    """OpenAI's edit mask as where to keep the image: bool [height, width], False where the mask is
    fully transparent (the part to edit). A pixel of the job's size whose area is mostly to be
    edited is edited. ValueError if the mask has no alpha channel or another size than the image."""
    if mask.size != image_size:
        raise ValueError(
            f"{param}: {mask.width}x{mask.height} but the image is {image_size[0]}x{image_size[1]}; they must match"
        )
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise ValueError(
            f"{param}: no alpha channel; its fully transparent pixels mark where to edit (send an RGBA PNG)"
        )
    opaque = Image.fromarray(((np.asarray(mask.convert("RGBA"))[..., 3] > 0) * 255).astype(np.uint8), mode="L")
    if opaque.size != (width, height):
        opaque = opaque.resize((width, height), Image.Resampling.BOX)
    return np.asarray(opaque) >= 128
