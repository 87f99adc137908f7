"""The edits that make a near-duplicate: re-encoded, resized, cropped by a few pixels, flipped.

One module serves two callers: the scorer, which embeds an edited copy of a few images to
calibrate the near-duplicate threshold on the run's own model and data (docs/duplicates.md),
and the demo's contamination generator, which injects such copies to measure the flags.
Every edit is a deterministic function of the image and a numpy Generator.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

EDITS: tuple[str, ...] = ("reencode", "resize", "crop", "flip")
JPEG_QUALITY_RANGE = (55, 80)
RESIZE_RANGE = (0.6, 0.85)  # the copy's side, as a fraction of the original's
CROP_PIXELS = (1, 4)  # pixels cut from each side, at most


def edit_image(image: Image.Image, edit: str, rng: np.random.Generator) -> Image.Image:
    """An edited copy of `image` (RGB): one of EDITS, its strength drawn from `rng`.

    reencode: JPEG at quality 55-80; resize: smaller by 15-40%; crop: 1-4 pixels off each
    side (scaled to the image: at most 1/16 of a side); flip: mirrored left to right.
    """
    rgb = image.convert("RGB")
    width, height = rgb.size
    if edit == "reencode":
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=int(rng.integers(*JPEG_QUALITY_RANGE)))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return decoded.convert("RGB")
    if edit == "resize":
        scale = rng.uniform(*RESIZE_RANGE)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return rgb.resize(size, Image.Resampling.BILINEAR)
    if edit == "crop":
        most = max(1, min(CROP_PIXELS[1], width // 16, height // 16))
        left, top, right, bottom = (int(v) for v in rng.integers(1, most + 1, size=4))
        return rgb.crop((left, top, width - right, height - bottom))
    if edit == "flip":
        return rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")


def edit_pixels(pixels: np.ndarray, edit: str, rng: np.random.Generator) -> np.ndarray:
    """`edit_image` on a uint8 [S, S, 3] model input, brought back to S x S (bicubic)."""
    size = pixels.shape[0]
    edited = edit_image(Image.fromarray(np.ascontiguousarray(pixels)), edit, rng)
    if edited.size != (size, size):
        edited = edited.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(edited, dtype=np.uint8)
