"""Pictures reach the browser inline, so no rerun can leave a broken image behind."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from dtrak_app.common import pixel_image_url
from tests.app.conftest import FAST, PAGES

PREFIX = "data:image/png;base64,"


def decode(url: str) -> np.ndarray:
    assert url.startswith(PREFIX), url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(PREFIX):]))).convert("RGB"))


@pytest.mark.parametrize(("side", "factor"), [(64, 4), (70, 4), (8, 1), (160, 10)])
def test_pixel_image_url_is_the_exact_nearest_neighbour_upscale(side, factor):
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    expected = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    np.testing.assert_array_equal(decode(pixel_image_url(image, side)), expected)


def test_every_picture_on_a_page_is_inline(env):
    app = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=90)
    app.query_params.update({**FAST, "compare": "dtrak,pixel", "seed": "2"})
    app.run()
    assert not app.exception
    urls = [img.url for element in app.get("image") for img in element.proto.imgs]
    assert len(urls) >= 1 + 2 * 10  # the target and two rows of proponents
    # No /media/ URL: those files live only until the next run finishes.
    assert all(url.startswith(PREFIX) for url in urls), [u[:40] for u in urls if not u.startswith(PREFIX)]
    assert {decode(url).shape[2] for url in urls} == {3}
