"""dtrak_app.bench, the app's response-time benchmark: its cache set-up and its command line.

The timings themselves are not run here (minutes of real sampling and scoring); the pieces that
decide what is measured are.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from dtrak_app import bench, common
from tests.app.conftest import FAST, REPO


def test_fresh_cache_links_only_the_training_features(app_env, monkeypatch, tmp_path):
    # The tiny model's cached features use the FAST settings; the benchmark reads the app's defaults.
    monkeypatch.setitem(common.DEFAULTS, "K", int(FAST["K"]))
    monkeypatch.setitem(common.DEFAULTS, "k", int(FAST["k"]))
    dest = tmp_path / "scratch"
    bench.fresh_cache(str(app_env.model_dir), app_env.cache, dest)
    [link] = list((dest / "features").iterdir())
    assert link.is_symlink() and link.resolve().parent == (app_env.cache / "features").resolve()
    assert [p.name for p in dest.iterdir()] == ["features"]  # no samples, scores or jobs: all computed anew


def test_fresh_cache_refuses_features_not_computed_yet(app_env, tmp_path):
    # The defaults (K=10, k=2048) were never featurized for the tiny model.
    with pytest.raises(RuntimeError, match="the training features are missing in .*; run python -m dtrak_core "
                                           "featurize --model .* --training-set"):
        bench.fresh_cache(str(app_env.model_dir), app_env.cache, tmp_path / "scratch")
    assert not (tmp_path / "scratch").exists()


def test_the_command_is_python_m_dtrak_app_bench():
    # Run as documented, from the repository root, in a fresh interpreter (no sys.path edit needed).
    done = subprocess.run([sys.executable, "-m", "dtrak_app.bench", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python -m dtrak_app.bench [-h] --model MODEL --cache CACHE")
    assert "--repeats" in done.stdout and "--out-dir" in done.stdout
