import json

import numpy as np
import pytest
import torch

from dtrak_core.attribution.feature_store import MANIFEST, StaleFeaturesError, compute_features, feature_identity, feature_key, load_features
from dtrak_core.hashing import betas_hash, float_tensor_hash, scheduler_config_hash, state_dict_hash
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.gradients import flatten_gradients
from dtrak_core.tasks import UnconditionalPixelTask

SETTINGS = FeatureSettings(num_timesteps=2, projector="sjlt", projection_dim=256, batch_size=2,
                           device="cpu")


@pytest.fixture
def images():
    return torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_features_do_not_depend_on_batch_size(tiny_unet, scheduler, images):
    results = []
    for batch_size in (1, 2, 5):
        settings = FeatureSettings(**{**SETTINGS.to_dict(), "batch_size": batch_size})
        featurizer = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), settings)
        results.append(np.concatenate([f for _, _, f in featurizer.iter_features(images)]))
    assert results[0].shape == (5, 256)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-4, atol=1e-6)
    # A sample's feature depends on its own id, not its position.
    featurizer = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), SETTINGS)
    swapped = featurizer.featurize_batch(images[[3, 1]], [3, 1])
    np.testing.assert_allclose(swapped, results[0][[3, 1]], rtol=1e-4, atol=1e-6)


def test_identity_features_are_the_averaged_gradients(tiny_unet, scheduler, images):
    settings = FeatureSettings(num_timesteps=2, projector="identity", device="cpu")
    featurizer = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), settings)
    phi = featurizer.featurize_batch(images[:2], [0, 1])
    grads = flatten_gradients(featurizer.gradients(images[:2], [0, 1]), featurizer.param_names)
    assert phi.shape == (2, featurizer.num_parameters) == tuple(grads.shape)
    np.testing.assert_allclose(phi, grads.numpy(), rtol=1e-6)


def test_projection_dim_larger_than_parameters_is_refused(tiny_unet, scheduler):
    settings = FeatureSettings(projection_dim=10_000_000, device="cpu")
    with pytest.raises(ValueError, match="k=10000000 exceeds the number of selected gradient coordinates"):
        Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), settings)


@pytest.mark.parametrize("field,value,message", [
    ("output_fn", "nope", "unknown output function"),
    ("projector", "nope", "unknown projector"),
    ("projection_dim", 0, "projection dimension k=0"),
    ("num_timesteps", 0, "K=0"),
    ("dtype", "fp8", "dtype 'fp8'"),
    ("device", "tpu", "device 'tpu'"),
    ("batch_size", 0, "batch size 0"),
])
def test_settings_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        FeatureSettings(**{field: value})


def test_key_ignores_batch_size_and_device_but_not_values():
    base = SETTINGS.key_fields()
    assert FeatureSettings(**{**SETTINGS.to_dict(), "batch_size": 7, "device": "auto"}).key_fields() == base
    for change in ({"output_fn": "loss"}, {"num_timesteps": 3}, {"seed": 1}, {"projection_dim": 128},
                   {"params": "conv"}, {"dtype": "bf16"}, {"projector": "rademacher"}):
        assert FeatureSettings(**{**SETTINGS.to_dict(), **change}).key_fields() != base


def test_weights_hash_sees_one_changed_weight(tiny_unet):
    before = state_dict_hash(tiny_unet)
    assert state_dict_hash(tiny_unet) == before
    with torch.no_grad():
        tiny_unet.conv_out.bias[0] += 1e-6
    assert state_dict_hash(tiny_unet) != before


def test_cached_features_are_reused_and_stale_ones_refused(tiny_unet, scheduler, images, tmp_path):
    featurizer = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), SETTINGS)
    calls = []
    first = compute_features(featurizer, images, float_tensor_hash(images), root=tmp_path,
                             sched_hash=scheduler_config_hash(scheduler), progress=False,
                             on_batch=lambda done, n: calls.append(done))
    assert calls == [2, 4, 5]
    assert first.shape == (5, 256) and first.features.dtype == np.float32
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["rows_done"] == 5 and manifest["batches_done"] == 3
    assert manifest["settings"]["output_fn"] == "square" and "torch" in manifest["versions"]

    again = compute_features(featurizer, images, float_tensor_hash(images), root=tmp_path,
                             sched_hash=scheduler_config_hash(scheduler), progress=False,
                             on_batch=lambda done, n: calls.append(done))
    assert calls == [2, 4, 5]  # nothing recomputed
    assert again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(first.features))

    # One changed weight: another key, and the old folder refuses the new identity.
    def identity():
        return feature_identity(state_dict_hash(tiny_unet), scheduler_config_hash(scheduler),
                                float_tensor_hash(images), featurizer.settings, range(5), betas_hash(featurizer.schedule))

    assert feature_key(identity()) == first.key
    with torch.no_grad():
        tiny_unet.conv_out.bias[0] += 1e-3
    new_identity = identity()
    assert feature_key(new_identity) != first.key
    with pytest.raises(StaleFeaturesError, match="different model_weights_sha256; refusing"):
        load_features(first.path, new_identity)
    changed = compute_features(featurizer, images, float_tensor_hash(images), root=tmp_path,
                               sched_hash=scheduler_config_hash(scheduler), progress=False)
    assert changed.path != first.path
    assert not np.allclose(np.asarray(changed.features), np.asarray(first.features))

    # Changed data: another key too.
    other = images.clone()
    other[0, 0, 0, 0] = 0.5
    assert float_tensor_hash(other) != float_tensor_hash(images)


