"""The app-only pieces of dtrak_app: uploads, the score cache, the attribution card."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dtrak_app.card import CardEntry, render_card
from dtrak_app.score_cache import ScoreCache, score_context, target_key
from dtrak_app.uploads import TargetError, prepare_upload
from tests.app.conftest import REPO


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_upload_is_padded_and_resized_with_a_note():
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    prepared = prepare_upload(png_bytes(wide), 16, "wide.png")
    assert prepared.image.shape == (16, 16, 3) and prepared.image.dtype == np.uint8
    assert prepared.original_size == (64, 32)
    assert "padded to 64x64 on white" in prepared.note and "resized to 16x16" in prepared.note
    assert tuple(prepared.image[0, 8]) == (255, 255, 255)  # the padding is white
    assert tuple(prepared.image[8, 8]) == (255, 0, 0)
    same = prepare_upload(png_bytes(Image.new("RGBA", (16, 16), (0, 0, 0, 0))), 16)
    assert "used as is" in same.note and (same.image == 255).all()  # transparent -> white


@pytest.mark.parametrize("data, message", [
    (b"", "is empty"),
    (b"this is not an image", "is not a readable image"),
    (b"x" * 2048, "is 0.0 MiB; at most 0 MiB"),
])
def test_bad_uploads_are_refused(data, message):
    with pytest.raises(TargetError, match=message):
        prepare_upload(data, 16, "f.bin", max_bytes=1024 if len(data) > 1024 else 10**6)


def test_a_decompression_bomb_is_refused_before_decoding():
    # 8000 x 8000 of one colour compresses to a few kB but would decode to 192 MB.
    bomb = png_bytes(Image.new("L", (8000, 8000)))
    assert len(bomb) < 200_000
    with pytest.raises(TargetError) as refused:
        prepare_upload(bomb, 16, "bomb.png")
    assert str(refused.value) == ("bomb.png is 8000x8000 = 64,000,000 pixels, over the limit of 16,777,216: "
                                  "refused as a possible decompression bomb (not decoded)")


def test_an_upload_over_pillows_own_limit_is_named_a_decompression_bomb_too():
    from tests.test_imagefolder import png_header

    with pytest.raises(TargetError) as refused:  # Pillow refuses to open it; the message was "not readable"
        prepare_upload(png_header(20000, 20000), 16, "huge.png")
    assert str(refused.value) == ("huge.png is 400,000,000 pixels, over the limit of 16,777,216: refused as a "
                                  "possible decompression bomb (not decoded)")


MODEL = {"model_weights_sha256": "m", "scheduler_sha256": "s", "noise_schedule_sha256": "b"}


def test_score_cache_round_trip_and_reverse_lookup(tmp_path):
    cache = ScoreCache(tmp_path, score_context(MODEL, "d", "dtrak", {"k": 8}, 10.0))
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(3)]
    vectors = [np.array([3.0, 1.0, 2.0]), np.array([0.0, 5.0, 1.0]), np.array([2.0, 1.0, 9.0])]
    for i, (image, scores) in enumerate(zip(images, vectors)):
        cache.put(target_key(image), scores, image, {"label": f"seed {i}"})
    np.testing.assert_array_equal(cache.get(target_key(images[1])), vectors[1].astype(np.float32))
    assert cache.get("missing") is None
    lookup = cache.reverse_lookup(0)  # image 0 is top for seed 0, rank 2 for seed 2, rank 3 for seed 1
    assert lookup["label"].tolist() == ["seed 0", "seed 2", "seed 1"]
    assert lookup["rank"].tolist() == [1, 2, 3]
    assert (np.asarray(cache.image(target_key(images[2]))) == 2).all()
    other = ScoreCache(tmp_path, score_context(MODEL, "d", "dtrak", {"k": 8}, 100.0))
    assert other.folder != cache.folder and other.targets() == []
    with pytest.raises(ValueError, match="train index 7 is outside 0..2"):
        cache.reverse_lookup(7)


def test_card_shows_target_and_proponents_crisply():
    target = np.zeros((8, 8, 3), np.uint8)
    target[:4] = 255
    entries = [CardEntry(np.full((8, 8, 3), 40 * i, np.uint8), i + 1, 1.0 / (i + 1), "noto", f"f{i}.png")
               for i in range(6)]
    card = render_card(target, entries, "Top proponents of seed 1", "D-TRAK", tile=64, columns=5)
    pixels = np.asarray(card)
    # The target is upscaled 16x with nearest neighbour at (16, 64): hard edge, no blur.
    assert (pixels[64:64 + 64, 16:16 + 128] == 255).all() and (pixels[64 + 64:64 + 128, 16:16 + 128] == 0).all()
    assert card.width >= 16 + 128 + 32 + 5 * 64 and card.height >= 64 + 2 * (64 + 40)
    with pytest.raises(ValueError, match="at least one proponent"):
        render_card(target, [], "t")


def test_dtrak_app_imports_without_a_running_app():
    # A fresh interpreter, as `python -m dtrak_app.bench` or a test starts: the app-only helpers
    # load without Streamlit, and the Streamlit modules load without `streamlit run`.
    code = ("import sys\n"
            "import dtrak_app, dtrak_app.card, dtrak_app.score_cache, dtrak_app.uploads\n"
            "assert 'streamlit' not in sys.modules, 'a helper imported streamlit'\n"
            "import dtrak_app.common, dtrak_app.views, dtrak_app.bench\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
