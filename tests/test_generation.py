import json

import numpy as np
import pytest
import torch
from PIL import Image

from dtrak_core.generation import SamplerConfig, generate_to_folder, image_grid, sample, to_pil
from dtrak_core.tasks import load_task

FAST = SamplerConfig(kind="ddim", steps=5)


def test_same_seed_same_image(tiny_model_dir):
    task = load_task(tiny_model_dir)
    a = sample(task, [3, 7], FAST)
    b = sample(task, [3, 7], FAST)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])


def test_seed_result_does_not_depend_on_batch(tiny_model_dir):
    task = load_task(tiny_model_dir)
    for sampler in (FAST, SamplerConfig(kind="ddpm")):
        together = sample(task, [1, 2, 3], sampler)
        alone = sample(task, [2], sampler)
        assert torch.allclose(together[1], alone[0], atol=1e-4)


def test_generate_to_folder_writes_images_and_settings(tiny_model_dir, tmp_path):
    out = generate_to_folder(tiny_model_dir, [0, 1], FAST, tmp_path / "s", progress=False)
    info = json.loads((out / "samples.json").read_text())
    assert info["seeds"] == [0, 1] and info["sampler"] == {"kind": "ddim", "steps": 5, "eta": 0.0}
    first = np.asarray(Image.open(out / "0.png"))
    assert first.shape == (16, 16, 3)
    # Regenerating from the recorded settings gives the same pixels.
    task = load_task(tiny_model_dir)
    again = np.asarray(to_pil(sample(task, [0], SamplerConfig(**info["sampler"])))[0])
    assert np.abs(first.astype(int) - again.astype(int)).max() <= 1
    # Existing seeds are kept, new ones added.
    (out / "0.png").write_bytes((out / "0.png").read_bytes())
    generate_to_folder(tiny_model_dir, [1, 2], FAST, out, progress=False)
    assert json.loads((out / "samples.json").read_text())["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match="another model or sampler"):
        generate_to_folder(tiny_model_dir, [0], SamplerConfig(steps=6), out, progress=False)


def test_bad_sampler_settings():
    with pytest.raises(ValueError, match="sampler must be 'ddim' or 'ddpm'"):
        SamplerConfig(kind="euler").validate()
    with pytest.raises(ValueError, match="steps must be positive"):
        SamplerConfig(steps=0).validate()


def test_image_grid_tiles_without_blur():
    images = [Image.new("RGB", (2, 2), c) for c in ("red", "blue", "green")]
    grid = image_grid(images, columns=2, scale=3)
    assert grid.size == (12, 12)
    assert grid.getpixel((5, 5)) == (255, 0, 0) and grid.getpixel((6, 0)) == (0, 0, 255)
    assert grid.getpixel((0, 6)) == (0, 128, 0) and grid.getpixel((11, 11)) == (255, 255, 255)
