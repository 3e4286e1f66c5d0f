"""A captioned copy of an image folder: same pixels, a text column from a template."""

import numpy as np
import pytest

from dtrak_core.cli import main
from dtrak_core.datasets import load_image_folder
from dtrak_core.datasets.captions import caption_folder, captions, template_fields
from dtrak_core.datasets.imagefolder import DatasetError
from tests.conftest import write_image_folder


def test_template_fields_and_captions_fill_each_row():
    import pandas as pd

    assert template_fields("{name}, {artist} style") == ["name", "artist"]
    frame = pd.DataFrame({"name": ["cat", "dog"], "artist": ["a", "b"]})
    assert captions(frame, "{name}, {artist} style") == ["cat, a style", "dog, b style"]
    with pytest.raises(ValueError, match="names no metadata column"):
        template_fields("a fixed caption")
    with pytest.raises(DatasetError, match="no column 'style' named by the caption template"):
        captions(frame, "{name} in {style}")


def test_the_copy_has_the_same_pixels_and_metadata_plus_text(tmp_path):
    source = write_image_folder(tmp_path / "data", n=6)
    import pandas as pd

    meta = pd.read_csv(source / "metadata.csv")
    meta["name"] = [f"thing {i}" for i in range(6)]
    meta.to_csv(source / "metadata.csv", index=False)
    assert main(["caption-data", "--data", str(source), "--out", str(tmp_path / "cap")]) == 0
    original, copy = load_image_folder(source), load_image_folder(tmp_path / "cap")
    assert np.array_equal(original.images, copy.images)
    assert copy.metadata["text"].tolist() == [f"thing {i}, {a} style" for i, a in enumerate(meta["artist"])]
    assert copy.metadata.drop(columns="text").equals(original.metadata)
    assert not (tmp_path / ".cap.tmp").exists()
    with pytest.raises(DatasetError, match="already has a 'text' column"):
        caption_folder(tmp_path / "cap", tmp_path / "again", "{name}")
