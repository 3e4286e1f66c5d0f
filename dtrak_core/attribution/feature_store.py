"""A content-addressed, resumable store of features on disk, safe under concurrent writers.

Layout: ``<root>/<key>/manifest.json``, ``<root>/<key>/features.npy`` (float32 (n, k), a NumPy
``.npy`` opened as a memory map) and ``<root>/<key>/.lock``, with ``root = paths.features_dir()``
by default.

The key is sha256 over the *identity* of the features: the model weights hash (sha256 over the
state_dict tensors' names, dtypes, shapes and bytes in sorted order), the scheduler config and
its betas, the dataset content hash, the sample ids, the settings that change the values
(``FeatureSettings.key_fields``) and the format version. Any change gives another folder, and
an existing folder whose manifest records another identity is refused
(:class:`StaleFeaturesError`), so stale features are never returned.

Writers: one per key. A writer holds an exclusive ``flock`` on ``.lock`` for the whole write; a
second process asking for the same key says on stderr that it waits, waits, and then reuses
what the first one finished (it computes nothing that is already there). The lock dies with its
holder, so a killed writer never blocks the next one.

Checksums: the array is created whole (its blocks reserved with ``posix_fallocate`` after a
free-space check, so a full disk is an error message at creation, never a SIGBUS mid-way), then
rows are computed batch by batch; after each batch the memory map is flushed and the manifest,
replaced atomically, records the batch as ``[lo, hi, sha256 of rows lo..hi]`` (``batches``).
``status: complete`` is written last. On every load the rows of every batch are hashed and
compared with the manifest (about 2 GB/s; 2 ms for the demo's 3 MB): a batch that does not match,
or rows that no batch covers (a store written before checksums existed), are recomputed by the
next writer and never served. The one shortcut: within one process, a store already verified is
not hashed again while its file keeps the same inode, size, mtime and ctime (any write moves the
ctime) and its manifest the same batches (see ``_failed_batches``).

Resuming: a rerun after an interruption computes only the rows no verified batch covers (with
any batch size).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import dtrak_core
from dtrak_core import paths
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.hashing import betas_hash
from dtrak_core.io import (OutputError, atomic_path, ensure_writable, fault_point, format_bytes, hold_lock,
                           sha256_json, write_json_atomic)
from dtrak_core.progress import progress_bar

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.npy"
LOCK_FILE = ".lock"
#: Free space wanted beyond the array itself: the manifest and its temporary copy, the .npy header.
SPACE_SLACK_BYTES = 1 << 20


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
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StaleFeaturesError(f"{path} is not valid JSON ({error}); rerun featurization to recompute") from None


def check_identity(folder: Path, manifest: dict, identity: dict) -> None:
    """Refuse a folder whose recorded identity differs from the expected one."""
    recorded = manifest.get("identity")
    if recorded != identity:
        differing = sorted(k for k in set(identity) | set(recorded or {})
                           if (recorded or {}).get(k) != identity.get(k))
        raise StaleFeaturesError(f"features in {folder} were computed for different "
                                 f"{', '.join(differing) or 'inputs'}; refusing stale features")


def rows_sha256(rows: np.ndarray) -> str:
    """sha256 of rows (B, k) as stored: float32, C order, no header."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.float32).data).hexdigest()


def _ranges(rows: Sequence[tuple[int, int]]) -> str:
    """[(0, 2), (4, 5)] -> 'rows 0..1, 4' (inclusive, for messages)."""
    parts = [f"{lo}" if hi - lo == 1 else f"{lo}..{hi - 1}" for lo, hi in rows]
    return "rows " + ", ".join(parts)


def _uncovered(batches: Sequence[Sequence], n: int) -> list[tuple[int, int]]:
    """The row ranges of 0..n that no batch [lo, hi, sha] covers, in order."""
    missing, at = [], 0
    for lo, hi, _ in sorted(batches):
        if lo > at:
            missing.append((at, lo))
        at = max(at, hi)
    if at < n:
        missing.append((at, n))
    return missing


def _valid_batches(manifest: dict, n: int) -> list[list]:
    """The manifest's batches that are well formed, inside 0..n and not overlapping an earlier one."""
    entries = manifest.get("batches")
    well_formed = [b for b in entries if isinstance(b, list) and len(b) == 3 and isinstance(b[0], int)
                   and isinstance(b[1], int) and isinstance(b[2], str)] if isinstance(entries, list) else []
    kept, at = [], 0
    for lo, hi, sha in sorted(well_formed):
        if at <= lo < hi <= n:
            kept.append([lo, hi, sha])
            at = hi
    return kept


#: folder -> signature of the store as it was when all its batches last matched (see _failed_batches).
_verified: dict[str, tuple] = {}
#: File times tick coarsely (a kernel clock tick, up to 10 ms): a file changed within this many
#: seconds before a verification could change again without a new ctime, so it is not memoized.
_SETTLED_SECONDS = 2.0


