"""The feature store under damage: checksums verified on read, damaged or unchecked rows
recomputed (never served), full or read-only disks refused up front with one line."""

import errno
import json
import os

import numpy as np
import pytest
import torch

from dtrak_core.attribution import feature_store
from dtrak_core.attribution.dataset_features import feature_status, featurize
from dtrak_core.attribution.feature_store import (FEATURES, MANIFEST, StaleFeaturesError, compute_features,
                                                  load_features, rows_sha256)
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.loading import load_dataset_for, load_model
from dtrak_core.io import OutputError
from dtrak_core.tasks import UnconditionalPixelTask

SETTINGS = FeatureSettings(num_timesteps=2, projector="sjlt", projection_dim=64, batch_size=2, device="cpu")


@pytest.fixture
def images():
    return torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture
def featurizer(tiny_unet, scheduler):
    return Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), SETTINGS)


def _compute(featurizer, images, root, calls=None):
    return compute_features(featurizer, images, "data", root=root, progress=False,
                            on_batch=None if calls is None else lambda done, n: calls.append(done))


def _overwrite_rows(folder, lo, hi, k=64):
    """Replace rows lo..hi-1 of features.npy in place by other bytes of the same size."""
    array = np.lib.format.open_memmap(folder / FEATURES, mode="r")
    offset, old = array.offset, np.array(array[lo:hi])
    del array
    with open(folder / FEATURES, "r+b") as f:
        f.seek(offset + lo * k * 4)
        f.write((old + 1.0).astype(np.float32).tobytes())


def test_the_manifest_records_a_checksum_per_batch(featurizer, images, tmp_path):
    done = _compute(featurizer, images, tmp_path)
    manifest = json.loads((done.path / MANIFEST).read_text())
    features = np.asarray(done.features)
    assert [b[:2] for b in manifest["batches"]] == [[0, 2], [2, 4], [4, 5]]
    assert [b[2] for b in manifest["batches"]] == [rows_sha256(features[lo:hi]) for lo, hi in ((0, 2), (2, 4), (4, 5))]
    assert manifest["status"] == "complete" and manifest["batches_done"] == 3


def test_overwritten_rows_are_detected_and_only_their_batch_recomputed(featurizer, images, tmp_path):
    done = _compute(featurizer, images, tmp_path)
    clean = np.array(done.features)
    del done
    folder = next(tmp_path.iterdir())
    _overwrite_rows(folder, 2, 4)
    with pytest.raises(StaleFeaturesError, match=r"rows 2\.\.3 fail their checksum; rerun featurization"):
        load_features(folder)
    calls = []
    repaired = _compute(featurizer, images, tmp_path, calls)
    assert calls == [5]  # one batch (rows 2..3) computed; the other rows were kept
    np.testing.assert_array_equal(np.asarray(repaired.features), clean)
    assert json.loads((folder / MANIFEST).read_text())["batches_done"] == 4


def test_a_damaged_store_is_not_reported_complete(tmp_path, model_dir, image_folder):
    model = load_model(model_dir)
    dataset = load_dataset_for(model, image_folder)
    done = featurize(model, dataset, SETTINGS, tmp_path, progress=False)
    assert feature_status(model, dataset, SETTINGS, tmp_path).state == "complete"
    _overwrite_rows(done.path, 4, 5)
    status = feature_status(model, dataset, SETTINGS, tmp_path)
    assert (status.state, status.rows_done, status.rows) == ("partial", 4, 5)


def test_a_store_without_checksums_is_recomputed(featurizer, images, tmp_path):
    """A store finished by a version without checksums (same key) is not trusted."""
    done = _compute(featurizer, images, tmp_path)
    clean = np.array(done.features)
    manifest = json.loads((done.path / MANIFEST).read_text())
    del manifest["batches"]
    (done.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StaleFeaturesError, match=r"rows 0\.\.4 have no checksum \(written by an older dtrak\)"):
        load_features(done.path)
    calls = []
    np.testing.assert_array_equal(np.asarray(_compute(featurizer, images, tmp_path, calls).features), clean)
    assert calls == [2, 4, 5]


