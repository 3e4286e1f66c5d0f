"""Shared fixtures: small real image folders and a tiny trained pipeline folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(root: Path, n: int = 12, size: int = 16, artists=("a", "b"), seed: int = 0) -> Path:
    """Write ``n`` random-blob RGB PNGs and a metadata.csv (file_name, artist, split)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        artist = artists[i % len(artists)]
        image = np.full((size, size, 3), 255, np.uint8)
        y, x = rng.integers(0, size - size // 2, 2)
        image[y:y + size // 2, x:x + size // 2] = rng.integers(0, 255, 3)
        name = f"{artist}/{i:03d}.png"
        (root / artist).mkdir(exist_ok=True)
        Image.fromarray(image).save(root / name)
        rows.append((name, artist, "validation" if i % 6 == 5 else "train"))
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file_name", "artist", "split"))
        writer.writerows(rows)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny DDPM pipeline folder trained for a few steps by our trainer."""
    from dtrak_core.training import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    data = write_image_folder(root / "data")
    config = TrainConfig(data_dir=str(data), out_dir=str(root / "model"), preset="tiny",
                         image_size=16, steps=4, batch_size=4, warmup_steps=2,
                         checkpoint_every=2)
    return train(config, progress=False)