def _failed_batches(folder: Path, store: np.ndarray, batches: list[list]) -> list[list]:
    """The batches whose rows no longer hash to their recorded sha256.

    All are hashed, unless this process already verified the same file (inode, size, mtime and
    ctime, the last changed more than ``_SETTLED_SECONDS`` before that verification began) with the
    same batches: any write since then, even of same-size bytes, moved the ctime (which no user
    call can set back).
    """
    began = time.time()
    stat = os.stat(folder / FEATURES)
    signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, sha256_json(batches))
    if _verified.get(str(folder)) == signature:
        return []
    failed = [b for b in batches if rows_sha256(store[b[0]:b[1]]) != b[2]]
    if not failed and began - stat.st_ctime_ns / 1e9 > _SETTLED_SECONDS:
        _verified[str(folder)] = signature
    return failed


def _open_array(folder: Path, manifest: dict, mode: str) -> np.ndarray:
    """The manifest's float32 (n, k) array as a memory map; StaleFeaturesError if it is missing,
    unreadable or of another shape."""
    path = folder / FEATURES
    try:
        array = np.lib.format.open_memmap(path, mode=mode)
    except (OSError, ValueError) as error:
        raise StaleFeaturesError(f"{path} is missing or unreadable ({error}); rerun featurization to "
                                 "recompute") from None
    if list(array.shape) != list(manifest.get("shape", [])) or array.dtype != np.float32:
        raise StaleFeaturesError(f"{path} has shape {array.shape} {array.dtype}, the manifest says "
                                 f"{manifest.get('shape')} float32; rerun featurization to recompute")
    return array


def _problems(folder: Path, store: np.ndarray, manifest: dict) -> tuple[list[list], list[tuple[int, int]], str]:
    """(verified batches, row ranges to recompute, '' or what is wrong in one phrase)."""
    n = int(store.shape[0])
    batches = _valid_batches(manifest, n)
    failed = _failed_batches(folder, store, batches)
    good = [b for b in batches if b not in failed]
    todo = _uncovered(good, n)
    if failed:
        problem = f"{_ranges([(b[0], b[1]) for b in failed])} fail their checksum"
    elif todo and manifest.get("status") == "complete":
        problem = f"{_ranges(todo)} have no checksum (written by an older dtrak)"
    else:
        problem = f"{_ranges(todo)} are not computed yet" if todo else ""
    return good, todo, problem


