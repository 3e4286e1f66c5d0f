"""Fixtures: the tiny UNet preset, small synthetic image folders and pipeline folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dtrak_core.models import UNET_PRESETS, make_scheduler
from dtrak_core.tasks import UnconditionalPixelTask

ARTISTS = ("alice", "bob")

# The models here are tiny: one thread is as fast, and avoids OpenMP threads spinning against
# other processes on a busy 2-core machine (which made single tests 10-30x slower).
torch.set_num_threads(1)


def synthetic_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """n distinct uint8 images (n, size, size, 3): a coloured square on a coloured background."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        images[i] = rng.integers(0, 256, 3, dtype=np.uint8)
        lo = int(rng.integers(0, size // 2))
        hi = lo + int(rng.integers(3, size // 2))
        images[i, lo:hi, lo:hi] = rng.integers(0, 256, 3, dtype=np.uint8)
    return images


def write_image_folder(root: Path, images: np.ndarray, artists: bool = True) -> Path:
    """Write PNGs and a metadata.csv (file_name, artist) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(images):
        name = f"img_{i:03d}.png"
        Image.fromarray(image).save(root / name)
        rows.append({"file_name": name, "artist": ARTISTS[i % len(ARTISTS)]})
    frame = pd.DataFrame(rows) if artists else pd.DataFrame(rows)[["file_name"]]
    frame.to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture
def tiny_unet() -> torch.nn.Module:
    return UNET_PRESETS["tiny"].build(image_size=16, seed=0).eval()


@pytest.fixture
def scheduler():
    return make_scheduler()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data", synthetic_images(5))


@pytest.fixture
def model_dir(tmp_path: Path, tiny_unet, scheduler) -> Path:
    path = tmp_path / "model"
    UnconditionalPixelTask(tiny_unet, scheduler).save(path)
    return path
