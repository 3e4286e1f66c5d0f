"""The features of a whole dataset for a loaded model: computed through the store, or its status.

``featurize`` computes (or reuses) the cached features of every image of a dataset (sample id =
row index); ``feature_status`` says, from hashes alone, whether they are ready.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtrak_core import paths
from dtrak_core.attribution.feature_store import (FeatureSet, StaleFeaturesError, compute_features,
                                                  feature_identity, feature_key, read_manifest, verified_rows)
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.loading import LoadedModel, check_dataset_fits, load_dataset_for, load_model
from dtrak_core.datasets.imagefolder import ImageFolderDataset
from dtrak_core.hashing import betas_hash


def featurize(model: LoadedModel, dataset: ImageFolderDataset, settings: FeatureSettings,
              root: str | Path | None = None, progress: bool = True,
              featurizer: Featurizer | None = None, description: str = "features") -> FeatureSet:
    """Cached features of every image of ``dataset`` (sample ids = row indices)."""
    check_dataset_fits(dataset, model)
    featurizer = featurizer or Featurizer.create(model.task, settings)
    return compute_features(featurizer, dataset.to_tensor(), dataset.pixels_and_metadata_hash, root=root,
                            model_hash=model.state_dict_hash, sched_hash=model.scheduler_config_hash,
                            progress=progress, description=description, captions=model.task.captions_for(dataset))


def featurize_folder(model_dir: str | Path, data_dir: str | Path, settings: FeatureSettings,
                     split: str | None = None, root: str | Path | None = None,
                     progress: bool = True) -> FeatureSet:
    """Model folder + image folder -> cached features."""
    model = load_model(model_dir)
    dataset = load_dataset_for(model, data_dir, split)
    return featurize(model, dataset, settings, root, progress)


@dataclass(frozen=True)
class FeatureStatus:
    """Where the cached features of a dataset stand, found without computing anything.

    ``state`` is "missing" (no folder), "partial" (``rows_done`` of ``rows`` stored, or a finished
    store whose checksums do not all verify: ``rows_done`` then counts the verified rows) or
    "complete" (every batch verified).
    """

    key: str
    folder: Path
    state: str
    rows_done: int
    rows: int


def feature_status(model: LoadedModel, dataset: ImageFolderDataset, settings: FeatureSettings,
                   root: str | Path | None = None) -> FeatureStatus:
    """Whether :func:`featurize` would find the features of ``dataset`` ready (cheap: hashes of the
    inputs, and of the stored rows when they claim to be complete; see ``feature_store``)."""
    identity = feature_identity(model.state_dict_hash, model.scheduler_config_hash,
                                dataset.pixels_and_metadata_hash, settings.for_model(model.unet), range(len(dataset)),
                                betas_hash(model.task.schedule))
    key = feature_key(identity)
    folder = (Path(root) if root is not None else paths.features_dir()) / key
    try:
        manifest = read_manifest(folder)
    except StaleFeaturesError:  # an unreadable manifest: featurize starts the folder over
        return FeatureStatus(key, folder, "partial", 0, len(dataset))
    if manifest is None or manifest.get("identity") != identity:
        return FeatureStatus(key, folder, "missing", 0, len(dataset))
    if manifest.get("status") != "complete":  # a writer's count, not verified (it changes every batch)
        return FeatureStatus(key, folder, "partial", int(manifest.get("rows_done", 0)), len(dataset))
    # "complete" only when every batch verifies: damaged rows send the app to the (repairing) job.
    rows = verified_rows(folder, manifest)
    return FeatureStatus(key, folder, "complete" if rows == len(dataset) else "partial", rows, len(dataset))
