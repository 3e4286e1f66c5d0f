import argparse

import pytest

from dtrak_core.cli import main
from dtrak_core.seeds import format_seeds, parse_seeds


def test_format_seeds_is_the_inverse_of_parse_seeds():
    for seeds in ([0, 1, 2, 3, 7], [5], [0, 1], [3, 4, 5, 9, 10, 11, 12, 20], list(range(100))):
        assert parse_seeds(format_seeds(seeds)) == seeds
    assert format_seeds([0, 1, 2, 3, 7]) == "0-3,7" and format_seeds([0, 1, 5]) == "0,1,5"
    assert format_seeds(list(range(20))) == "0-19"


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds("5") == [5]
    with pytest.raises(argparse.ArgumentTypeError, match="seeds must look like"):
        parse_seeds("a-b")


def test_train_on_missing_folder_is_one_clear_line(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: dataset folder") and "does not exist" in err
    assert "Traceback" not in err


def test_cli_trains_and_generates(image_folder, tmp_path):
    model = tmp_path / "m"
    assert main(["train", "--data", str(image_folder), "--out", str(model), "--preset", "tiny",
                 "--image-size", "16", "--steps", "2", "--batch-size", "4"]) == 0
    assert main(["generate", "--model", str(model), "--seeds", "0-1", "--steps", "3",
                 "--out", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == ["0.png", "1.png"]


def test_heldout_loss_reports_trained_and_untrained(tiny_model_dir, image_folder, capsys):
    assert main(["heldout-loss", "--model", str(tiny_model_dir), "--data", str(image_folder),
                 "--timesteps", "4"]) == 0
    line = capsys.readouterr().out
    assert "on 2 images (validation), 4 timesteps: trained" in line and "untrained" in line
