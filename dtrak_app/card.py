"""The attribution card: one PNG with the target and its top proponents, named, with their
relative strength and artist, under a line saying what produced it (model, method, K, k,
lambda and its source, date).

Drawn with PIL only. Pixel art stays crisp: every image is upscaled with nearest neighbour
by an integer factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)


@dataclass(frozen=True)
class CardEntry:
    """One proponent on the card: ``image`` uint8 (H, W, 3), its rank, score, artist and file;
    ``name`` what people call it (default: the file name); ``strength`` its score as a share of
    the strongest (shown instead of the raw score when given)."""

    image: np.ndarray
    rank: int
    score: float
    artist: str | None
    file_name: str
    name: str | None = None
    strength: float | None = None

    def score_text(self) -> str:
        return f"{self.strength:.0%}" if self.strength is not None else f"{self.score:+.3g}"


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit(text: str, chars: int = 20) -> str:
    """``text`` cut to ``chars`` characters under a tile, with ".." where it was cut."""
    return text if len(text) <= chars else text[:chars - 2] + ".."


def upscale(image: np.ndarray, side: int) -> Image.Image:
    """Nearest-neighbour upscale of an (H, W, 3) uint8 image by an integer factor to about
    ``side`` px: crisp pixels, no blur (the card's tiles and the app's pictures)."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    factor = max(1, side // max(picture.size))
    return picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)


def render_card(target: np.ndarray, entries: Sequence[CardEntry], title: str, subtitle: str = "",
                tile: int = 128, columns: int = 5) -> Image.Image:
    """A PNG-ready RGB card.

    Layout: the title and subtitle on top; the target (2 x ``tile``) on the left; the entries in
    a grid of ``columns`` on the right, each with its name, "#rank strength" (or score) and its
    artist below it.

    Args:
        target: uint8 (H, W, 3). entries: the proponents, best first (at least one).
        tile: side of one proponent image in pixels (the images are upscaled by an integer factor).
    """
    if not entries:
        raise ValueError("an attribution card needs at least one proponent")
    if tile < 16:
        raise ValueError(f"tile {tile} px is too small to read; expected at least 16")
    pad, text_h, header = 16, 56, 64
    rows = -(-len(entries) // columns)
    target_img = upscale(target, 2 * tile)
    left = pad + target_img.width + 2 * pad
    width = left + columns * (tile + pad)
    height = max(header + target_img.height + text_h + pad, header + rows * (tile + text_h) + pad)
    card = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(card)
    draw.text((pad, 12), title, fill=INK, font=_font(22))
    if subtitle:
        draw.text((pad, 40), subtitle, fill=MUTED, font=_font(14))
    card.paste(target_img, (pad, header))
    draw.text((pad, header + target_img.height + 6), "target", fill=INK, font=_font(16))
    small = _font(13)
    for i, entry in enumerate(entries):
        x = left + (i % columns) * (tile + pad)
        y = header + (i // columns) * (tile + text_h)
        picture = upscale(entry.image, tile)
        card.paste(picture, (x + (tile - picture.width) // 2, y + (tile - picture.height) // 2))
        draw.text((x, y + tile + 3), _fit(entry.name or entry.file_name), fill=INK, font=small)
        draw.text((x, y + tile + 19), f"#{entry.rank}  {entry.score_text()}", fill=INK, font=small)
        draw.text((x, y + tile + 35), _fit(entry.artist or entry.file_name), fill=MUTED, font=small)
    return card