def test_a_torn_manifest_or_array_starts_over(featurizer, images, tmp_path, capsys):
    done = _compute(featurizer, images, tmp_path)
    clean, folder = np.array(done.features), done.path
    (folder / MANIFEST).write_text('{"status": "comp')
    np.testing.assert_array_equal(np.asarray(_compute(featurizer, images, tmp_path).features), clean)
    assert "is not valid JSON" in capsys.readouterr().err
    (folder / FEATURES).write_bytes(b"\x93NUMPY garbage")
    np.testing.assert_array_equal(np.asarray(_compute(featurizer, images, tmp_path).features), clean)
    assert "starting over" in capsys.readouterr().err


def test_temporary_files_of_a_killed_writer_are_removed(featurizer, images, tmp_path):
    folder = tmp_path / _compute(featurizer, images, tmp_path / "x").key
    folder.mkdir()
    (folder / f".{FEATURES}.abc123.tmp").write_bytes(b"\0" * 100)
    (folder / f".{MANIFEST}.def456.tmp").write_text("{")
    _compute(featurizer, images, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", FEATURES, MANIFEST]


def test_read_only_cache_is_refused_before_any_gradient(featurizer, images):
    calls = []
    with pytest.raises(OutputError, match=r"^cannot write the features to /proc/dtrak-test/[0-9a-f]{32}: "):
        compute_features(featurizer, images, "data", root="/proc/dtrak-test", progress=False,
                         on_batch=lambda d, n: calls.append(d))
    assert calls == []


def test_too_little_free_space_is_refused_up_front(featurizer, images, tmp_path, monkeypatch):
    import shutil as real_shutil
    from dtrak_core import io

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(OutputError, match=r"^not enough free space for the features in .*: needs 1\.0 MB, "
                                          r"1000 B free$"):
        _compute(featurizer, images, tmp_path)
    assert not list(tmp_path.rglob(FEATURES))


def test_a_full_disk_at_creation_is_one_line_and_leaves_nothing(featurizer, images, tmp_path, monkeypatch):
    """posix_fallocate reserves the array's blocks at creation: a full disk fails there, with a
    message, instead of a SIGBUS on the first write through the memory map."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(feature_store.os, "posix_fallocate", full)
    with pytest.raises(OutputError, match=r"^cannot reserve 1\.2 KB for the features in .*: No space left on device$"):
        _compute(featurizer, images, tmp_path)
    folder = next(tmp_path.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no array, no temporary file, no manifest
    monkeypatch.undo()
    assert _compute(featurizer, images, tmp_path).shape == (5, 64)


@pytest.mark.parametrize("fallocate", [True, False])
def test_the_array_is_allocated_not_sparse(fallocate, featurizer, images, tmp_path, monkeypatch):
    if not fallocate:  # as on a system without posix_fallocate: the zeros are written
        monkeypatch.delattr(feature_store.os, "posix_fallocate")
    done = _compute(featurizer, images, tmp_path / "a")
    stat = os.stat(done.path / FEATURES)
    assert stat.st_blocks * 512 >= stat.st_size
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(done.features), np.asarray(_compute(featurizer, images, tmp_path / "b").features))


def _count_hashing(monkeypatch):
    hashed = []
    real = feature_store.rows_sha256
    monkeypatch.setattr(feature_store, "rows_sha256", lambda rows: hashed.append(len(rows)) or real(rows))
    return hashed


def test_every_load_verifies_every_batch(featurizer, images, tmp_path, monkeypatch):
    done = _compute(featurizer, images, tmp_path)
    hashed = _count_hashing(monkeypatch)
    load_features(done.path)
    load_features(done.path)
    assert hashed == [2, 2, 1] * 2  # a store written moments ago is never taken on trust
    _overwrite_rows(done.path, 0, 1)
    with pytest.raises(StaleFeaturesError, match=r"rows 0\.\.1 fail their checksum"):
        load_features(done.path)


def test_a_settled_store_is_hashed_again_only_after_a_change(featurizer, images, tmp_path, monkeypatch):
    done = _compute(featurizer, images, tmp_path)
    monkeypatch.setattr(feature_store, "_SETTLED_SECONDS", -1e9)  # as if written long ago
    hashed = _count_hashing(monkeypatch)
    load_features(done.path)
    load_features(done.path)
    assert hashed == [2, 2, 1]  # the second load of the unchanged file trusts the first
    os.utime(done.path / FEATURES, ns=(0, 0))  # any change of the file (here its times) ends the trust
    load_features(done.path)
    assert hashed == [2, 2, 1] * 2