def test_folder_with_another_identity_is_refused(tiny_unet, scheduler, images, tmp_path):
    featurizer = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), SETTINGS)
    done = compute_features(featurizer, images, "data-a", root=tmp_path, progress=False)
    # Simulate a folder whose manifest was written for other data under this key.
    manifest = json.loads((done.path / MANIFEST).read_text())
    manifest["identity"]["dataset_sha256"] = "data-b"
    (done.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StaleFeaturesError, match="dataset_sha256"):
        compute_features(featurizer, images, "data-a", root=tmp_path, progress=False)


def test_interrupted_featurization_resumes(tiny_unet, scheduler, images, tmp_path):
    featurizer = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), SETTINGS)
    reference = compute_features(featurizer, images, "data", root=tmp_path / "a", progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_two_batches(done, n):
        if done >= 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        compute_features(featurizer, images, "data", root=tmp_path / "b", progress=False,
                         on_batch=stop_after_two_batches)
    folder = tmp_path / "b" / reference.key
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["status"] == "running" and manifest["rows_done"] == 4
    with pytest.raises(StaleFeaturesError, match="unfinished"):
        load_features(folder)

    # Resume with another batch size: only the missing row is computed.
    resumed_with = FeatureSettings(**{**SETTINGS.to_dict(), "batch_size": 3})
    calls = []
    resumed = compute_features(Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), resumed_with), images, "data",
                               root=tmp_path / "b", progress=False, on_batch=lambda d, n: calls.append(d))
    assert calls == [5]
    assert resumed.key == reference.key
    np.testing.assert_allclose(np.asarray(resumed.features), np.asarray(reference.features), rtol=1e-5, atol=1e-7)


def test_empty_input_is_refused(tiny_unet, scheduler, tmp_path):
    featurizer = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), SETTINGS)
    with pytest.raises(ValueError, match="no images to featurize"):
        compute_features(featurizer, torch.zeros(0, 3, 16, 16), "x", root=tmp_path, progress=False)


def test_k100_is_the_mean_of_its_halves(tiny_unet, scheduler, images):
    """phi is linear in the timestep average and noise depends only on (seed, id, t)."""
    base = {**SETTINGS.to_dict(), "batch_size": 1, "timestep_chunk": 25}
    full = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), FeatureSettings(**{**base, "num_timesteps": 100}))
    assert full.timesteps == list(range(0, 1000, 10))
    phi = full.featurize_batch(images[:1], [4])
    halves = [Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), FeatureSettings(**{**base, "timesteps": steps}))
              .featurize_batch(images[:1], [4]) for steps in (range(0, 1000, 20), range(10, 1000, 20))]
    np.testing.assert_allclose(phi, (halves[0] + halves[1]) / 2, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_features_are_close_to_fp32(tiny_unet, scheduler, images):
    fp32 = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), SETTINGS).featurize_batch(images[:2], [0, 1])
    bf16 = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), FeatureSettings(**{**SETTINGS.to_dict(), "dtype": "bf16"}))
    low = bf16.featurize_batch(images[:2], [0, 1])
    assert low.dtype == np.float32
    cosine = (fp32 * low).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(low, axis=1))
    assert cosine.min() > 0.95
    assert not np.array_equal(fp32, low)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_features_match_cpu(tiny_unet, scheduler, images):
    import copy

    cpu = Featurizer.create(UnconditionalPixelTask(copy.deepcopy(tiny_unet), scheduler), SETTINGS).featurize_batch(images, range(5))
    gpu_settings = FeatureSettings(**{**SETTINGS.to_dict(), "device": "cuda"})
    gpu = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), gpu_settings).featurize_batch(images, range(5))
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * np.abs(cpu).max())


def test_explicit_timesteps_are_reused_from_the_cache(tiny_unet, scheduler, images, tmp_path):
    settings = FeatureSettings(**{**SETTINGS.to_dict(), "timesteps": [5, 50]})
    featurizer = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), settings)
    calls = []
    for _ in range(2):
        compute_features(featurizer, images[:2], "d", root=tmp_path, progress=False,
                         on_batch=lambda d, n: calls.append(d))
    assert calls == [2]


def test_unknown_prediction_type_is_refused(tiny_unet):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow' is not supported; expected one of"):
        UnconditionalPixelTask(tiny_unet, scheduler)
