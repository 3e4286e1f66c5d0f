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


# ----------------------------------------------------------------------------- confinement

def add_row(folder, file_name: str, split: str = "train") -> None:
    with open(folder / "metadata.csv", "a") as f:
        f.write(f'"{file_name}",a,{split}\n')


def confinement_message(folder, row: int, file_name: str) -> str:
    return (f"{folder / 'metadata.csv'} row {row}: file_name {file_name!r} must name a file inside the dataset "
            f"folder {folder} (after following links)")


@pytest.fixture
def nothing_opened(monkeypatch):
    """Fails the test if any image is opened (the check must come first)."""
    import dtrak_core.datasets.imagefolder as module

    opened = []
    monkeypatch.setattr(module.Image, "open", lambda *a, **k: opened.append(a) or pytest.fail(f"opened {a}"))
    return opened


def test_file_names_outside_the_folder_are_refused_alike_before_anything_is_opened(image_folder, tmp_path,
                                                                                   nothing_opened):
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (16, 16)).save(other / "x.png")
    (image_folder / "a" / "link.png").symlink_to(other / "x.png")  # a link inside, to a file outside
    (image_folder / "a" / "dir-link").symlink_to(other, target_is_directory=True)
    hostile = ["../other/x.png", "../other/missing.png", "/etc/shadow", "/no/such/file.png", "a/link.png",
               "a/dir-link/x.png", "a/../../other/x.png", "", ".", "a/.."]
    for file_name in hostile:
        metadata = (image_folder / "metadata.csv").read_text()
        add_row(image_folder, file_name, split="validation")  # refused even when its split is not loaded
        with pytest.raises(DatasetError) as refused:
            load_image_folder(image_folder, split="train")
        # The same words whether the outside path exists or not: only the row and the value given.
        assert str(refused.value) == confinement_message(image_folder, 13, file_name)
        (image_folder / "metadata.csv").write_text(metadata)
    assert nothing_opened == []


def test_a_link_inside_the_folder_to_a_file_inside_it_is_fine(image_folder):
    (image_folder / "b" / "again.png").symlink_to(image_folder / "a" / "000.png")
    add_row(image_folder, "b/again.png")
    dataset = load_image_folder(image_folder)
    assert (dataset.images[-1] == dataset.images[0]).all()


def test_without_metadata_a_link_to_outside_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (tmp_path / "data" / "zz.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(DatasetError) as refused:
        load_image_folder(tmp_path / "data")
    assert str(refused.value) == (f"dataset folder {tmp_path / 'data'}: file_name 'zz.png' must name a file inside "
                                  f"the dataset folder {tmp_path / 'data'} (after following links)")


# ----------------------------------------------------------------------------- decompression bombs

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 1-bit pixels (its data is never decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size, count", [
    ((5000, 5000), "5000x5000 = 25,000,000 pixels"),  # over ours, under Pillow's warning
    ((10000, 10000), "10000x10000 = 100,000,000 pixels"),  # Pillow warns (silenced): ours explains
    ((20000, 20000), "400,000,000 pixels"),  # Pillow refuses to open it: its count, our words
])
def test_a_decompression_bomb_is_named_as_such(image_folder, size, count, recwarn):
    (image_folder / "a/000.png").write_bytes(png_header(*size))
    with pytest.raises(DatasetError) as refused:
        load_image_folder(image_folder)
    assert str(refused.value) == (f"{image_folder / 'a/000.png'} is {count}, over the limit of 16,777,216: "
                                  "refused as a possible decompression bomb (not decoded)")
    assert not [w for w in recwarn if "decompression" in str(w.message).lower()]


def test_the_wrong_size_error_says_how_to_resize_from_the_command_line_and_the_library(image_folder):
    Image.new("RGB", (20, 16), "red").save(image_folder / "a/000.png")
    with pytest.raises(DatasetError) as refused:
        load_image_folder(image_folder, image_size=16)
    assert str(refused.value) == (f"{image_folder / 'a/000.png'} is 20x16; expected 16x16 (resize with --resize "
                                  "on the command line, or resize=True in the library)")
