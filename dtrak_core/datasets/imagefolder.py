"""A loader for any image folder, with an optional ``metadata.csv`` (Hugging Face imagefolder).

Conversions (documented, never silent crashes):

- grayscale, palette and CMYK images become RGB; images with transparency are composited on
  white (emoji and icons are drawn on transparent backgrounds);
- images whose size differs from ``image_size`` are an error unless ``resize=True``, then they
  are resized (bicubic) to ``image_size x image_size``;
- an unreadable or corrupt file, a metadata row whose file is missing, or an image without a
  metadata row is a :class:`DatasetError` naming the file;
- an image of more than ``MAX_PIXELS`` pixels is refused from its header, before it is decoded
  (a decompression bomb), with its pixel count and the limit.

Confinement: every file name (a ``metadata.csv`` value, or a file found in the folder) must
resolve, after following links, to a file inside the dataset folder. This is checked for every
row before any image is opened, and the error names the row and its value only: whether the
path outside exists, and what a link points to, is never revealed.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.csv"
# Above this many pixels an image is refused rather than decoded (decompression bombs).
MAX_PIXELS = 4096 * 4096


class DatasetError(ValueError):
    """A dataset folder or file is not what the loader expects; the message says which."""


# Pillow's own limit (Image.MAX_IMAGE_PIXELS, doubled) raises before our check can read the size;
# its message carries the pixel count.
_PILLOW_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def decompression_bomb_message(name: object, pixels: int | None, limit: int,
                               size: tuple[int, int] | None = None) -> str:
    """The one-line refusal of an image over ``limit`` pixels (datasets and uploads share it)."""
    if size is not None:
        count = f"{size[0]}x{size[1]} = {pixels:,} pixels"
    else:
        count = f"{pixels:,} pixels" if pixels is not None else "more pixels than Pillow opens"
    return f"{name} is {count}, over the limit of {limit:,}: refused as a possible decompression bomb (not decoded)"


def pillow_bomb_pixels(error: Exception) -> int | None:
    """The pixel count in Pillow's ``DecompressionBombError`` message, if it says it."""
    found = _PILLOW_BOMB_PIXELS.search(str(error))
    return int(found.group(1)) if found else None


def confined_path(root: Path, file_name: str, where: str, base: str | None = None) -> Path:
    """``root / file_name`` with links followed, if it lies strictly inside ``root``.

    ``where`` names the origin of ``file_name`` for the error (a metadata row, or the folder);
    ``base``: ``root`` resolved, when the caller checks many names. The error quotes
    ``file_name`` as given, never the resolved path, and is the same whether or not that path
    exists, so it reveals nothing outside the folder.
    """
    base = os.path.realpath(root) if base is None else base
    try:
        resolved = os.path.realpath(os.path.join(base, file_name))
        inside = resolved.startswith(base.rstrip(os.sep) + os.sep)
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte, a name too long
        inside = False
    if not inside:
        raise DatasetError(f"{where}: file_name {file_name!r} must name a file inside the dataset folder "
                           f"{root} (after following links)")
    return Path(resolved)


