"""``featurize`` killed (SIGKILL) at each of its write points, then run again: the store ends
byte-identical to an uninterrupted run, and nothing that was computed is computed twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dtrak_core.attribution.feature_store import FEATURES, MANIFEST, StaleFeaturesError, load_features
from dtrak_core.cli import main
from tests.reliability.harness import KILLED, run_cli, snapshot

#: Fields of the manifest that differ between two correct runs (wall-clock times).
TIMES = ("created", "updated", "finished")


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process runs use one thread, as the harness's child processes do (float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def featurize_args(model_dir: Path, cache: Path) -> list[str]:
    # 10 training images in batches of 4: three batches (4, 4, 2).
    return ["featurize", "--model", str(model_dir), "--training-set", "-K", "2", "-k", "64", "--batch-size", "4",
            "--device", "cpu", "--no-progress", "--cache-dir", str(cache)]


def store_state(cache: Path) -> tuple[dict, dict]:
    """(sha256 of every file, manifest without its times) of the one feature folder."""
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    manifest = json.loads((folder / MANIFEST).read_text())
    return snapshot(cache, ignore=(f"*/{MANIFEST}",)), {k: v for k, v in manifest.items() if k not in TIMES}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> tuple[dict, dict]:
    cache = tmp_path_factory.mktemp("reference")
    assert main(featurize_args(tiny_model_dir, cache)) == 0
    return store_state(cache)


@pytest.mark.parametrize("point", ["features.create", "features.batch@2", "features.complete"])
def test_killed_featurize_resumes_to_identical_features(point, reference, tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    killed = run_cli(featurize_args(tiny_model_dir, cache), fault=point)
    assert killed.returncode == KILLED, killed.stderr
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    if point == "features.create":  # the array was reserved under a temporary name, never renamed
        assert [p.name for p in folder.glob(f".{FEATURES}.*.tmp")] and not (folder / MANIFEST).exists()
    else:
        with pytest.raises(StaleFeaturesError, match="unfinished"):
            load_features(folder)
    if point == "features.batch@2":  # rows 4..7 are on disk, but only the first batch is recorded
        assert json.loads((folder / MANIFEST).read_text())["rows_done"] == 4

    assert main(featurize_args(tiny_model_dir, cache)) == 0
    assert "10 x 64 features" in capsys.readouterr().out
    files, manifest = store_state(cache)
    assert files == reference[0]  # features.npy byte for byte, no temporary file left behind
    assert manifest == reference[1]  # same checksums; batches_done 3: no batch was counted twice
    assert manifest["batches_done"] == 3 and manifest["status"] == "complete"
