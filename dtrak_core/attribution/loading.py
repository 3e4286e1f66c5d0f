"""Loading a model folder and the data it attributes, checked before any gradient is computed.

A model folder loads as its task (``dtrak_core.tasks``) with the hashes features are keyed by;
a data folder must have the model's image size (no silent resizing: resizing is asked for); the
training set is exactly the rows the model's ``recipe.json`` selected, in training order, with the
pixels it recorded the hash of. Each check fails with one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dtrak_core.datasets.imagefolder import DatasetError, ImageFolderDataset, load_image_folder
from dtrak_core.hashing import scheduler_config_hash
from dtrak_core.models import RECIPE_FILE
from dtrak_core.tasks import DiffusionTask, load_task
from dtrak_core.training import read_recipe, resolve_data_dir, select_training_rows


@dataclass
class LoadedModel:
    """A pipeline folder loaded as its task (``dtrak_core.tasks``), with the hashes of its
    content (``DiffusionTask.content_hash``: the denoiser's tensors; for latent text-to-image
    models also the VAE, text encoder, tokenizer and adapter) and of its scheduler's config
    (what features are keyed by)."""

    path: Path
    task: DiffusionTask
    state_dict_hash: str
    scheduler_config_hash: str

    @property
    def unet(self) -> torch.nn.Module:
        return self.task.denoiser

    @property
    def scheduler(self):
        return self.task.scheduler

    @property
    def sample_size(self) -> int:
        """The side of the images the model takes (square images only)."""
        return int(self.task.image_size)


def load_model(model_dir: str | Path) -> LoadedModel:
    """Load a pipeline folder as its task (``ModelError`` if no task loads it) and hash it."""
    task = load_task(model_dir)
    return LoadedModel(Path(model_dir), task, task.content_hash(), scheduler_config_hash(task.scheduler))


def load_dataset_for(model: LoadedModel, data_dir: str | Path, split: str | None = None,
                     label_column: str | None = "artist", resize: bool = False) -> ImageFolderDataset:
    """Load an image folder whose images must have the model's sample size; with ``resize``,
    images of another size are resized to it (never silently: the caller asks)."""
    size = model.sample_size if resize else None
    dataset = load_image_folder(data_dir, image_size=size, resize=resize, label_column=label_column, split=split)
    check_dataset_fits(dataset, model)
    return dataset


def check_dataset_fits(dataset: ImageFolderDataset, model: LoadedModel) -> None:
    if len(dataset) == 0:
        raise DatasetError(f"dataset {dataset.root} is empty; expected at least one image")
    if dataset.image_size != model.sample_size:
        raise DatasetError(f"images in {dataset.root} are {dataset.image_size}x{dataset.image_size} but "
                           f"the model in {model.path} expects {model.sample_size}x{model.sample_size}; "
                           "--resize (CLI) or resize=True resizes them")
    model.task.captions_for(dataset)  # a text-conditioned model: every row needs its caption column


def load_training_set(model: LoadedModel, data_dir: str | Path | None = None,
                      label_column: str | None = "artist", resize: bool = False) -> ImageFolderDataset:
    """Exactly the images the model was trained on, in training order (row i = sample id i).

    With a ``recipe.json`` in the model folder, its config selects the rows (split, then
    ``filter_column``/``filter_values``, then ``subset``) of ``data_dir`` (default: the recipe's
    data folder); the selected file names must equal the recipe's ``train_files`` and their
    pixels and metadata must hash to its ``data_hash`` (when recorded), so attribution never
    scores a different set than the one trained on: a changed pixel is refused, not warned about,
    because scores of other pixels look just as plausible and nothing downstream could tell.
    Without a recipe the whole of ``data_dir`` is the training set. Images must already have the
    model's size, unless ``resize`` (as training itself resizes).
    """
    recipe = read_recipe(model.path)
    if recipe is None:
        if data_dir is None:
            raise DatasetError(f"{model.path} has no {RECIPE_FILE}; give the folder of its training images")
        return load_dataset_for(model, data_dir, None, label_column, resize)
    config = recipe["config"]
    folder = Path(data_dir) if data_dir is not None else resolve_data_dir(str(config.get("data_dir")), model.path)
    dataset = select_training_rows(load_dataset_for(model, folder, config.get("split"), label_column, resize), config)
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
    recorded = recipe.get("data_hash")
    if recorded is not None and dataset.pixels_and_metadata_hash != recorded:
        raise DatasetError(f"the training images selected from {folder} differ from those the model in {model.path} "
                           f"was trained on: its {RECIPE_FILE} records data hash {str(recorded)[:16]}, the folder "
                           f"gives {dataset.pixels_and_metadata_hash[:16]} (pixels or metadata.csv changed); "
                           "restore the data it was trained on")
    check_dataset_fits(dataset, model)
    return dataset