@dataclass
class ImageFolderDataset:
    """Images of one folder as a uint8 array, with their metadata.

    Attributes:
        root: the folder.
        images: uint8 array of shape (n, H, W, 3).
        metadata: one row per image, column ``file_name`` relative to ``root`` plus any others.
        label_column: the column that names the "artist" (or other label), or None.
    """

    root: Path
    images: np.ndarray
    metadata: pd.DataFrame
    label_column: str | None = None
    _pixels_and_metadata_hash: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def labels(self) -> list[str] | None:
        if self.label_column is None:
            return None
        return self.metadata[self.label_column].astype(str).tolist()

    def to_tensor(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Float tensor (n, 3, H, W) in [-1, 1], the diffusion models' input range."""
        images = self.images if indices is None else self.images[np.asarray(indices, dtype=np.int64)]
        return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    def subset(self, indices: Sequence[int]) -> "ImageFolderDataset":
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise DatasetError(f"subset index out of range 0..{len(self) - 1}")
        return ImageFolderDataset(self.root, self.images[idx],
                                  self.metadata.iloc[idx].reset_index(drop=True), self.label_column)

    def where(self, column: str, values: Sequence[str]) -> list[int]:
        """Indices of the rows whose ``column`` is one of ``values``."""
        if column not in self.metadata.columns:
            raise DatasetError(f"{self.root / METADATA_FILE} has no column {column!r}; "
                               f"columns are {list(self.metadata.columns)}")
        mask = self.metadata[column].astype(str).isin([str(v) for v in values])
        return np.flatnonzero(mask.to_numpy()).tolist()

    @property
    def pixels_and_metadata_hash(self) -> str:
        """SHA-256 of the decoded pixels and the metadata (order matters: indices are ids)."""
        if self._pixels_and_metadata_hash is None:
            h = hashlib.sha256()
            h.update(f"{self.images.shape}".encode())
            h.update(np.ascontiguousarray(self.images).tobytes())
            h.update(self.metadata.to_csv(index=False).encode())
            self._pixels_and_metadata_hash = h.hexdigest()
        return self._pixels_and_metadata_hash


def _confine_all(root: Path, metadata: pd.DataFrame, listed: bool) -> list[Path]:
    """The resolved path of every row, checked by :func:`confined_path` (rows of every split: a
    hostile row is refused even when its split is not loaded)."""
    where = (lambda row: f"{root / METADATA_FILE} row {row}") if listed else (lambda row: f"dataset folder {root}")
    base = os.path.realpath(root)
    return [confined_path(root, str(file_name), where(row), base)
            for row, file_name in enumerate(metadata["file_name"], start=1)]


def _read_metadata(root: Path) -> tuple[pd.DataFrame, list[Path]]:
    """The metadata (read, or one row per image file) and each row's confined path."""
    path = root / METADATA_FILE
    if not path.exists():
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        metadata = pd.DataFrame({"file_name": files})
        return metadata, _confine_all(root, metadata, listed=False)
    try:
        metadata = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is not a readable CSV file: {error}") from None
    if "file_name" not in metadata.columns:
        raise DatasetError(f"{path} has no 'file_name' column; columns are {list(metadata.columns)}")
    paths = _confine_all(root, metadata, listed=True)  # before anything else looks at the files
    duplicated = metadata["file_name"][metadata["file_name"].duplicated()]
    if len(duplicated):
        raise DatasetError(f"{path} lists {duplicated.iloc[0]!r} more than once")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*")
               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    unlisted = sorted(on_disk - set(metadata["file_name"]))
    if unlisted:
        raise DatasetError(f"{root / unlisted[0]} has no row in {path} "
                           f"({len(unlisted)} image(s) without a metadata row)")
    return metadata, paths


def load_metadata(root: str | Path) -> tuple[pd.DataFrame, list[Path]]:
    """A folder's metadata (checked as the loader checks it, images not decoded) and each row's
    confined path: for tools that derive a folder from another (captions)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    return _read_metadata(root)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: Path, image_size: int | None = None, resize: bool = False,
               name: Path | str | None = None) -> np.ndarray:
    """Decode one image as uint8 (H, W, 3), converted as the module docstring says.

    ``name``: how errors call the file (default ``path``; the loader passes the folder-relative
    form, so a link's target never shows).
    """
    name = path if name is None else name
    if not path.exists():
        raise DatasetError(f"{name} does not exist")
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 megapixels; ours is the error that explains.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise DatasetError(decompression_bomb_message(name, image.width * image.height, MAX_PIXELS,
                                                                  image.size))
                image.load()
                rgb = _to_rgb(image)
    except Image.DecompressionBombError as error:
        raise DatasetError(decompression_bomb_message(name, pillow_bomb_pixels(error), MAX_PIXELS)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, DatasetError):
            raise
        raise DatasetError(f"{name} is not a readable image ({type(error).__name__}: {error})") from None
    if image_size is not None and rgb.size != (image_size, image_size):
        if not resize:
            raise DatasetError(f"{name} is {rgb.width}x{rgb.height}; expected {image_size}x{image_size} "
                               "(resize with --resize on the command line, or resize=True in the library)")
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def load_image_folder(
    root: str | Path,
    image_size: int | None = None,
    resize: bool = False,
    label_column: str | None = "artist",
    split: str | None = None,
) -> ImageFolderDataset:
    """Load every image of ``root`` listed by its ``metadata.csv`` (or all images if none).

    Args:
        image_size: expected side length; None takes the first image's and requires square,
            equal sizes.
        resize: resize images whose size differs from ``image_size`` instead of failing.
        label_column: metadata column with the artist/label; ignored when absent.
        split: keep only rows whose ``split`` column equals this value.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    metadata, paths = _read_metadata(root)
    if split is not None:
        if "split" not in metadata.columns:
            raise DatasetError(f"{root / METADATA_FILE} has no 'split' column to select {split!r}")
        keep = (metadata["split"] == split).to_numpy()
        paths = [path for path, kept in zip(paths, keep) if kept]
        metadata = metadata[keep].reset_index(drop=True)
    if len(metadata) == 0:
        raise DatasetError(f"dataset folder {root} has no images" + (f" in split {split!r}" if split else ""))
    images = []
    for file_name, path in zip(metadata["file_name"], paths):
        array = read_image(path, image_size, resize, name=root / file_name)
        if image_size is None:
            if array.shape[0] != array.shape[1]:
                raise DatasetError(f"{root / file_name} is {array.shape[1]}x{array.shape[0]}; images must "
                                   "be square (or give the image size and resize: --resize on the command "
                                   "line, image_size and resize=True in the library)")
            image_size = array.shape[0]
        images.append(array)
    if label_column is not None and label_column not in metadata.columns:
        label_column = None
    return ImageFolderDataset(root, np.stack(images), metadata, label_column)
