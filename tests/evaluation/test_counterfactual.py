"""Counterfactual check: the removal set is exactly the intended images; results are cached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dtrak_core.evaluation.counterfactual import (CounterfactualConfig, artist_removal, compare_with_baseline,
                                                  generate_one,
                                                  random_removal, resolve_k, run_counterfactual, summarize,
                                                  top_k_proponents, write_report)


def test_top_k_proponents_is_the_k_largest_with_ties_to_the_lower_index():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)     # many ties
    for k in (1, 5, 17, 40):
        brute = sorted(sorted(range(40), key=lambda j: (-scores[j], j))[:k])
        assert top_k_proponents(scores, k).tolist() == brute
    with pytest.raises(ValueError, match="k=0"):
        top_k_proponents(scores, 0)


def test_random_and_artist_removals():
    a = random_removal(50, 10, random_seed=0, target_seed=3)
    assert len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist()) and a.max() < 50
    assert np.array_equal(a, random_removal(50, 10, 0, 3))
    assert not np.array_equal(a, random_removal(50, 10, 0, 4))
    labels = ["x", "y", "x", "z", "x"]
    assert artist_removal(labels, "x").tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="no training image has artist 'w'"):
        artist_removal(labels, "w")
    with pytest.raises(ValueError, match="every training image"):
        artist_removal(["x", "x"], "x")
    assert resolve_k(None, 396) == 79
    with pytest.raises(ValueError, match="k=10 must be between 1 and 9"):
        resolve_k(10, 10)


def test_bad_method_is_refused_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown attribution method 'nope'"):
        CounterfactualConfig(str(tiny_model_dir), 0, "nope").validate()
    with pytest.raises(ValueError, match="artist name"):
        CounterfactualConfig(str(tiny_model_dir), 0, "artist:").validate()


def _brute_pixel_cosine(target: np.ndarray, images: np.ndarray) -> np.ndarray:
    g = target.reshape(-1).astype(float) / 127.5 - 1
    out = []
    for image in images:
        phi = image.reshape(-1).astype(float) / 127.5 - 1
        out.append(g @ phi / (np.linalg.norm(g) * np.linalg.norm(phi)))
    return np.array(out)


def test_counterfactual_retrains_on_exactly_the_kept_images(tiny_model_dir, tmp_path, monkeypatch):
    from dtrak_core.attribution.loading import load_model, load_training_set

    train = load_training_set(load_model(tiny_model_dir))
    config = CounterfactualConfig(str(tiny_model_dir), target_seed=5, method="pixel", k=3,
                                  results_dir=str(tmp_path / "results"), models_dir=str(tmp_path / "models"))
    record = run_counterfactual(config, progress=False)
    before = generate_one(tiny_model_dir, 5)
    expected = sorted(np.argsort(-_brute_pixel_cosine(before, train.images), kind="stable")[:3].tolist())
    assert record["removed"] == expected and record["k"] == 3
    names = train.metadata["file_name"].astype(str).tolist()
    retrained = json.loads((Path(record["retrained_model"]) / "recipe.json").read_text())
    assert retrained["train_files"] == [n for i, n in enumerate(names) if i not in expected]
    assert retrained["config"]["seed"] == json.loads((tiny_model_dir / "recipe.json").read_text())["config"]["seed"]
    after = generate_one(record["retrained_model"], 5)
    from dtrak_core.evaluation.metrics import pixel_l2, ssim

    assert record["pixel_l2"] == pytest.approx(pixel_l2(before, after))
    assert record["ssim"] == pytest.approx(ssim(before, after))
    folder = tmp_path / "results" / "seed-5"
    assert (folder / record["before_png"]).exists() and (folder / record["after_png"]).exists()

    # A second call loads the stored result and trains nothing.
    import dtrak_core.training as training

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("a cached result must not retrain"))
    assert run_counterfactual(config, progress=False) == record


def test_artist_removal_trains_once_for_many_targets_and_reports(tiny_model_dir, tmp_path):
    results, models = tmp_path / "results", tmp_path / "models"
    records = [run_counterfactual(CounterfactualConfig(str(tiny_model_dir), seed, method, k=2,
                                                       results_dir=str(results), models_dir=str(models)),
                                  progress=False)
               for seed in (0, 1) for method in ("artist:a", "random")]
    from dtrak_core.attribution.loading import load_model, load_training_set

    labels = load_training_set(load_model(tiny_model_dir)).labels
    artist = [r for r in records if r["method"] == "artist:a"]
    assert artist[0]["removed"] == [i for i, a in enumerate(labels) if a == "a"]
    assert artist[0]["removed_by_artist"] == {"a": labels.count("a")} and artist[0]["removed"] == artist[1]["removed"]
    assert artist[0]["retrained_model"] == artist[1]["retrained_model"]
    assert len([p for p in models.iterdir() if p.name != "locks"]) == 3  # one artist model, two random ones
    rows = summarize(records)
    assert {r["removal"] for r in rows} == {"artist:a", "random (k=2)"}
    random_row = next(r for r in rows if r["method"] == "random")
    l2 = [r["pixel_l2"] for r in records if r["method"] == "random"]
    assert random_row["l2_mean"] == pytest.approx(np.mean(l2)) and random_row["targets"] == 2
    (results / "notes.md").write_text("## Reading these numbers\n\nCarefully.\n")
    text = write_report(results, tmp_path / "cf.md", "python -m dtrak_core counterfactual ...").read_text()
    assert "| random (k=2) | 2 |" in text and "5.52" in text
    assert "## Reading these numbers\n\nCarefully.\n\nRegenerate:" in text


def _record(method: str, seed: int, l2: float, ssim: float, k: int = 5) -> dict:
    return {"method": method, "k": k, "target_seed": seed, "pixel_l2": l2, "ssim": ssim}


def test_compare_with_baseline_pairs_by_target_and_k_only():
    records = [_record("random", 0, 2.0, 0.9), _record("random", 1, 4.0, 0.8), _record("random", 2, 9.0, 0.1, k=7),
               _record("dtrak", 0, 3.0, 0.8), _record("dtrak", 1, 5.0, 0.6), _record("dtrak", 3, 50.0, 0.0),
               _record("dtrak", 2, 1.0, 0.9),                       # k=5 has no random partner for seed 2
               _record("trak", 0, 1.0, 0.95), {**_record("artist:a", 0, 7.0, 0.5), "k": 40}]
    rows = {row["method"]: row for row in compare_with_baseline(records, num_bootstrap=200)}
    assert set(rows) == {"dtrak", "trak"}                            # artists have no k to match
    dtrak = rows["dtrak"]
    assert dtrak["targets"] == 2 and dtrak["l2_ratio"] == pytest.approx(8.0 / 6.0)
    assert dtrak["l2_difference"] == pytest.approx(1.0) and dtrak["l2_ci"] is None  # 2 targets: no interval
    assert dtrak["ssim_difference"] == pytest.approx(-0.15) and dtrak["share_changed_more"] == 1.0
    assert dtrak["paper_l2_ratio"] == pytest.approx(9.46 / 5.52)
    assert rows["trak"]["targets"] == 1 and rows["trak"]["share_changed_more"] == 0.0
    # Results of another model never pair with these.
    assert compare_with_baseline([{**r, "model_hash": "other"} if r["method"] == "random" else r
                                  for r in records]) == []
    many = [_record("random", s, 2.0 + s, 0.9) for s in range(6)] + [_record("dtrak", s, 3.0 + s + 0.1 * (s % 2), 0.8)
                                                                       for s in range(6)]
    row = compare_with_baseline(many, num_bootstrap=200)[0]
    assert row["targets"] == 6 and row["l2_ci"][0] <= row["l2_difference"] <= row["l2_ci"][1]
    assert 1.0 <= row["l2_ci"][0] and row["l2_ci"][1] <= 1.1
    versus_trak = compare_with_baseline(records, "trak", num_bootstrap=200)
    assert [(r["method"], r["targets"], r["l2_difference"]) for r in versus_trak] == [("dtrak", 1, 2.0),
                                                                                        ("random", 1, 1.0)]
