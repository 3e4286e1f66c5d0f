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


# -- run mechanics: honest resumes, atomic final write, repair (issue 13) -----------------------

def _files(folder, ignore=("recipe.json", "train_complete.json", "train_state.pt", "train_config.json")):
    """sha256 of every file below ``folder`` but those that hold wall-clock time or the folder's path."""
    from tests.reliability.harness import snapshot

    return snapshot(folder, ignore=ignore)


def test_resume_refuses_a_changed_steps_that_changes_the_schedule(image_folder, tmp_path):
    """Stopped after warm-up, a longer --steps would change the learning rate of steps done."""
    train(_config(image_folder, tmp_path / "m", steps=4), progress=False)
    with pytest.raises(ValueError) as error:
        train(_config(image_folder, tmp_path / "m", steps=8), progress=False)
    assert str(error.value) == (
        f"{tmp_path / 'm'}: --steps 8 (recorded: 4) would change the learning rate of the 4 steps already done "
        "(from step 3), so no single run would give these weights; rerun with --steps 4 to finish this run, "
        "or train into another --out")
    with pytest.raises(ValueError, match=r"has done 4 steps already, more than steps=3: rerun with --steps 4"):
        train(_config(image_folder, tmp_path / "m", steps=3), progress=False)
    # Nothing was touched by the refusals: the 4-step model is still complete and loads.
    assert json.loads((tmp_path / "m" / "recipe.json").read_text())["steps_done"] == 4
    load_task(tmp_path / "m")


def test_a_finished_folder_is_left_alone_and_a_rerun_changes_nothing(image_folder, tmp_path, monkeypatch):
    import dtrak_core.training as training

    out = train(_config(image_folder, tmp_path / "m", steps=3), progress=False)
    before = _files(out, ignore=())
    monkeypatch.setattr(training, "_train_steps", lambda *a, **k: pytest.fail("a complete run must not train"))
    assert train(_config(image_folder, out, steps=3, checkpoint_every=1), progress=False) == out
    assert _files(out, ignore=()) == before


@pytest.mark.parametrize("damage", ["no marker", "unet deleted", "weights changed"])
def test_a_damaged_or_half_written_pipeline_is_refused_then_repaired_from_the_state(image_folder, tmp_path, damage):
    straight = train(_config(image_folder, tmp_path / "straight"), progress=False)
    out = train(_config(image_folder, tmp_path / "m"), progress=False)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "no marker":  # killed between the state and the marker
        (out / "train_complete.json").unlink()
        message = (f"{out} is an unfinished training run (train_state.pt but no train_complete.json): it is being "
                   "trained or was interrupted; rerun its train command to finish it")
    elif damage == "unet deleted":
        import shutil

        shutil.rmtree(out / "unet")
        message = f"{out / 'unet' / 'config.json'} is missing (listed in train_complete.json); rerun its train " \
                  "command to repair it from train_state.pt"
    else:
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        message = (f"{weights} does not match its sha256 in train_complete.json (changed or damaged after training); "
                   "rerun its train command to repair it from train_state.pt")
    with pytest.raises(ModelError) as error:
        load_task(out)
    assert str(error.value) == message
    train(_config(image_folder, out), progress=False)
    load_task(out)
    assert _files(out) == _files(straight)
    recipe = json.loads((out / "recipe.json").read_text())
    expected = json.loads((straight / "recipe.json").read_text())
    for key in ("wall_seconds", "config"):
        recipe.pop(key), expected.pop(key)
    assert recipe == expected


def test_training_refuses_a_folder_that_is_not_its_run(image_folder, tmp_path, tiny_model_dir):
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_model_dir, foreign)
    for name in ("train_state.pt", "train_complete.json"):
        (foreign / name).unlink()
    load_task(foreign)  # a pipeline of no run of ours (as the embedded models): readers load it
    with pytest.raises(ValueError, match=f"^{foreign} holds files of no run this trainer can resume or check "
                                         r"\(model_index.json, recipe.json, scheduler, ...; no train_state.pt\): "
                                         "train into an empty or new --out$"):
        train(_config(image_folder, foreign), progress=False)


def test_a_damaged_state_is_named_and_a_stale_marker_cannot_be_extended_without_it(image_folder, tmp_path):
    out = train(_config(image_folder, tmp_path / "m", steps=2), progress=False)
    (out / "train_complete.json").unlink()
    state = out / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"^{state} cannot be read .*; delete it to train {out} again from step 0$"):
        train(_config(image_folder, out, steps=2), progress=False)

    done = train(_config(image_folder, tmp_path / "d", steps=2), progress=False)
    (done / "train_state.pt").unlink()
    train(_config(image_folder, done, steps=2), progress=False)  # complete: nothing to do, no state needed
    with pytest.raises(ValueError, match="finished 2 steps and its train_state.pt is gone, so it cannot go on to 3"):
        train(_config(image_folder, done, steps=3), progress=False)


def test_a_state_whose_bytes_changed_is_refused_by_its_digest(image_folder, tmp_path):
    out = train(_config(image_folder, tmp_path / "m", steps=2), progress=False)
    (out / "train_complete.json").unlink()
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["ema"]["conv_out.bias"][0] += 1.0  # the digest was computed before the change
    torch.save(state, out / "train_state.pt")
    with pytest.raises(ValueError, match="train_state.pt does not match its digest \\(damaged\\); delete it"):
        train(_config(image_folder, out, steps=2), progress=False)


def test_a_state_of_the_previous_trainer_still_resumes(image_folder, tmp_path):
    """States written before the run bookkeeping (no 'run', no digest; config in train_config.json)."""
    straight = train(_config(image_folder, tmp_path / "straight"), progress=False)
    out = train(_config(image_folder, tmp_path / "old", steps=3), progress=False)
    state = torch.load(out / "train_state.pt", weights_only=True)
    del state["run"], state["digest"]
    torch.save(state, out / "train_state.pt")
    (out / "train_complete.json").unlink()
    train(_config(image_folder, out), progress=False)
    assert _files(out) == _files(straight)


def test_one_trainer_per_folder(image_folder, tmp_path):
    from dtrak_core.io import try_lock

    out = tmp_path / "m"
    out.mkdir()
    with try_lock(out / ".train.lock") as mine:
        assert mine
        with pytest.raises(ValueError, match=f"another process is training into {out} .*; wait for it"):
            train(_config(image_folder, out), progress=False)


def test_the_output_folder_is_checked_for_space_before_training(image_folder, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import dtrak_core.io as io
    from dtrak_core.io import OutputError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputError, match=f"^not enough free space for the model in {tmp_path / 'm'}: "
                                          r"needs \d+\.\d MB, 1000 B free$"):
        train(_config(image_folder, tmp_path / "m", keep_checkpoints=True), progress=False)
    assert not (tmp_path / "m").exists()
    monkeypatch.undo()
    # The estimate covers what a run leaves (it also counts the copies that exist only while writing).
    from dtrak_core.models import UNET_PRESETS
    from dtrak_core.training import _footprint

    out = train(_config(image_folder, tmp_path / "m", keep_checkpoints=True), progress=False)
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    config = _config(image_folder, out, keep_checkpoints=True)
    need = _footprint(UNET_PRESETS["tiny"].build(16), config).need_bytes(resuming=False)
    assert written < need < 3 * written + (1 << 20)
    assert shutil.disk_usage(out).free > need
    # A finished folder needs no room for a run: its rerun does nothing (at most a repair).
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - need // 2, need // 2))
    assert train(config, progress=False) == out
