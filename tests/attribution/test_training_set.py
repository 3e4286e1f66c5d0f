"""load_training_set: exactly the images a model was trained on, from its recipe."""

import json
import shutil

import pytest

from tests.attribution.conftest import synthetic_images, write_image_folder
from dtrak_core.attribution.loading import load_dataset_for, load_model, load_training_set
from dtrak_core.datasets import DatasetError
from dtrak_core.models import RECIPE_FILE
from dtrak_core.training import select_training_rows


def add_recipe(model_dir, data_dir, config_extra=None, train_files=None):
    config = {"data_dir": str(data_dir), "split": None, "filter_column": "artist", "filter_values": ["bob"],
              "subset": None, **(config_extra or {})}
    (model_dir / RECIPE_FILE).write_text(json.dumps({"config": config, "train_files": train_files}))


def test_recipe_selects_the_trained_rows(model_dir, tmp_path):
    data = write_image_folder(tmp_path / "data", synthetic_images(6))
    add_recipe(model_dir, data, train_files=["img_001.png", "img_003.png", "img_005.png"])
    train = load_training_set(load_model(model_dir))
    assert train.metadata["file_name"].tolist() == ["img_001.png", "img_003.png", "img_005.png"]
    assert set(train.labels) == {"bob"}


def test_recipe_subset_applies_after_the_filter(model_dir, tmp_path):
    data = write_image_folder(tmp_path / "data", synthetic_images(6))
    add_recipe(model_dir, data, {"subset": [2, 0]}, train_files=["img_005.png", "img_001.png"])
    assert load_training_set(load_model(model_dir)).metadata["file_name"].tolist() == ["img_005.png", "img_001.png"]


def test_a_data_folder_that_does_not_match_the_recipe_is_refused(model_dir, tmp_path):
    data = write_image_folder(tmp_path / "data", synthetic_images(6))
    add_recipe(model_dir, data, train_files=["img_001.png", "img_003.png"])
    with pytest.raises(DatasetError, match="gives 3 training images .* lists 2"):
        load_training_set(load_model(model_dir))
    add_recipe(model_dir, data, train_files=["img_001.png", "img_003.png", "img_004.png"])
    with pytest.raises(DatasetError, match="training image 2 .* is 'img_005.png' but .* lists 'img_004.png'"):
        load_training_set(load_model(model_dir))


def test_moved_data_folder_is_found_in_the_cache_or_reported(model_dir, tmp_path, monkeypatch):
    data = write_image_folder(tmp_path / "cache" / "mydata", synthetic_images(4))
    add_recipe(model_dir, "/somewhere/else/mydata", train_files=["img_001.png", "img_003.png"])
    monkeypatch.setenv("DTRAK_CACHE", str(tmp_path / "cache"))
    assert len(load_training_set(load_model(model_dir))) == 2
    shutil.rmtree(data)
    with pytest.raises(DatasetError, match="/somewhere/else/mydata recorded in .* does not exist"):
        load_training_set(load_model(model_dir))


def test_without_recipe_the_whole_folder_is_the_training_set(model_dir, image_folder):
    model = load_model(model_dir)
    assert len(load_training_set(model, image_folder)) == 5
    with pytest.raises(DatasetError, match="has no recipe.json; give the folder of its training images"):
        load_training_set(model)


def test_cli_featurize_and_score_the_recipe_selection(model_dir, tmp_path, capsys):
    import pandas as pd

    from dtrak_core.cli import main

    data = write_image_folder(tmp_path / "data", synthetic_images(6))
    add_recipe(model_dir, data, train_files=["img_001.png", "img_003.png", "img_005.png"])
    fast = ["-K", "1", "-k", "64", "--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(["featurize", "--model", str(model_dir), "--training-set", *fast]) == 0
    assert "3 x 64 features" in capsys.readouterr().out
    out = tmp_path / "scores"
    assert main(["score", "--model", str(model_dir), "--training-set", "--targets", str(data), "--scorer", "trak",
                 "--out", str(out), *fast]) == 0
    table = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(table["file_name"].unique()) == ["img_001.png", "img_003.png", "img_005.png"]
    assert len(table) == 6 * 3 and set(table["scorer"]) == {"trak"}
    assert main(["featurize", "--model", str(model_dir), *fast]) == 2
    assert "give --data FOLDER or --training-set" in capsys.readouterr().err


def _recipe_with_hash(model_dir, data, train_files):
    """A recipe as the trainer writes it: with the data hash of the selected rows."""
    add_recipe(model_dir, data, train_files=train_files)
    recipe = json.loads((model_dir / RECIPE_FILE).read_text())
    recipe["data_hash"] = load_training_set(load_model(model_dir)).pixels_and_metadata_hash
    (model_dir / RECIPE_FILE).write_text(json.dumps(recipe))
    return recipe["data_hash"]


def test_one_changed_pixel_of_the_training_set_is_refused(model_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from dtrak_core.cli import main

    data = write_image_folder(tmp_path / "data", synthetic_images(6))
    recorded = _recipe_with_hash(model_dir, data, ["img_001.png", "img_003.png", "img_005.png"])
    assert len(load_training_set(load_model(model_dir))) == 3
    # A pixel outside the selection changes nothing; one inside it is refused.
    other = np.asarray(Image.open(data / "img_000.png")).copy()
    other[0, 0] ^= 1
    Image.fromarray(other).save(data / "img_000.png")
    assert len(load_training_set(load_model(model_dir))) == 3
    image = np.asarray(Image.open(data / "img_003.png")).copy()
    image[5, 7, 1] ^= 1
    Image.fromarray(image).save(data / "img_003.png")
    actual = select_training_rows(load_dataset_for(load_model(model_dir), data), json.loads(
        (model_dir / RECIPE_FILE).read_text())["config"]).pixels_and_metadata_hash
    with pytest.raises(DatasetError) as error:
        load_training_set(load_model(model_dir))
    message = str(error.value)
    assert message.startswith(f"the training images selected from {data} differ from those the model in {model_dir} "
                              f"was trained on: its {RECIPE_FILE} records data hash {recorded[:16]}, the folder gives "
                              f"{actual[:16]} (pixels or metadata.csv changed)")
    assert message.endswith("; restore the data it was trained on") and "\n" not in message and actual != recorded
    cache = tmp_path / "cache"
    code = main(["featurize", "--model", str(model_dir), "--training-set", "-K", "1", "-k", "64", "--device", "cpu",
                 "--no-progress", "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {message}\n"
    assert not cache.exists()  # refused before any feature was computed
