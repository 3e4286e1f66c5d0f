import hashlib

import pandas as pd
import pytest

from dtrak_core.datasets import load_image_folder
from dtrak_core.datasets.emoji3 import ARTISTS, METADATA_COLUMNS, Subject, build_emoji3, list_subjects


def _tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_emoji3(tmp_path_factory):
    return build_emoji3(tmp_path_factory.mktemp("e") / "emoji3", size=32, limit=40)


def test_subjects_are_single_codepoints_drawn_by_all_three():
    subjects = list_subjects()
    codepoints = [s.codepoint for s in subjects]
    assert codepoints == sorted(set(codepoints))
    assert 1000 < len(subjects) < 1300
    assert all(s.name for s in subjects)


def test_rebuild_gives_identical_bytes(small_emoji3, tmp_path):
    again = build_emoji3(tmp_path / "emoji3", size=32, limit=40)
    assert _tree_digest(again) == _tree_digest(small_emoji3)


def test_metadata_one_image_per_subject_and_artist(small_emoji3):
    metadata = pd.read_csv(small_emoji3 / "metadata.csv", dtype=str)
    assert tuple(metadata.columns) == METADATA_COLUMNS
    assert len(metadata) == 40 * len(ARTISTS)
    counts = metadata.groupby("codepoint")["artist"].apply(sorted)
    assert all(artists == sorted(ARTISTS) for artists in counts)
    # The split is by subject: all three drawings of a subject are on the same side.
    assert (metadata.groupby("codepoint")["split"].nunique() == 1).all()
    assert set(metadata["licence"].str.split(":").str[0]) == {"CC-BY 4.0", "CC BY-SA 4.0", "OFL 1.1"}


def test_images_are_32px_rgb_on_white(small_emoji3):
    dataset = load_image_folder(small_emoji3)
    assert dataset.images.shape == (120, 32, 32, 3)
    corners = dataset.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 255).all()
    # Each drawing has content: not an all-white square.
    assert (dataset.images.reshape(120, -1).min(axis=1) < 255).all()


def test_validation_split_is_about_ten_percent_of_subjects():
    subjects = list_subjects()
    share = sum(s.split == "validation" for s in subjects) / len(subjects)
    assert 0.07 < share < 0.13
    assert Subject(0x1F600, "x", "y").split == Subject(0x1F600, "z", "w").split
