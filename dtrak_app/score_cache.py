"""Scores of targets already attributed, kept on disk for reverse lookups.

One folder per *context* (model weights, training set, method, feature settings, lambda):
``<root>/<context key>/`` with ``context.json`` and, per target, ``<target key>.npy`` (the
float32 score vector (n,)), ``<target key>.png`` (the target image) and ``<target key>.json``
(a label such as "seed 3" and where it came from). The target key is a hash of the target's
pixels, so the same image is stored once. All writes are atomic.

:meth:`ScoreCache.reverse_lookup` answers "which of the targets seen so far does training
image j support most?" from these files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dtrak_core.io import atomic_path, sha256_array, sha256_json, write_bytes_atomic, write_json_atomic

CONTEXT_FILE = "context.json"


def score_context(model_hash: str, train_hash: str, method: str, settings: dict | None, lam: float) -> dict:
    """What a score vector depends on besides the target (JSON-able; NaN lambda becomes None)."""
    return {"model_weights_sha256": model_hash, "train_sha256": train_hash, "method": method,
            "settings": settings, "lambda": None if lam != lam else float(lam)}


def target_key(image: np.ndarray) -> str:
    """Content key of one target image (H, W, 3) uint8."""
    return sha256_array(np.asarray(image, dtype=np.uint8))[:24]


class ScoreCache:
    """Score vectors of one context, one file per target."""

    def __init__(self, root: str | Path, context: dict) -> None:
        self.context = json.loads(json.dumps(context))
        self.folder = Path(root) / sha256_json(self.context)[:24]

    def _ensure(self) -> None:
        if not (self.folder / CONTEXT_FILE).exists():
            write_json_atomic(self.folder / CONTEXT_FILE, self.context)

    def get(self, key: str) -> np.ndarray | None:
        path = self.folder / f"{key}.npy"
        return np.load(path) if path.exists() else None

    def put(self, key: str, scores: np.ndarray, image: np.ndarray, info: dict) -> None:
        """Store one target's scores (n,), its image (H, W, 3) uint8 and a description."""
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim != 1:
            raise ValueError(f"scores of shape {scores.shape} must be one target's (n,) vector")
        self._ensure()
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
        write_bytes_atomic(self.folder / f"{key}.png", buffer.getvalue())
        with atomic_path(self.folder / f"{key}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, scores)
        # The description last: a target is listed only once its scores and image are on disk.
        write_json_atomic(self.folder / f"{key}.json", {"key": key, **info})

    def targets(self) -> list[dict]:
        """Descriptions of the stored targets (each with its ``key``)."""
        if not self.folder.is_dir():
            return []
        infos = []
        for path in sorted(self.folder.glob("*.json")):
            if path.name == CONTEXT_FILE or not path.with_suffix(".npy").exists():
                continue
            infos.append(json.loads(path.read_text()))
        return infos

    def image(self, key: str) -> Image.Image:
        return Image.open(self.folder / f"{key}.png").convert("RGB")

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
        for suffix in (".json", ".npy", ".png"):
            (self.folder / f"{key}{suffix}").unlink(missing_ok=True)
