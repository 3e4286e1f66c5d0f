"""The method registry and score_targets, the one scoring entry point of CLI and app."""

import numpy as np
import pytest
import torch

from tests.attribution.conftest import synthetic_images
from dtrak_core.attribution import scorers
from dtrak_core.attribution.featurizer import FeatureSettings
from dtrak_core.attribution.methods import (APP_METHODS, METHODS, FeaturesNotReady, Method, MethodCache,
                                            get_method, score_targets, train_features)
from dtrak_core.attribution.dataset_features import feature_status
from dtrak_core.attribution.loading import load_dataset_for, load_model
from dtrak_core.attribution.scorers import SCORERS, Scorer, ScoreInputs
from dtrak_core.conventions import TARGET_ID_OFFSET

SETTINGS = FeatureSettings(num_timesteps=2, projection_dim=64, device="cpu")


@pytest.fixture
def setup(model_dir, image_folder, tmp_path):
    model = load_model(model_dir)
    train = load_dataset_for(model, image_folder)
    targets = synthetic_images(2, seed=9)
    return model, train, targets, tmp_path / "features"


def test_registry_names_and_app_menu():
    assert METHODS["dtrak"].output_fn == "square" and METHODS["trak"].output_fn == "loss"
    assert set(APP_METHODS) <= set(METHODS)
    assert not METHODS["pixel"].needs_features and METHODS["dtrak"].uses_lambda and not METHODS["cosine"].uses_lambda
    assert get_method("pixel-cosine") is METHODS["pixel"]
    with pytest.raises(ValueError, match=r"^unknown attribution method 'nope'; expected one of \['dtrak', 'trak', "):
        get_method("nope")
    assert list(METHODS)[:2] == ["dtrak", "trak"] and len(METHODS) == 10
    assert METHODS["random"].key_fields == ("seed",) and METHODS["dtrak"].key_fields == ("features", "lambda")
    assert METHODS["trak"].feature_settings(SETTINGS).output_fn == "loss"
    assert METHODS["trak"].feature_settings(SETTINGS, "l1").output_fn == "l1"