def load_features(folder: str | Path, identity: dict | None = None) -> FeatureSet:
    """Open finished features, every batch verified against its checksum; with ``identity``,
    refuse them unless it matches the manifest. Unfinished or damaged features raise
    :class:`StaleFeaturesError` (:func:`compute_features` recomputes what is missing)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} holds no feature manifest ({MANIFEST})")
    if identity is not None:
        check_identity(folder, manifest, identity)
    if manifest.get("status") != "complete":
        raise StaleFeaturesError(f"features in {folder} are unfinished ({manifest.get('rows_done')} of "
                                 f"{manifest['shape'][0]} rows); rerun featurization to resume")
    features = _open_array(folder, manifest, "r")
    _, _, problem = _problems(folder, features, manifest)
    if problem:
        raise StaleFeaturesError(f"features in {folder}: {problem}; rerun featurization to recompute them")
    return FeatureSet(folder, manifest["key"], features, manifest)


def _finished(folder: Path, identity: dict) -> FeatureSet | None:
    """The verified finished features, or None when there is anything to (re)compute. Refuses
    (StaleFeaturesError) only a folder of another identity."""
    try:
        manifest = read_manifest(folder)
    except StaleFeaturesError:
        return None
    if manifest is None:
        return None
    check_identity(folder, manifest, identity)
    try:
        return load_features(folder, identity)
    except StaleFeaturesError:
        return None


def verified_rows(folder: Path, manifest: dict) -> int:
    """How many rows of a store verify against their checksums (0 if its array is unreadable)."""
    try:
        store = _open_array(folder, manifest, "r")
    except StaleFeaturesError:
        return 0
    good, _, _ = _problems(folder, store, manifest)
    return sum(hi - lo for lo, hi, _ in good)


def _say(message: str) -> None:
    """A one-line notice on stderr (a background job's log shows it)."""
    print(message, file=sys.stderr, flush=True)


def _preallocate(path: Path, start: int, size: int, folder: Path) -> None:
    """Give ``path`` real blocks from ``start`` (the end of the .npy header) up to ``size`` bytes,
    so writes through a memory map cannot fail later (a full disk would kill the process with
    SIGBUS); a full disk fails here instead."""
    fd = os.open(path, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, start, size - start)
        else:  # no fallocate (macOS): writing the zeros allocates them too
            os.lseek(fd, start, os.SEEK_SET)
            for at in range(start, size, 1 << 20):
                os.write(fd, bytes(min(1 << 20, size - at)))
    except OSError as error:
        raise OutputError(f"cannot reserve {format_bytes(size - start)} for the features in {folder}: "
                          f"{error.strerror or error}") from None
    finally:
        os.close(fd)


def _create(folder: Path, featurizer: Featurizer, identity: dict, key: str, n: int) -> dict:
    """A new zero array (n, k) with its blocks reserved, then a manifest with no batches."""
    k = featurizer.feature_dim
    with atomic_path(folder / FEATURES) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, k))
        start, size = array.offset, array.offset + array.nbytes
        del array
        _preallocate(tmp, start, size, folder)
        fault_point("features.create")
    manifest = {
        "key": key, "identity": identity, "status": "running", "shape": [n, k],
        "dtype": "float32", "rows_done": 0, "batches_done": 0, "batches": [],
        "checksums": "batches: [lo, hi, sha256 of rows lo..hi-1 as float32 C-order bytes]",
        "settings": featurizer.settings.to_dict(), "timesteps": featurizer.timesteps,
        "computer": featurizer.computer.describe(), "num_parameters": featurizer.num_parameters,
        "num_selected_tensors": len(featurizer.param_names), "versions": _versions(),
        "created": _now(),
    }
    _write_manifest(folder, manifest)
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Replace the manifest atomically; a full or failing disk is one line naming the folder."""
    try:
        write_json_atomic(folder / MANIFEST, manifest)
    except OSError as error:
        raise OutputError(f"cannot write {folder / MANIFEST}: {error.strerror or error}; free some space and "
                          "rerun to resume (the rows already recorded are kept)") from None


def _remove_temporaries(folder: Path) -> None:
    """Temporary files a killed writer left (``atomic_path``'s ``.<name>.*.tmp``); only the lock
    holder calls this, so none of them is being written."""
    for name in (FEATURES, MANIFEST):
        for path in folder.glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)


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

    Finished, verified features are returned without taking the lock. Otherwise the key's lock
    is taken (waiting, and saying so, while another process writes this key) and only the rows
    that no verified batch covers are computed.

    Args:
        featurizer: built for the model and settings.
        dataset_hash: content hash of the data (``ImageFolderDataset.pixels_and_metadata_hash``).
        sample_ids: noise ids per row (default 0..N-1).
        root: store root (default ``paths.features_dir()``).
        model_hash, sched_hash: precomputed hashes (computed from the featurizer's model otherwise).
        on_batch: called with (rows stored, N) after each stored batch.
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
    ready = _finished(folder, identity)
    if ready is not None:
        return ready
    # Before the lock (which creates the folder): a read-only or full disk is one line, now.
    array_bytes = n * featurizer.feature_dim * 4
    ensure_writable(folder, SPACE_SLACK_BYTES + (0 if (folder / FEATURES).exists() else array_bytes), "features")
    with hold_lock(folder / LOCK_FILE, on_wait=lambda: _say(
            f"waiting for another process writing features {key} ({folder}); "
            "they will be reused when it finishes")):
        _write(featurizer, images, ids, identity, key, folder, progress, on_batch, description, captions)
        return load_features(folder, identity)


def _write(featurizer: Featurizer, images: torch.Tensor, ids: list[int], identity: dict, key: str,
           folder: Path, progress: bool, on_batch: Callable[[int, int], None] | None, description: str,
           captions: Sequence[str] | None = None) -> None:
    """Under the key's lock: complete the store, computing only rows without a verified batch."""
    n, k = len(images), featurizer.feature_dim
    _remove_temporaries(folder)
    try:
        manifest = read_manifest(folder)
    except StaleFeaturesError as error:
        _say(f"{error}: starting over")
        manifest = None
    store = None
    if manifest is not None:
        check_identity(folder, manifest, identity)
        try:
            store = _open_array(folder, manifest, "r+")
        except StaleFeaturesError as error:
            _say(f"{error}: starting over")
    if store is None or list(store.shape) != [n, k]:
        manifest = _create(folder, featurizer, identity, key, n)
        store = _open_array(folder, manifest, "r+")
    good, todo, problem = _problems(folder, store, manifest)
    if not todo:
        if manifest.get("status") != "complete":  # every row stored, killed before the last write
            manifest.update(status="complete", finished=_now())
            _write_manifest(folder, manifest)
        return  # another writer finished while we waited
    if manifest.get("status") == "complete":
        _say(f"features in {folder}: {problem}; recomputing them")
    manifest.update(status="running", batches=good, rows_done=n - sum(hi - lo for lo, hi in todo))
    _write_manifest(folder, manifest)
    bar = progress_bar(total=n, initial=manifest["rows_done"], desc=description, unit="img", disable=not progress)
    try:
        for start, stop in todo:
            for lo, hi, features in featurizer.iter_features(images[:stop], ids[:stop], start=start,
                                                               captions=None if captions is None else captions[:stop]):
                store[lo:hi] = features
                store.flush()  # rows reach the disk before the manifest counts them
                fault_point("features.batch")
                manifest["batches"] = sorted(manifest["batches"] + [[lo, hi, rows_sha256(features)]])
                manifest.update(rows_done=int(manifest["rows_done"]) + hi - lo,
                                batches_done=int(manifest["batches_done"]) + 1, updated=_now())
                _write_manifest(folder, manifest)
                bar.update(hi - lo)
                if on_batch is not None:
                    on_batch(int(manifest["rows_done"]), n)
    finally:
        bar.close()
        del store
    fault_point("features.complete")
    manifest.update(status="complete", finished=_now())
    _write_manifest(folder, manifest)
