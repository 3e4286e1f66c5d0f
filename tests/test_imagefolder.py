import numpy as np
import pytest
from PIL import Image

from dtrak_core.datasets import DatasetError, load_image_folder


def test_loads_images_metadata_and_labels(image_folder):
    dataset = load_image_folder(image_folder)
    assert dataset.images.shape == (12, 16, 16, 3) and dataset.images.dtype == np.uint8
    assert dataset.labels[:2] == ["a", "b"]
    tensor = dataset.to_tensor([0, 1])
    assert tensor.shape == (2, 3, 16, 16) and tensor.min() >= -1 and tensor.max() <= 1
    # The tensor is the decoded file, rescaled.
    first = np.asarray(Image.open(image_folder / "a/000.png"))
    assert np.allclose((tensor[0].permute(1, 2, 0).numpy() + 1) * 127.5, first, atol=1e-4)


def test_split_and_where(image_folder):
    dataset = load_image_folder(image_folder, split="validation")
    assert len(dataset) == 2
    assert dataset.subset(dataset.where("artist", ["b"])).labels == ["b", "b"]


def test_corrupt_file_names_the_file(image_folder):
    (image_folder / "a/000.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"a/000\.png is not a readable image"):
        load_image_folder(image_folder)


def test_truncated_png_names_the_file(image_folder):
    data = (image_folder / "b/001.png").read_bytes()
    (image_folder / "b/001.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"b/001\.png"):
        load_image_folder(image_folder)


def test_image_without_metadata_row(image_folder):
    Image.new("RGB", (16, 16)).save(image_folder / "a/extra.png")
    with pytest.raises(DatasetError, match=r"a/extra\.png has no row in .*metadata\.csv"):
        load_image_folder(image_folder)


def test_metadata_row_without_file(image_folder):
    (image_folder / "a/000.png").unlink()
    with pytest.raises(DatasetError, match=r"a/000\.png does not exist"):
        load_image_folder(image_folder)


def test_metadata_without_file_name_column(image_folder):
    (image_folder / "metadata.csv").write_text("name,artist\nx.png,a\n")
    with pytest.raises(DatasetError, match="no 'file_name' column"):
        load_image_folder(image_folder)


def test_grayscale_and_rgba_are_converted(tmp_path):
    Image.new("L", (8, 8), 0).save(tmp_path / "gray.png")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    dataset = load_image_folder(tmp_path)  # no metadata.csv: every image, sorted
    gray, transparent = dataset.images
    assert (gray == 0).all()
    assert tuple(transparent[0, 0]) == (255, 0, 0)
    assert tuple(transparent[4, 4]) == (255, 255, 255)  # transparency becomes white


def test_odd_size_is_an_error_unless_resize(image_folder):
    Image.new("RGB", (20, 16), "red").save(image_folder / "a/000.png")
    with pytest.raises(DatasetError, match=r"a/000\.png is 20x16; expected 16x16"):
        load_image_folder(image_folder, image_size=16)
    dataset = load_image_folder(image_folder, image_size=16, resize=True)
    assert dataset.images.shape[1:] == (16, 16, 3)
    assert tuple(dataset.images[0, 8, 8]) == (255, 0, 0)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="has no images"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_content_hash_changes_with_pixels(image_folder):
    before = load_image_folder(image_folder).pixels_and_metadata_hash
    assert load_image_folder(image_folder).pixels_and_metadata_hash == before
    image = np.asarray(Image.open(image_folder / "a/000.png")).copy()
    image[0, 0, 0] ^= 1
    Image.fromarray(image).save(image_folder / "a/000.png")
    assert load_image_folder(image_folder).pixels_and_metadata_hash != before
