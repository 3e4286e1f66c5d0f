"""The judge classifiers: held-out protocols, learning a separable label, determinism, round trip."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dtrak_core.datasets.imagefolder import DatasetError, ImageFolderDataset
from dtrak_core.evaluation.classifier import (ClassifierConfig, augment, held_out_rows, load_classifier,
                                              train_classifier)

torch.set_num_threads(1)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def coloured_dataset(n_groups: int = 8, size: int = 16) -> ImageFolderDataset:
    """Each group (a "subject": a square at its own place) drawn by three "artists" (a colour)."""
    rng = np.random.default_rng(0)
    images, rows = [], []
    for g in range(n_groups):
        y, x = rng.integers(0, size - 6, 2)
        for artist, colour in COLOURS.items():
            image = np.full((size, size, 3), 255, np.uint8)
            image[y:y + 6, x:x + 6] = colour
            images.append(image)
            rows.append({"file_name": f"{artist}/{g}.png", "artist": artist, "codepoint": f"g{g}",
                         "split": "validation" if g >= n_groups - 2 else "train"})
    return ImageFolderDataset(Path("synthetic"), np.stack(images), pd.DataFrame(rows), "artist")


def test_split_protocol_tests_on_validation_and_one_per_group_holds_out_one_row_per_group():
    data = coloured_dataset()
    train, test = held_out_rows(data, ClassifierConfig(column="artist", protocol="split"))
    assert set(data.metadata.split[test]) == {"validation"} and set(data.metadata.split[train]) == {"train"}
    train, test = held_out_rows(data, ClassifierConfig(column="artist", protocol="one-per-group", seed=3))
    groups = data.metadata.codepoint.to_numpy()
    assert sorted(groups[test]) == sorted(set(groups)) and len(train) + len(test) == len(data)
    assert not set(train) & set(test)
    other = held_out_rows(data, ClassifierConfig(column="artist", protocol="one-per-group", seed=4))[1]
    assert not np.array_equal(test, other)  # the seed chooses which row of a group is held out


def test_a_colour_coded_artist_is_learned_and_recognised_on_unseen_subjects():
    data = coloured_dataset()
    classifier = train_classifier(data, ClassifierConfig(column="artist", width=8, steps=60, batch_size=16))
    assert classifier.record["held_out_accuracy"] == 1.0 and classifier.classes == sorted(COLOURS)
    assert classifier.predict(data.images[:3]) == ["red", "green", "blue"]


def test_training_is_deterministic_and_a_saved_classifier_predicts_the_same(tmp_path):
    data = coloured_dataset()
    config = ClassifierConfig(column="artist", width=8, steps=10, batch_size=8, seed=1)
    a, b = train_classifier(data, config), train_classifier(data, config)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    loaded = load_classifier(a.save(tmp_path / "clf"))
    assert np.array_equal(loaded.predict_proba(data.images), a.predict_proba(data.images))
    assert loaded.record["config"]["seed"] == 1 and loaded.classes == a.classes


def test_augment_keeps_shape_range_and_is_seeded():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = augment(x, g1), augment(x, g2)
    assert a.shape == x.shape and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1


def test_missing_column_and_bad_folder_are_one_line_errors(tmp_path):
    data = coloured_dataset()
    with pytest.raises(DatasetError, match="no column 'style'"):
        held_out_rows(data, ClassifierConfig(column="style"))
    with pytest.raises(FileNotFoundError, match="is not a classifier folder"):
        load_classifier(tmp_path)
    with pytest.raises(ValueError, match="protocol 'kfold'"):
        ClassifierConfig(column="artist", protocol="kfold").validate()
