"""Small image classifiers of one metadata column (artist, subject), trained here on a CPU.

They turn "the generated images are recognisable" into numbers: of the images generated from
"<subject>, <artist> style" prompts, the share the artist classifier assigns to the prompted
artist and the share the subject classifier assigns to the prompted subject; and, on the
counterfactual page, whether an artist is still seen after their images are removed.

Model: four blocks of (3x3 conv, GroupNorm, SiLU) with stride-2 downsampling after the first
three, global average pooling, a linear layer to the classes. For a 32-px RGB input that is
(B, 3, 32, 32) -> (B, C) logits, about 0.1 M parameters.

Training (deterministic given ``seed``; batches and augmentation drawn from generators seeded
by (seed, step), as the diffusion trainer): AdamW with a cosine decay, cross-entropy, with
augmentations a generated image may differ by: a shift of up to 2 px (wrapping would invent
pixels, so the border is padded with white, the emoji's background), a little Gaussian blur and
pixel noise (small generators produce soft, noisy images).

Held-out accuracy ("how good is the judge"), by one of two protocols:

- ``split``: train on the rows whose ``split`` is ``train``, test on ``validation``. In emoji3
  the validation subjects are not in training, so this measures the *style* (artist) on
  subjects the classifier never saw.
- ``one-per-group``: within each group (``group_column``, e.g. the emoji codepoint) one row,
  chosen by the seed, is held out and the others train. For subjects this asks: given the
  other artists' drawings of a subject, is this artist's drawing of it recognised?

Folder written: ``classifier.safetensors`` (weights) and ``classifier.json`` (classes, config,
the data's hash, the held-out accuracy); ``load_classifier`` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dtrak_core.datasets.imagefolder import DatasetError, ImageFolderDataset
from dtrak_core.diffusion import generator
from dtrak_core.io import atomic_path, write_json_atomic

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
PROTOCOLS = ("split", "one-per-group")


@dataclass
class ClassifierConfig:
    """What defines a classifier's training (recorded in ``classifier.json``)."""

    column: str = field(metadata={"help": "metadata column to predict (artist, name, ...)"})
    protocol: str = field(default="split", metadata={"help": "held-out protocol: split or one-per-group"})
    group_column: str = field(default="codepoint", metadata={"help": "groups for one-per-group"})
    width: int = field(default=32, metadata={"help": "channels of the first block (doubled per block, max 4x)"})
    steps: int = field(default=1500, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate (cosine decay)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seeds initialisation, batches, augmentation, hold-out"})

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {PROTOCOLS}")
        for name in ("width", "steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class SmallCNN(torch.nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, num_classes) logits."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for i in range(4):
            stride = 2 if 0 < i else 1  # downsample in blocks 2-4: 32 -> 16 -> 8 -> 4
            blocks += [torch.nn.Conv2d(channels[i], channels[i + 1], 3, stride=stride, padding=1),
                       torch.nn.GroupNorm(8, channels[i + 1]), torch.nn.SiLU()]
        self.features = torch.nn.Sequential(*blocks)
        self.head = torch.nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@dataclass
class Classifier:
    """A trained classifier: ``classes[i]`` is the label of logit i."""

    model: SmallCNN
    classes: list[str]
    record: dict

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """images (N, H, W, 3) uint8 -> class probabilities (N, C) float64."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        self.model.eval()
        out = [F.softmax(self.model(_to_tensor(images[i:i + batch_size])), dim=1).double().numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def predict(self, images: np.ndarray) -> list[str]:
        """The most likely label of each image."""
        return [self.classes[i] for i in self.predict_proba(images).argmax(axis=1)]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp))
        write_json_atomic(folder / CONFIG_FILE, {**self.record, "classes": self.classes})  # written last
        return folder


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def held_out_rows(data: ImageFolderDataset, config: ClassifierConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of ``data`` under the config's protocol (see the module docstring)."""
    meta = data.metadata
    for column in (config.column, "split" if config.protocol == "split" else config.group_column):
        if column not in meta.columns:
            raise DatasetError(f"{data.root / 'metadata.csv'} has no column {column!r} (needed by the "
                               f"{config.protocol} protocol); columns are {list(meta.columns)}")
    if config.protocol == "split":
        split = meta["split"].to_numpy()
        train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "validation")
    else:
        rng = np.random.default_rng(config.seed)
        test = np.sort([rng.choice(rows) for _, rows in sorted(meta.groupby(config.group_column).indices.items())
                        if len(rows) > 1])
        train = np.setdiff1d(np.arange(len(meta)), test)
    if len(train) == 0 or len(test) == 0:
        raise DatasetError(f"the {config.protocol} protocol leaves {len(train)} training and {len(test)} test "
                           f"rows in {data.root}; expected both non-empty")
    return train, test


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random shift of up to 2 px (white border), then blur and pixel noise, per image. x: (B, 3, H, W)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), value=1.0)
    dy, dx = torch.randint(0, 5, (2, b), generator=g)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    sigma = torch.rand(b, generator=g) * 0.8  # blur radius in pixels, 0 to 0.8
    kernel = torch.exp(-torch.arange(-1, 2).float().pow(2)[None] / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, 3) separable taps
    x = _separable_blur(x, kernel)
    return (x + 0.05 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _separable_blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Blur each image i of x (B, C, H, W) with its own 3-tap kernel taps[i] along both axes."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    t = taps[:, :, None, None, None]  # (B, 3, 1, 1, 1)
    rows = sum(t[:, j] * padded[:, :, j:j + x.shape[2], 1:-1] for j in range(3))
    rows = F.pad(rows, (1, 1, 0, 0), mode="replicate")
    return sum(t[:, j] * rows[:, :, :, j:j + x.shape[3]] for j in range(3))


def train_classifier(data: ImageFolderDataset, config: ClassifierConfig) -> Classifier:
    """Train on the protocol's training rows, measure accuracy on its test rows."""
    config.validate()
    train_rows, test_rows = held_out_rows(data, config)
    labels = data.metadata[config.column].astype(str).to_numpy()
    classes = sorted(set(labels[train_rows]))
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[label] for label in labels[train_rows]])
    x = _to_tensor(data.images[train_rows])
    torch.manual_seed(config.seed)
    model = SmallCNN(len(classes), config.width).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    for step in range(config.steps):
        g = generator(config.seed, "classifier", step)
        rows = torch.randint(0, len(x), (min(config.batch_size, len(x)),), generator=g)
        loss = F.cross_entropy(model(augment(x[rows], g)), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    classifier = Classifier(model, classes, {})
    known = np.array([label in index for label in labels[test_rows]])
    predicted = np.array(classifier.predict(data.images[test_rows]))
    accuracy = float((predicted == labels[test_rows]).mean())
    classifier.record = {"config": asdict(config), "data_hash": data.pixels_and_metadata_hash,
                         "data_dir": str(data.root), "train_rows": len(train_rows), "test_rows": len(test_rows),
                         "test_rows_with_known_class": int(known.sum()), "held_out_accuracy": accuracy,
                         "chance_accuracy": 1.0 / len(classes)}
    return classifier


def load_classifier(folder: str | Path) -> Classifier:
    """Read a folder written by :meth:`Classifier.save` (a one-line error if it is not one)."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{folder} is not a classifier folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    record = json.loads(config_path.read_text())
    classes = record.pop("classes")
    model = SmallCNN(len(classes), int(record["config"]["width"]))
    model.load_state_dict(load_file(str(weights_path)))
    return Classifier(model.eval(), classes, record)
