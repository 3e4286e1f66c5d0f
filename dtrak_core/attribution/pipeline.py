"""Folder-level entry points: model folder + image folder -> cached features -> scores.

Everything that can be checked cheaply (the model folder is a pipeline, the images fit the
model, k <= p, lambda >= 0, the dataset is not empty) is checked here before any gradient is
computed, each with a one-sentence error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dtrak_core.attribution.feature_store import (FeatureSet, compute_features, model_weights_hash,
                                                  scheduler_hash)
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.scorers import KernelScorer, check_lambda
from dtrak_core.datasets.imagefolder import DatasetError, ImageFolderDataset, load_image_folder
from dtrak_core.models import RECIPE_FILE
from dtrak_core.tasks import DiffusionTask, load_task
from dtrak_core.training import read_recipe, resolve_data_dir, select_training_rows


@dataclass
class LoadedModel:
    """A pipeline folder loaded as its task (``dtrak_core.tasks``), with its content hashes."""

    path: Path
    task: DiffusionTask
    weights_hash: str
    scheduler_hash: str

    @property
    def unet(self) -> torch.nn.Module:
        return self.task.denoiser

    @property
    def scheduler(self):
        return self.task.scheduler

    @property
    def sample_size(self) -> int:
        """The side of the images the model takes (square images only)."""
        return int(self.task.input_shape[-1])


def load_model(model_dir: str | Path) -> LoadedModel:
    """Load a pipeline folder as its task (``ModelError`` if no task loads it) and hash it."""
    task = load_task(model_dir)
    return LoadedModel(Path(model_dir), task, model_weights_hash(task.denoiser), scheduler_hash(task.scheduler))


def load_dataset_for(model: LoadedModel, data_dir: str | Path, split: str | None = None,
                     label_column: str | None = "artist") -> ImageFolderDataset:
    """Load an image folder whose images must have the model's sample size (no silent resizing)."""
    dataset = load_image_folder(data_dir, image_size=None, label_column=label_column, split=split)
    check_dataset_fits(dataset, model)
    return dataset


def check_dataset_fits(dataset: ImageFolderDataset, model: LoadedModel) -> None:
    if len(dataset) == 0:
        raise DatasetError(f"dataset {dataset.root} is empty; expected at least one image")
    if dataset.image_size != model.sample_size:
        raise DatasetError(f"images in {dataset.root} are {dataset.image_size}x{dataset.image_size} but "
                           f"the model in {model.path} expects {model.sample_size}x{model.sample_size}")


def featurize(model: LoadedModel, dataset: ImageFolderDataset, settings: FeatureSettings,
              root: str | Path | None = None, progress: bool = True,
              featurizer: Featurizer | None = None, description: str = "features") -> FeatureSet:
    """Cached features of every image of ``dataset`` (sample ids = row indices)."""
    check_dataset_fits(dataset, model)
    featurizer = featurizer or Featurizer.create(model.task, settings)
    return compute_features(featurizer, dataset.to_tensor(), dataset.content_hash, root=root,
                            model_hash=model.weights_hash, sched_hash=model.scheduler_hash,
                            progress=progress, description=description)


def featurize_folder(model_dir: str | Path, data_dir: str | Path, settings: FeatureSettings,
                     split: str | None = None, root: str | Path | None = None,
                     progress: bool = True) -> FeatureSet:
    """Model folder + image folder -> cached features."""
    model = load_model(model_dir)
    dataset = load_dataset_for(model, data_dir, split)
    return featurize(model, dataset, settings, root, progress)


def kernel_scores(train: FeatureSet | np.ndarray, targets: FeatureSet | np.ndarray,
                  lambdas: Sequence[float]) -> dict[float, np.ndarray]:
    """D-TRAK scores (m, n) for each lambda from one decomposition of the train features."""
    for lam in lambdas:
        check_lambda(lam)
    phi = train.features if isinstance(train, FeatureSet) else train
    g = targets.features if isinstance(targets, FeatureSet) else targets
    return KernelScorer(phi).sweep(g, lambdas)


def load_training_set(model: LoadedModel, data_dir: str | Path | None = None,
                      label_column: str | None = "artist") -> ImageFolderDataset:
    """Exactly the images the model was trained on, in training order (row i = sample id i).

    With a ``recipe.json`` in the model folder, its config selects the rows (split, then
    ``filter_column``/``filter_values``, then ``subset``) of ``data_dir`` (default: the recipe's
    data folder), and the selected file names must equal the recipe's ``train_files``, so
    attribution never scores a different set than the one trained on. Without a recipe the whole
    of ``data_dir`` is the training set. Images must already have the model's size.
    """
    recipe = read_recipe(model.path)
    if recipe is None:
        if data_dir is None:
            raise DatasetError(f"{model.path} has no {RECIPE_FILE}; give the folder of its training images")
        return load_dataset_for(model, data_dir, None, label_column)
    config = recipe["config"]
    folder = Path(data_dir) if data_dir is not None else resolve_data_dir(str(config.get("data_dir")), model.path)
    dataset = select_training_rows(load_dataset_for(model, folder, config.get("split"), label_column), config)
    expected = recipe.get("train_files")
    if expected is not None:
        found = dataset.metadata["file_name"].astype(str).tolist()
        if len(found) != len(expected):
            raise DatasetError(f"{folder} gives {len(found)} training images for the model in {model.path}, "
                               f"but its {RECIPE_FILE} lists {len(expected)}; is this the data it was trained on?")
        if found != [str(f) for f in expected]:
            first = next(i for i, (a, b) in enumerate(zip(found, expected)) if a != b)
            raise DatasetError(f"training image {first} of {folder} is {found[first]!r} but the model's "
                               f"{RECIPE_FILE} lists {expected[first]!r}; is this the data it was trained on?")
    check_dataset_fits(dataset, model)
    return dataset


@dataclass(frozen=True)
class FeatureStatus:
    """Where the cached features of a dataset stand, found without computing anything.

    ``state`` is "missing" (no folder), "partial" (``rows_done`` of ``rows`` stored) or
    "complete".
    """

    key: str
    folder: Path
    state: str
    rows_done: int
    rows: int


def feature_status(model: LoadedModel, dataset: ImageFolderDataset, settings: FeatureSettings,
                   root: str | Path | None = None) -> FeatureStatus:
    """Whether :func:`featurize` would find the features of ``dataset`` ready (cheap: hashes only)."""
    from dtrak_core.attribution.feature_store import feature_identity, feature_key, read_manifest, schedule_hash
    from dtrak_core.schedule import NoiseSchedule
    from dtrak_core.paths import CACHE_DIR

    identity = feature_identity(model.weights_hash, model.scheduler_hash, dataset.content_hash, settings,
                                range(len(dataset)), schedule_hash(NoiseSchedule.from_scheduler(model.scheduler)))
    key = feature_key(identity)
    folder = (Path(root) if root is not None else CACHE_DIR / "features") / key
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("identity") != identity:
        return FeatureStatus(key, folder, "missing", 0, len(dataset))
    state = "complete" if manifest.get("status") == "complete" else "partial"
    return FeatureStatus(key, folder, state, int(manifest.get("rows_done", 0)), len(dataset))
