"""Target images from outside: uploads, checked and brought to the model's resolution.

An upload is untrusted bytes. :func:`prepare_upload` refuses more than ``max_bytes``, refuses
images over ``max_pixels`` *before* decoding them (PIL reads the size from the header, so a
decompression bomb is never expanded), converts any mode to RGB on white (as the dataset
loader does) and pads to a square on white before resizing, so nothing is cropped away.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dtrak_core.datasets.imagefolder import MAX_PIXELS, decompression_bomb_message, pillow_bomb_pixels

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = MAX_PIXELS  # the dataset loader's limit: one place


class TargetError(ValueError):
    """An uploaded target is not usable; the message says why."""


@dataclass(frozen=True)
class PreparedTarget:
    """``image``: uint8 (size, size, 3); ``note``: what was done to it, in words."""

    image: np.ndarray
    note: str
    original_size: tuple[int, int]


def prepare_upload(data: bytes, size: int, name: str = "upload", max_bytes: int = MAX_UPLOAD_BYTES,
                   max_pixels: int = MAX_UPLOAD_PIXELS) -> PreparedTarget:
    """Decode uploaded bytes into an RGB image of ``size`` x ``size``."""
    if size < 1:
        raise TargetError(f"target size {size} must be at least 1 pixel")
    if len(data) == 0:
        raise TargetError(f"{name} is empty; expected an image file (PNG, JPEG, ...)")
    if len(data) > max_bytes:
        raise TargetError(f"{name} is {len(data) / 2**20:.1f} MiB; at most {max_bytes / 2**20:.0f} MiB is accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours is the error that explains
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise TargetError(decompression_bomb_message(name, width * height, max_pixels, (width, height)))
                image.load()
                if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                    rgba = image.convert("RGBA")
                    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
                else:
                    rgb = image.convert("RGB")
    except TargetError:
        raise
    except Image.DecompressionBombError as error:  # over Pillow's own limit: refused before we see the size
        raise TargetError(decompression_bomb_message(name, pillow_bomb_pixels(error), max_pixels)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise TargetError(f"{name} is not a readable image ({type(error).__name__}); expected PNG, JPEG, "
                          "GIF, WebP or BMP") from None
    notes = []
    if width != height:
        side = max(width, height)
        square = Image.new("RGB", (side, side), "white")
        square.paste(rgb, ((side - width) // 2, (side - height) // 2))
        rgb = square
        notes.append(f"padded to {side}x{side} on white")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
        notes.append(f"resized to {size}x{size}, the model's resolution")
    note = f"{name} ({width}x{height})" + (": " + ", ".join(notes) if notes else ": used as is")
    return PreparedTarget(np.asarray(rgb, dtype=np.uint8), note, (width, height))
