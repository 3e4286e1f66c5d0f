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


def _sampled(monkeypatch) -> list[list[int]]:
    """Record the seeds each call to ``sample`` draws."""
    from dtrak_core import generation

    calls, real = [], generation.sample
    monkeypatch.setattr(generation, "sample", lambda task, seeds, *a, **k: calls.append(list(seeds)) or real(task, seeds, *a, **k))
    return calls


def test_a_torn_foreign_or_unrecorded_sample_is_sampled_again(tiny_model_dir, tmp_path, monkeypatch):
    out = generate_to_folder(tiny_model_dir, [0, 1, 2, 3], FAST, tmp_path / "s", progress=False)
    clean = {s: (out / f"{s}.png").read_bytes() for s in range(4)}
    index = json.loads((out / "samples.json").read_text())
    assert sorted(index["sha256"]) == ["0", "1", "2", "3"]
    calls = _sampled(monkeypatch)
    (out / "0.png").write_bytes(clean[0][: len(clean[0]) // 2])  # torn
    (out / "1.png").write_bytes(clean[2])  # foreign: a valid PNG, but not seed 1's
    index["sha256"].pop("2")  # on disk, but never recorded (killed before the index was written)
    (out / "samples.json").write_text(json.dumps(index))
    generate_to_folder(tiny_model_dir, [0, 1, 2, 3], FAST, out, progress=False)
    assert calls == [[0, 1, 2]]  # seed 3 was intact
    assert {s: (out / f"{s}.png").read_bytes() for s in range(4)} == clean
    generate_to_folder(tiny_model_dir, [0, 1, 2, 3], FAST, out, progress=False)
    assert calls == [[0, 1, 2]]  # everything verified: nothing sampled, the model not even loaded


def test_samples_written_before_checksums_are_sampled_again(tiny_model_dir, tmp_path, monkeypatch):
    out = generate_to_folder(tiny_model_dir, [0, 1], FAST, tmp_path / "s", progress=False)
    index = json.loads((out / "samples.json").read_text())
    del index["sha256"]
    (out / "samples.json").write_text(json.dumps(index))
    calls = _sampled(monkeypatch)
    generate_to_folder(tiny_model_dir, [0, 1], FAST, out, progress=False)
    assert calls == [[0, 1]] and sorted(json.loads((out / "samples.json").read_text())["sha256"]) == ["0", "1"]


def test_a_second_sampler_waits_for_the_writer_of_the_folder(tiny_model_dir, tmp_path, monkeypatch):
    import threading

    from dtrak_core import generation
    from dtrak_core.io import hold_lock

    out = tmp_path / "s"
    waiting, said = threading.Event(), []
    monkeypatch.setattr(generation, "print", lambda *a, **k: said.append(a[0]) or waiting.set(), raising=False)
    with hold_lock(out / generation.LOCK_FILE):  # another writer holds the folder
        worker = threading.Thread(target=generate_to_folder, args=(tiny_model_dir, [0], FAST, out),
                                  kwargs={"progress": False})
        worker.start()
        assert waiting.wait(timeout=300)
        assert said == [f"waiting for another process writing samples in {out}; they will be reused"]
        assert not (out / "0.png").exists()
    worker.join(timeout=300)
    assert not worker.is_alive() and (out / "0.png").exists()


def test_a_read_only_samples_folder_is_one_line(tiny_model_dir):
    with pytest.raises(ValueError, match=r"^cannot write the samples to /proc/dtrak-test: "):
        generate_to_folder(tiny_model_dir, [0], FAST, "/proc/dtrak-test", progress=False)