def test_kernel_method_matches_the_kernel_scorer(setup):
    model, train, targets, root = setup
    cache = MethodCache()
    out = score_targets("dtrak", [model], train, targets, SETTINGS, [1.0, 10.0], root, cache=cache)
    phi = train_features(model, train, SETTINGS, root, cache=cache).features
    featurizer = cache.featurizer(model, SETTINGS)
    # Targets independently: the same pixels in [-1, 1], noise ids offset from the training ids.
    images = torch.from_numpy(targets.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    g = featurizer.featurize_batch(images, [TARGET_ID_OFFSET, TARGET_ID_OFFSET + 1])
    for lam in (1.0, 10.0):
        np.testing.assert_allclose(out[lam], scorers.KernelScorer(phi).scores(g, lam), rtol=1e-4, atol=1e-6)
    assert out[1.0].shape == (2, len(train)) and not np.allclose(out[1.0], out[10.0])


def test_baselines_and_no_lambda_key(setup):
    model, train, targets, root = setup
    pixel = score_targets("pixel", [model], train, targets, root=root)
    (key, matrix), = pixel.items()
    assert np.isnan(key)
    np.testing.assert_allclose(matrix, scorers.pixel_scores(targets, train.images, "cosine"))
    a = score_targets("random", [model], train, targets, seed=3)
    b = score_targets("random", [model], train, targets, seed=3)
    np.testing.assert_array_equal(next(iter(a.values())), next(iter(b.values())))
    assert not (root).exists()  # baselines never featurize


def test_missing_features_are_reported_not_computed(setup):
    model, train, targets, root = setup
    with pytest.raises(FeaturesNotReady, match="training features are missing"):
        score_targets("dtrak", [model], train, targets, SETTINGS, root=root, compute_missing=False)
    assert feature_status(model, train, SETTINGS, root).state == "missing"
    features = train_features(model, train, SETTINGS, root)
    status = feature_status(model, train, SETTINGS, root)
    assert status.state == "complete" and status.key == features.key and status.rows_done == len(train)
    out = score_targets("dtrak", [model], train, targets, SETTINGS, root=root, compute_missing=False)
    assert next(iter(out.values())).shape == (2, len(train))


def test_cache_reuses_the_kernel_and_featurizer(setup):
    model, train, targets, root = setup
    cache = MethodCache()
    score_targets("dtrak", [model], train, targets, SETTINGS, root=root, cache=cache)
    phi = train_features(model, train, SETTINGS, root, cache=cache)
    assert cache.kernel(phi) is cache.kernel(phi)
    assert cache.featurizer(model, SETTINGS) is cache.featurizer(model, SETTINGS)


def test_bad_targets_are_refused(setup):
    model, train, _, root = setup
    with pytest.raises(ValueError, match="target images are 8x8 but the training images are 16x16"):
        score_targets("pixel", [model], train, synthetic_images(1, size=8))
    with pytest.raises(ValueError, match="non-empty uint8 array"):
        score_targets("pixel", [model], train, np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="lambda=-1.0"):
        score_targets("dtrak", [model], train, synthetic_images(1), SETTINGS, [-1.0], root)


def test_a_method_must_fit_its_scorer():
    with pytest.raises(ValueError, match=r"^unknown scorer 'ridge'; expected one of \['kernel'"):
        Method("x", "X", "ridge", "square", "")
    with pytest.raises(ValueError, match="scorer 'kernel' reads gradient features, so it needs an output function"):
        Method("x", "X", "kernel", None, "")
    with pytest.raises(ValueError, match="scorer 'random' reads no gradients, so its output function must be None"):
        Method("x", "X", "random", "square", "")
    with pytest.raises(ValueError, match="unknown output function 'sqaure'"):
        Method("x", "X", "kernel", "sqaure", "")


class ScaledDotScorer(Scorer):
    """A rule defined outside the library: g . phi / lambda, summed over models."""

    uses_lambda = True

    def matrix(self, inputs: ScoreInputs, lam: float) -> np.ndarray:
        return sum(scorers.dot_scores(g, phi) for g, phi in inputs.per_model()) / lam


def test_a_scorer_registered_elsewhere_is_used_by_score_targets(setup, monkeypatch):
    model, train, targets, root = setup
    monkeypatch.setattr(SCORERS, "_entries", dict(SCORERS._entries))  # restored after the test
    SCORERS.register("test-scaled-dot")(ScaledDotScorer)
    method = Method("scaled", "scaled dot", "test-scaled-dot", "square", "a test rule")
    assert method.uses_lambda and method.needs_features
    cache = MethodCache()
    out = score_targets(method, [model], train, targets, SETTINGS, [2.0, 4.0], root, cache=cache)
    phi = train_features(model, train, SETTINGS, root, cache=cache).features
    images = torch.from_numpy(targets.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    g = cache.featurizer(model, SETTINGS).featurize_batch(images, [TARGET_ID_OFFSET, TARGET_ID_OFFSET + 1])
    expected = g.astype(np.float64) @ np.asarray(phi, dtype=np.float64).T
    assert list(out) == [2.0, 4.0]
    np.testing.assert_allclose(out[2.0], expected / 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out[4.0], expected / 4, rtol=1e-4, atol=1e-6)


def test_ensembles_and_tracin_average_over_models(setup):
    model, train, targets, root = setup
    cache = MethodCache()
    one = score_targets("dtrak", [model], train, targets, SETTINGS, [1.0], root, cache=cache)[1.0]
    two = score_targets("dtrak", [model, model], train, targets, SETTINGS, [1.0], root, cache=cache)[1.0]
    np.testing.assert_allclose(two, one, rtol=1e-6)
    (_, dot), = score_targets("dot", [model], train, targets, SETTINGS, root=root, cache=cache).items()
    (_, tracin), = score_targets("tracin", [model, model], train, targets, SETTINGS, root=root, cache=cache).items()
    np.testing.assert_allclose(tracin, dot, rtol=1e-6)
