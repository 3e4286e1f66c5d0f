"""A content-addressed, resumable store of features on disk.

Layout: ``<root>/<key>/manifest.json`` and ``<root>/<key>/features.npy`` (float32 (n, k), a
NumPy ``.npy`` opened as a memory map), with ``root = paths.features_dir()`` by default.

The key is sha256 over the *identity* of the features: the model weights hash (sha256 over the
state_dict tensors' names, dtypes, shapes and bytes in sorted order), the scheduler config and
its betas, the dataset content hash, the sample ids, the settings that change the values
(``FeatureSettings.key_fields``) and the format version. Any change gives another folder, and
an existing folder whose manifest records another identity is refused
(:class:`StaleFeaturesError`), so stale features are never returned.

Resuming: rows are computed batch by batch in order; after each batch the memory map is
flushed and then the manifest's ``rows_done`` is replaced atomically, so ``rows_done`` never
counts rows that are not on disk. A rerun after an interruption continues from ``rows_done``.
One writer per key at a time is assumed.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import dtrak_core
from dtrak_core import paths
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.hashing import betas_hash
from dtrak_core.io import atomic_path, sha256_json, write_json_atomic
from dtrak_core.progress import progress_bar

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.npy"


class StaleFeaturesError(RuntimeError):
    """A feature folder belongs to other weights, data or settings than the ones asked for."""


def feature_identity(model_hash: str, sched_hash: str, dataset_hash: str,
                     settings: FeatureSettings, sample_ids: Sequence[int],
                     noise_schedule_hash: str = "") -> dict:
    """Everything the feature values depend on, as a JSON-able dict.

    It goes through a JSON round trip so it compares equal to the copy read back from a
    manifest (tuples become lists).
    """
    identity = {
        "format_version": FORMAT_VERSION,
        "model_weights_sha256": model_hash,
        "scheduler_sha256": sched_hash,
        "noise_schedule_sha256": noise_schedule_hash,
        "dataset_sha256": dataset_hash,
        "sample_ids_sha256": sha256_json([int(i) for i in sample_ids]),
        "settings": settings.key_fields(),
    }
    return json.loads(json.dumps(identity))


def feature_key(identity: dict) -> str:
    return sha256_json(identity)[:32]


@dataclass
class FeatureSet:
    """Finished features: ``features`` is a read-only float32 memmap (n, k)."""

    path: Path
    key: str
    features: np.ndarray
    manifest: dict

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.features.shape)  # type: ignore[return-value]


def _versions() -> dict:
    import diffusers

    return {"dtrak_core": dtrak_core.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StaleFeaturesError(f"{path} is not valid JSON ({error}); delete the folder to recompute") from None


def check_identity(folder: Path, manifest: dict, identity: dict) -> None:
    """Refuse a folder whose recorded identity differs from the expected one."""
    recorded = manifest.get("identity")
    if recorded != identity:
        differing = sorted(k for k in set(identity) | set(recorded or {})
                           if (recorded or {}).get(k) != identity.get(k))
        raise StaleFeaturesError(f"features in {folder} were computed for different "
                                 f"{', '.join(differing) or 'inputs'}; refusing stale features")


def load_features(folder: str | Path, identity: dict | None = None) -> FeatureSet:
    """Open finished features; with ``identity``, refuse them unless it matches the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} holds no feature manifest ({MANIFEST})")
    if identity is not None:
        check_identity(folder, manifest, identity)
    if manifest.get("status") != "complete":
        raise StaleFeaturesError(f"features in {folder} are unfinished ({manifest.get('rows_done')} of "
                                 f"{manifest['shape'][0]} rows); rerun featurization to resume")
    features = np.load(folder / FEATURES, mmap_mode="r")
    if list(features.shape) != list(manifest["shape"]):
        raise StaleFeaturesError(f"{folder / FEATURES} has shape {features.shape}, the manifest says "
                                 f"{manifest['shape']}; delete the folder to recompute")
    return FeatureSet(folder, manifest["key"], features, manifest)


def compute_features(
    featurizer: Featurizer,
    images: torch.Tensor,
    dataset_hash: str,
    sample_ids: Sequence[int] | None = None,
    root: str | Path | None = None,
    model_hash: str | None = None,
    sched_hash: str | None = None,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    description: str = "features",
    captions: Sequence[str] | None = None,
) -> FeatureSet:
    """Features of ``images`` (N, C, H, W) in [-1, 1], from the cache or computed (resuming).

    Args:
        featurizer: built for the model and settings.
        dataset_hash: content hash of the data (``ImageFolderDataset.pixels_and_metadata_hash``).
        sample_ids: noise ids per row (default 0..N-1).
        root: store root (default ``paths.features_dir()``).
        model_hash, sched_hash: precomputed hashes (computed from the featurizer's model otherwise).
        on_batch: called with (rows_done, N) after each stored batch.
        captions: one per image, for text-conditioned models (part of ``dataset_hash``'s data).
    """
    n = len(images)
    if n == 0:
        raise ValueError("there are no images to featurize; expected at least one")
    ids = list(range(n)) if sample_ids is None else [int(i) for i in sample_ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} sample ids for {n} images; expected one id per image")
    root = Path(root) if root is not None else paths.features_dir()
    model_hash = model_hash or featurizer.task.content_hash()
    identity = feature_identity(model_hash, sched_hash or "", dataset_hash, featurizer.settings, ids,
                                betas_hash(featurizer.schedule))
    key = feature_key(identity)
    folder = root / key
    k = featurizer.feature_dim
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("status") != "complete" and not (folder / FEATURES).exists():
        manifest = None  # an interrupted start without its array: start over
    if manifest is not None:
        check_identity(folder, manifest, identity)
        if manifest.get("status") == "complete":
            return load_features(folder, identity)
        store = np.lib.format.open_memmap(folder / FEATURES, mode="r+")
        if store.shape != (n, k) or store.dtype != np.float32:
            raise StaleFeaturesError(f"{folder / FEATURES} has shape {store.shape} {store.dtype}, "
                                     f"expected ({n}, {k}) float32; delete the folder to recompute")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / FEATURES) as tmp:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, k)).flush()
        manifest = {
            "key": key, "identity": identity, "status": "running", "shape": [n, k],
            "dtype": "float32", "rows_done": 0, "batches_done": 0,
            "settings": featurizer.settings.to_dict(), "timesteps": featurizer.timesteps,
            "computer": featurizer.computer.describe(), "num_parameters": featurizer.num_parameters,
            "num_selected_tensors": len(featurizer.param_names), "versions": _versions(),
            "created": _now(),
        }
        write_json_atomic(folder / MANIFEST, manifest)
        store = np.lib.format.open_memmap(folder / FEATURES, mode="r+")
    start = int(manifest["rows_done"])
    bar = progress_bar(total=n, initial=start, desc=description, unit="img", disable=not progress)
    try:
        for lo, hi, features in featurizer.iter_features(images, ids, start=start, captions=captions):
            store[lo:hi] = features
            store.flush()  # rows reach the disk before the manifest counts them
            manifest.update(rows_done=hi, batches_done=int(manifest["batches_done"]) + 1, updated=_now())
            write_json_atomic(folder / MANIFEST, manifest)
            bar.update(hi - lo)
            if on_batch is not None:
                on_batch(hi, n)
    finally:
        bar.close()
        del store
    manifest.update(status="complete", finished=_now())
    write_json_atomic(folder / MANIFEST, manifest)
    return load_features(folder, identity)
