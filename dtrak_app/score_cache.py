"""Scores of targets already attributed, kept on disk for reverse lookups.

One folder per *context* (model weights, scheduler config and betas, training set, method, feature
settings, lambda, format): ``<root>/<context key>/`` with ``context.json`` and, per target,
``<target key>.npy`` (the float32 score vector (n,)), ``<target key>.png`` (the target image)
and ``<target key>.json`` (a label such as "seed 3", where it came from, and the sha256 of the
two other files). The target key is a hash of the target's pixels, so the same image is stored
once.

Writes: one writer per context at a time (an exclusive ``flock`` on ``<folder>/.lock``); each
file goes through a temporary file and a rename; the ``.json`` is written last and is the
completion marker: a target without it, or whose ``.npy`` or ``.png`` no longer hashes to what
it records, is not listed and :meth:`ScoreCache.get` returns None for it (the caller recomputes
and overwrites it), so damaged scores are never served.

:meth:`ScoreCache.reverse_lookup` answers "which of the targets seen so far does training
image j support most?" from these files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from PIL import Image

from dtrak_core.hashing import betas_hash
from dtrak_core.io import (fault_point, hold_lock, sha256_array, sha256_bytes, sha256_json, write_bytes_atomic,
                           write_json_atomic)

CONTEXT_FILE = "context.json"
LOCK_FILE = ".lock"
#: Part of every context: version 2 added the scheduler to the key and checksums to the markers.
FORMAT_VERSION = 2
#: What a model contributes to its scores (the feature store keys features by the same hashes).
MODEL_FIELDS = ("model_weights_sha256", "scheduler_sha256", "noise_schedule_sha256")


class ScoreCacheError(ValueError):
    """A stored file does not match its checksum (one line, names the file)."""


def model_hashes(model) -> dict[str, str]:
    """The content hashes of a loaded model (``dtrak_core.attribution.loading.LoadedModel``)
    that change its scores: the denoiser's weights, the scheduler's config and its betas."""
    return {"model_weights_sha256": model.state_dict_hash, "scheduler_sha256": model.scheduler_config_hash,
            "noise_schedule_sha256": betas_hash(model.task.schedule)}


def score_context(model: Mapping[str, str], train_hash: str, method: str, settings: dict | None, lam: float) -> dict:
    """What a score vector depends on besides the target (JSON-able; NaN lambda becomes None).

    ``model``: :func:`model_hashes` (all of :data:`MODEL_FIELDS`, so two models that differ
    only in their scheduler never share scores).
    """
    missing = [name for name in MODEL_FIELDS if not model.get(name)]
    if missing:
        raise ValueError(f"the score context needs the model's {', '.join(missing)}; use model_hashes(model)")
    return {"format_version": FORMAT_VERSION, **{name: model[name] for name in MODEL_FIELDS},
            "train_sha256": train_hash, "method": method, "settings": settings,
            "lambda": None if lam != lam else float(lam)}


def target_key(image: np.ndarray) -> str:
    """Content key of one target image (H, W, 3) uint8."""
    return sha256_array(np.asarray(image, dtype=np.uint8))[:24]


def _npy_bytes(scores: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, scores)
    return buffer.getvalue()


class ScoreCache:
    """Score vectors of one context, one file per target."""

    def __init__(self, root: str | Path, context: dict) -> None:
        self.context = json.loads(json.dumps(context))
        self.folder = Path(root) / sha256_json(self.context)[:24]

    def _marker(self, key: str) -> dict | None:
        """The target's completion marker, or None when it is missing or unreadable."""
        try:
            info = json.loads((self.folder / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and info.get("key") == key else None

    def _verified_bytes(self, key: str, suffix: str, info: dict) -> bytes | None:
        """The bytes of ``<key><suffix>`` when they hash to the marker's record, else None."""
        try:
            data = (self.folder / f"{key}{suffix}").read_bytes()
        except OSError:
            return None
        return data if sha256_bytes(data) == info.get("sha256", {}).get(suffix) else None

    def get(self, key: str) -> np.ndarray | None:
        """The target's verified scores (n,), or None (missing, unfinished or damaged: recompute)."""
        info = self._marker(key)
        data = self._verified_bytes(key, ".npy", info) if info is not None else None
        return None if data is None else np.load(io.BytesIO(data))

    def put(self, key: str, scores: np.ndarray, image: np.ndarray, info: dict) -> None:
        """Store one target's scores (n,), its image (H, W, 3) uint8 and a description."""
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim != 1:
            raise ValueError(f"scores of shape {scores.shape} must be one target's (n,) vector")
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
        files = {".png": buffer.getvalue(), ".npy": _npy_bytes(scores)}
        with hold_lock(self.folder / LOCK_FILE):
            if not (self.folder / CONTEXT_FILE).exists():
                write_json_atomic(self.folder / CONTEXT_FILE, self.context)
            (self.folder / f"{key}.json").unlink(missing_ok=True)  # unlisted while its files change
            for suffix in (".json", *files):  # what a killed writer of this target left
                for stray in self.folder.glob(f".{key}{suffix}.*.tmp"):
                    stray.unlink(missing_ok=True)
            for suffix, data in files.items():
                write_bytes_atomic(self.folder / f"{key}{suffix}", data)
            fault_point("scores.put")
            # The marker last: a target is listed only once its scores and image are on disk.
            checksums = {suffix: sha256_bytes(data) for suffix, data in files.items()}
            write_json_atomic(self.folder / f"{key}.json", {**info, "key": key, "sha256": checksums})

    def targets(self) -> list[dict]:
        """Descriptions of the stored targets whose scores and image verify (each with its ``key``)."""
        if not self.folder.is_dir():
            return []
        infos = []
        for path in sorted(self.folder.glob("*.json")):
            info = None if path.name == CONTEXT_FILE else self._marker(path.stem)
            if info is not None and all(self._verified_bytes(path.stem, s, info) is not None for s in (".npy", ".png")):
                infos.append(info)
        return infos

    def image(self, key: str) -> Image.Image:
        """The target's stored image (ScoreCacheError when it does not match its checksum)."""
        info = self._marker(key)
        data = self._verified_bytes(key, ".png", info) if info is not None else None
        if data is None:
            raise ScoreCacheError(f"{self.folder / f'{key}.png'} is missing or does not match its checksum; "
                                  "attribute the target again to restore it")
        return Image.open(io.BytesIO(data)).convert("RGB")

    def reverse_lookup(self, train_index: int, top: int = 10) -> pd.DataFrame:
        """The stored targets that training image ``train_index`` supports most.

        Columns: key, label, score (its score for that target), rank (its rank among all
        training images for that target; 1 = top proponent). Sorted by rank, then score.
        """
        rows = []
        for info in self.targets():
            scores = self.get(info["key"])
            if scores is None or not 0 <= train_index < len(scores):
                if scores is not None:
                    raise ValueError(f"train index {train_index} is outside 0..{len(scores) - 1}")
                continue
            score = float(scores[train_index])
            rank = int(np.sum(scores > score) + 1)  # ties share the best rank
            rows.append({"key": info["key"], "label": info.get("label", info["key"]), "score": score, "rank": rank})
        table = pd.DataFrame(rows, columns=["key", "label", "score", "rank"])
        return table.sort_values(["rank", "score"], ascending=[True, False]).head(top).reset_index(drop=True)

    def discard(self, key: str) -> None:
        """Forget one target's stored scores (benchmarks use it to measure a cache miss)."""
        with hold_lock(self.folder / LOCK_FILE):
            for suffix in (".json", ".npy", ".png"):
                (self.folder / f"{key}{suffix}").unlink(missing_ok=True)
