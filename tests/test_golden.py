"""Golden hashes: features, training, losses and samples are byte-identical across refactors.

The values below were computed by the code as it stood before the structure change (issue 11)
and must never move: old feature caches, the committed LDS / counterfactual results and the
bit-for-bit retrains all depend on them. Everything runs on one CPU thread (the thread count
can change float reduction order) on the ``tiny`` UNet preset.

If a hash changes on purpose (a new algorithm), that is a new format: bump the feature store's
format version and regenerate these values with ``python tests/test_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

OUTPUT_FUNCTIONS = ("loss", "square", "avg", "l1", "l2", "linf", "elbo")
PROJECTORS = ("sjlt", "rademacher", "gaussian", "identity")

GOLDEN = {
    "diffusion_loss": "e30389303fb34b9b10232944",
    "feature_store/key": "78b8fd9726e22996cf2ba7b1a201efad",
    "feature_store/values": "40bbbc9177a28155db11e049",
    "features/avg/sjlt": "cdc6956776f640cceb9edb95",
    "features/elbo/sjlt": "0e996e5432a0bfce783b9c59",
    "features/l1/sjlt": "de7352ea284333141281a142",
    "features/l2/sjlt": "45943c13fa489c13a5bc92b5",
    "features/linf/sjlt": "338f22cc911eb153312a45ee",
    "features/loss/sjlt": "8c5135304874683e5838e0a1",
    "features/square/gaussian": "466e3262e4282e264f7c8eab",
    "features/square/identity": "40bbbc9177a28155db11e049",
    "features/square/rademacher": "5d1b9c4639577dcde7d0f39f",
    "features/square/sjlt": "adec8af6760c0ed4ebf9272b",
    "sample/ddim4": "7c065940a4cfdfa9b94f0387",
    "train/ema_weights": "721ca85b973ba0e5a454e3f6",
}


def _digest(array) -> str:
    array = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()[:24]


def _images(n: int = 3, size: int = 16) -> torch.Tensor:
    rng = np.random.default_rng(11)
    return torch.from_numpy(rng.uniform(-1, 1, (n, 3, size, size)).astype(np.float32))


def _unet():
    from dtrak_core.models import UNET_PRESETS

    return UNET_PRESETS["tiny"].build(image_size=16, seed=0).eval()


def feature_digests() -> dict[str, str]:
    from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
    from dtrak_core.models import make_scheduler
    from dtrak_core.tasks import UnconditionalPixelTask

    out = {}
    cases = [(f, "sjlt") for f in OUTPUT_FUNCTIONS] + [("square", p) for p in PROJECTORS if p != "sjlt"]
    for output_fn, projector in cases:
        settings = FeatureSettings(output_fn=output_fn, projector=projector, projection_dim=64,
                                   num_timesteps=3, device="cpu", batch_size=2)
        featurizer = Featurizer.create(UnconditionalPixelTask(_unet(), make_scheduler()), settings)
        rows = [features for _, _, features in featurizer.iter_features(_images(), [5, 9, 1 << 40])]
        out[f"features/{output_fn}/{projector}"] = _digest(np.concatenate(rows))
    # The store key of the last case: old feature folders stay valid only while it holds.
    from dtrak_core.attribution.feature_store import compute_features
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        stored = compute_features(featurizer, _images(), "data-hash", [5, 9, 1 << 40], root, progress=False)
        out["feature_store/key"] = stored.key
        out["feature_store/values"] = _digest(np.asarray(stored.features))
    return out


def training_digests(tmp: Path) -> dict[str, str]:
    from dtrak_core.hashing import state_dict_hash
    from dtrak_core.datasets import load_image_folder
    from dtrak_core.diffusion import diffusion_loss
    from dtrak_core.generation import SamplerConfig, sample
    from dtrak_core.tasks import Batch, load_task
    from dtrak_core.training import TrainConfig, train

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import write_image_folder

    data = write_image_folder(tmp / "data")
    config = TrainConfig(data_dir=str(data), out_dir=str(tmp / "model"), preset="tiny", image_size=16,
                         steps=4, batch_size=4, warmup_steps=2, checkpoint_every=2)
    model_dir = train(config, progress=False)
    task = load_task(model_dir)
    x0 = load_image_folder(data, split="train").to_tensor()
    losses = diffusion_loss(task, task.prepare(Batch(x0, list(range(len(x0))))), [0, 499, 999], seed=3)
    images = sample(task, [0, 1], SamplerConfig(steps=4))
    return {"train/ema_weights": state_dict_hash(task.denoiser)[:24],
            "diffusion_loss": _digest(losses.numpy()),
            "sample/ddim4": _digest(images.numpy())}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_features_are_byte_identical_to_the_golden_hashes():
    got = feature_digests()
    expected = {k: v for k, v in GOLDEN.items() if k.startswith("features/")}
    assert len(expected) == 10
    expected.update({k: v for k, v in GOLDEN.items() if k.startswith("feature_store/")})
    assert got == expected


def test_training_losses_and_samples_are_byte_identical_to_the_golden_hashes(tmp_path):
    got = training_digests(tmp_path)
    assert got == {k: GOLDEN[k] for k in got}


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps({**feature_digests(), **training_digests(Path(tmp))}, indent=4, sort_keys=True))
