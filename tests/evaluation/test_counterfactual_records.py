"""A counterfactual record names its images beside it; a path out of its folder is never opened."""

import pytest

from dtrak_core.evaluation.counterfactual import read_result
from dtrak_core.evaluation.units import CorruptUnitError
from dtrak_core.io import write_json_atomic


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "sub/../../outside.png"])
def test_an_image_path_that_leaves_the_record_folder_is_refused(tmp_path, name):
    (tmp_path / "outside.png").write_bytes(b"not read")
    record = tmp_path / "results" / "seed-0" / "random-k2.json"
    record.parent.mkdir(parents=True)
    (record.parent / "random-k2-after.png").write_bytes(b"x")
    write_json_atomic(record, {"before_png": name, "after_png": "random-k2-after.png"})  # a record without checksums
    with pytest.raises(CorruptUnitError, match="is not a file beside the record"):
        read_result(record)


def test_images_beside_the_record_are_accepted(tmp_path):
    record = tmp_path / "r.json"
    for png in ("b.png", "a.png"):
        (tmp_path / png).write_bytes(b"x")
    write_json_atomic(record, {"before_png": "b.png", "after_png": "a.png"})
    assert read_result(record)["before_png"] == "b.png"
