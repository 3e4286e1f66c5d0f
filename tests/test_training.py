import json

import pytest
import torch
from safetensors.torch import load_file

from dtrak_core.datasets import load_image_folder
from dtrak_core.diffusion import diffusion_loss
from dtrak_core.models import ModelError
from dtrak_core.tasks import Batch, UnconditionalPixelTask, load_task
from dtrak_core.training import TrainConfig, batch_indices, learning_rate_at, train


def _config(data, out, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(data), out_dir=str(out), preset="tiny", image_size=16, steps=6,
                    batch_size=4, warmup_steps=2, checkpoint_every=3, learning_rate=2e-3)
    settings.update(overrides)
    return TrainConfig(**settings)


def _weights(model_dir):
    return load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def test_training_reduces_the_loss(image_folder, tmp_path):
    data = load_image_folder(image_folder, split="train")
    x0, ids, timesteps = data.to_tensor(), list(range(len(data))), [50, 200, 400, 600]
    out = train(_config(image_folder, tmp_path / "m", steps=60, ema_decay=0.0, checkpoint_every=60),
                progress=False)
    from dtrak_core.models import UNET_PRESETS, make_scheduler

    untrained = UnconditionalPixelTask(UNET_PRESETS["tiny"].build(16, seed=0).eval(), make_scheduler())
    trained = load_task(out)
    before = diffusion_loss(untrained, untrained.prepare(Batch(x0, ids)), timesteps).mean()
    after = diffusion_loss(trained, trained.prepare(Batch(x0, ids)), timesteps).mean()
    assert after < 0.8 * before


def test_same_seed_same_weights_other_seed_other_weights(image_folder, tmp_path):
    a = _weights(train(_config(image_folder, tmp_path / "a"), progress=False))
    b = _weights(train(_config(image_folder, tmp_path / "b"), progress=False))
    c = _weights(train(_config(image_folder, tmp_path / "c", seed=1), progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_exactly(image_folder, tmp_path):
    straight = _weights(train(_config(image_folder, tmp_path / "straight"), progress=False))
    # Stop after 3 steps (a checkpoint), then run again with the full budget: it resumes.
    train(_config(image_folder, tmp_path / "resumed", steps=3), progress=False)
    recipe = json.loads((tmp_path / "resumed" / "recipe.json").read_text())
    assert recipe["steps_done"] == 3
    resumed = _weights(train(_config(image_folder, tmp_path / "resumed"), progress=False))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    recipe = json.loads((tmp_path / "resumed" / "recipe.json").read_text())
    assert recipe["steps_done"] == 6 and recipe["num_train_images"] == 10


def test_resume_refuses_other_settings(image_folder, tmp_path):
    train(_config(image_folder, tmp_path / "m", steps=3), progress=False)
    with pytest.raises(ValueError, match="other settings .*learning_rate"):
        train(_config(image_folder, tmp_path / "m", learning_rate=1e-2), progress=False)


def test_recipe_records_data_subset_and_hash(image_folder, tmp_path):
    out = train(_config(image_folder, tmp_path / "m", steps=3, subset=[0, 2, 4]), progress=False)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["config"]["subset"] == [0, 2, 4]
    assert recipe["train_files"] == ["a/000.png", "a/002.png", "a/004.png"]
    expected = load_image_folder(image_folder, split="train").subset([0, 2, 4]).pixels_and_metadata_hash
    assert recipe["data_hash"] == expected


def test_save_load_round_trip_gives_identical_outputs(tiny_model_dir, tmp_path):
    task = load_task(tiny_model_dir)
    unet = task.denoiser
    task.save(tmp_path / "copy")
    again = load_task(tmp_path / "copy").denoiser
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, again(x, t).sample)


def test_load_task_errors(tmp_path, image_folder):
    with pytest.raises(ModelError, match="does not exist"):
        load_task(tmp_path / "nope")
    with pytest.raises(ModelError, match="not a diffusers pipeline folder"):
        load_task(image_folder)
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ModelError, match="holds a KandinskyPipeline; supported pipelines: DDPMPipeline"):
        load_task(tmp_path / "sd")


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(s, 10, 3, seed=0) for s in range(3)])
    assert len(set(seen.tolist())) == 9  # 3 batches of 3 from one permutation of 10
    assert torch.equal(batch_indices(5, 10, 3, 0), batch_indices(5, 10, 3, 0))


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(data_dir="d", out_dir="o", steps=100, warmup_steps=10, learning_rate=1.0)
    rates = [learning_rate_at(s, config) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 0.01


def test_resume_may_change_checkpointing_and_keeps_fp16_checkpoints(image_folder, tmp_path):
    straight = _weights(train(_config(image_folder, tmp_path / "straight"), progress=False))
    train(_config(image_folder, tmp_path / "r", steps=3), progress=False)
    out = train(_config(image_folder, tmp_path / "r", checkpoint_every=2, keep_checkpoints=True),
                progress=False)
    resumed = _weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-0000004", "step-0000006"]
    weights = load_file(str(out / "checkpoints" / "step-0000006" / "diffusion_pytorch_model.safetensors"))
    assert all(w.dtype == torch.float16 for w in weights.values())
