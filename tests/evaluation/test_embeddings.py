"""The counterfactual check's embedding cosine, with a tiny CLIP model saved to a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtrak_core.evaluation.counterfactual import add_embedding_cosine, summarize, write_report
from dtrak_core.evaluation.embeddings import EmbeddingModelError, load_embedder


def _images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def test_embedding_is_the_normalised_projection_of_the_vision_tower(clip_dir):
    embedder = load_embedder(clip_dir)
    images = _images(0, 3)
    got = embedder.embed(images)
    # Brute force: CLIP's image embedding is visual_projection(vision_model(x).pooler_output).
    pixels = embedder.processor(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = embedder.model.vision_model(pixel_values=pixels).pooler_output
        expected = embedder.model.visual_projection(pooled).double()
    expected = (expected / expected.norm(dim=1, keepdim=True)).numpy()
    assert got.shape == (3, 8)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-12)
    assert embedder.cosine(images[0], images[0]) == pytest.approx(1.0)
    assert embedder.cosine(images[0], images[1]) == pytest.approx(float(got[0] @ got[1]))
    assert embedder.cosine(images[0], images[1]) < 0.9999
    # The name pins the weights: the same folder gives the same name.
    assert embedder.name == load_embedder(clip_dir).name and embedder.name.startswith(clip_dir.name + "@")


def test_missing_files_are_named(clip_dir, tmp_path):
    with pytest.raises(EmbeddingModelError, match="no config.json"):
        load_embedder(tmp_path)
    (tmp_path / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(EmbeddingModelError, match="preprocessor_config.json"):
        load_embedder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text((clip_dir / "preprocessor_config.json").read_text())
    with pytest.raises(EmbeddingModelError, match="safetensors"):
        load_embedder(tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        load_embedder(clip_dir).embed(np.zeros((2, 16, 16, 3), np.float32))


def _record(folder: Path, seed: int, method: str, before: np.ndarray, after: np.ndarray) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{method}-k2"
    Image.fromarray(before).save(folder / f"{tag}-before.png")
    Image.fromarray(after).save(folder / f"{tag}-after.png")
    record = {"target_seed": seed, "method": method, "tag": tag, "k": 2, "pixel_l2": 1.0, "ssim": 0.5,
              "before_png": f"{tag}-before.png", "after_png": f"{tag}-after.png"}
    (folder / f"{tag}.json").write_text(json.dumps(record))
    return {**record, "folder": str(folder)}


def test_stored_records_gain_the_cosine_of_their_images_once(clip_dir, tmp_path):
    embedder = load_embedder(clip_dir)
    images = _images(1, 4)
    results = tmp_path / "results"
    records = [_record(results / f"seed-{s}", s, "random", images[2 * s], images[2 * s + 1]) for s in (0, 1)]
    updated = [add_embedding_cosine(r, embedder) for r in records]
    for s, r in enumerate(updated):
        assert r["embedding_cosine"] == pytest.approx(embedder.cosine(images[2 * s], images[2 * s + 1]))
        saved = json.loads((results / f"seed-{s}" / "random-k2.json").read_text())
        assert saved["embedding_cosine"] == r["embedding_cosine"] and saved["embedding_model"] == embedder.name
        assert "folder" not in saved
    # Already there for this model: the images are not read again.
    (results / "seed-0" / "random-k2-before.png").unlink()
    assert add_embedding_cosine(updated[0], embedder) == updated[0]

    row = summarize(updated)[0]
    assert row["cos_mean"] == pytest.approx(np.mean([r["embedding_cosine"] for r in updated]))
    assert row["embedding_model"] == embedder.name
    text = write_report(results, tmp_path / "cf.md", "cmd").read_text()
    assert f"{row['cos_mean']:.3f} | {row['cos_median']:.3f} | 5.52 | 0.953" in text
    # A group with a record lacking the cosine reports none rather than a mean of some.
    assert "cos_mean" not in summarize([updated[0], records[1]])[0]
