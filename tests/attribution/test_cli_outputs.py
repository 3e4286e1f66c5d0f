"""featurize / score: --resize, and outputs checked (writable, room) before the long work."""

import pandas as pd
import pytest

from tests.attribution.conftest import synthetic_images, write_image_folder
from tests.attribution.test_cli import FAST, one_sentence, run_cli


def test_resize_is_refused_unless_asked_for(model_dir, image_folder, tmp_path, capsys):
    small = write_image_folder(tmp_path / "small", synthetic_images(3, size=8))
    code, _, err = run_cli(capsys, "featurize", "--model", model_dir, "--data", small, *FAST)
    assert code == 2
    assert one_sentence(err).endswith("expects 16x16; --resize (CLI) or resize=True resizes them")
    cache = tmp_path / "cache"
    code, out, err = run_cli(capsys, "featurize", "--model", model_dir, "--data", small, "--resize",
                             "--cache-dir", cache, *FAST)
    assert code == 0, err
    assert "3 x 256 features" in out
    code, _, err = run_cli(capsys, "score", "--model", model_dir, "--train", image_folder, "--targets", small,
                           "--scorer", "trak", "--out", tmp_path / "s", "--cache-dir", cache, *FAST)
    assert code == 2 and "are 8x8 but the model" in one_sentence(err)
    code, _, err = run_cli(capsys, "score", "--model", model_dir, "--train", image_folder, "--targets", small,
                           "--resize", "--scorer", "trak", "--out", tmp_path / "s", "--cache-dir", cache, *FAST)
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "s.csv")) == 3 * 5


def test_score_to_a_read_only_folder_is_refused_before_any_work(model_dir, image_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, _, err = run_cli(capsys, "score", "--model", model_dir, "--train", image_folder, "--targets",
                           image_folder, "--out", "/proc/dtrak-test/scores", "--cache-dir", cache, *FAST)
    assert code == 2
    assert one_sentence(err).startswith("error: cannot write the scores to /proc/dtrak-test: ")
    assert not cache.exists()  # no features were computed


def test_score_without_room_for_its_tables_is_refused_before_any_work(model_dir, image_folder, tmp_path,
                                                                      capsys, monkeypatch):
    import shutil

    from dtrak_core import io

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: usage._replace(free=6000))
    cache = tmp_path / "cache"
    # 2 lambdas x 5 targets x 5 training images x 256 bytes = 12.5 KB
    code, _, err = run_cli(capsys, "score", "--model", model_dir, "--train", image_folder, "--targets",
                           image_folder, "--lambda", "1", "10", "--out", tmp_path / "out" / "scores",
                           "--cache-dir", cache, *FAST)
    assert code == 2
    assert one_sentence(err) == f"error: not enough free space for the scores in {tmp_path / 'out'}: needs 12.5 KB, 5.9 KB free"
    assert not cache.exists()


def test_featurize_to_a_read_only_cache_is_one_line(model_dir, image_folder, capsys):
    code, _, err = run_cli(capsys, "featurize", "--model", model_dir, "--data", image_folder,
                           "--cache-dir", "/sys/dtrak-test", *FAST)
    assert code == 2
    line = one_sentence(err)
    assert line.startswith("error: cannot write the features to /sys/dtrak-test/") and len(line) < 200
