"""A tiny Stable Diffusion trained here, a LoRA of it, and the captioned images they learn from.

Everything is built from configs (``training_sd.SD_PRESETS["tiny"]``: an AutoencoderKL, a
UNet2DConditionModel and a CLIP text encoder of tens of thousands of parameters; a CLIP BPE
tokenizer learned from the captions) and trained for a few steps by our own commands, so the
tests exercise the real loaders: 16 px images, 8x8x4 latents.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # tiny models: one thread is as fast and avoids contention

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (240, 220, 20)}
SHAPES = ("square", "bar")
ARTISTS = ("alice", "bob")


def caption(i: int) -> str:
    colour = list(COLOURS)[i % 4]
    return f"{colour} {SHAPES[(i // 4) % 2]}, {ARTISTS[i % 2]} style"


def write_captioned_folder(root: Path, n: int = 8, size: int = 16, text: bool = True) -> Path:
    """``n`` distinct images (a coloured square or bar on white) with metadata (file_name, text, artist, split)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = np.full((size, size, 3), 255, np.uint8)
        colour = COLOURS[list(COLOURS)[i % 4]]
        lo = 1 + (i % 3) * 2
        if SHAPES[(i // 4) % 2] == "square":
            image[lo:lo + 8, lo:lo + 8] = colour
        else:
            image[lo:lo + 3, 1:15] = colour
        name = f"img_{i:02d}.png"
        Image.fromarray(image).save(root / name)
        rows.append({"file_name": name, "text": caption(i), "artist": ARTISTS[i % 2], "split": "train"})
    with open(root / "metadata.csv", "w", newline="") as f:
        columns = ["file_name", "text", "artist", "split"] if text else ["file_name", "artist", "split"]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def sd_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sd")


@pytest.fixture(scope="session")
def sd_data(sd_root) -> Path:
    return write_captioned_folder(sd_root / "data")


@pytest.fixture(scope="session")
def sd_base(sd_root, sd_data) -> Path:
    """A tiny SD pipeline folder trained by ``train_sd`` (a few VAE and UNet steps)."""
    from dtrak_core.training_sd import SdTrainConfig, train_sd

    config = SdTrainConfig(data_dir=str(sd_data), out_dir=str(sd_root / "base"), preset="tiny", image_size=16,
                           vae_steps=4, steps=60, batch_size=4, warmup_steps=2, checkpoint_every=50, max_length=12,
                           learning_rate=1e-2)
    return train_sd(config, progress=False)


def lora_config(base: Path, data: Path, out: Path, **changes):
    from dtrak_core.training_sd import LoraTrainConfig

    values = dict(base_model=str(base), data_dir=str(data), out_dir=str(out), rank=4, lora_alpha=8.0, steps=60,
                  batch_size=4, learning_rate=2e-2, warmup_steps=2, checkpoint_every=50)
    values.update(changes)
    return LoraTrainConfig(**values)


@pytest.fixture(scope="session")
def sd_lora(sd_root, sd_base, sd_data) -> Path:
    """An adapter folder written by ``train_lora`` on the tiny base (its base_model.json names it)."""
    from dtrak_core.training_sd import train_lora

    return train_lora(lora_config(sd_base, sd_data, sd_root / "lora"), progress=False)
