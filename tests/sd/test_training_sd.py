"""train-lora and train-sd on the shared run mechanics: killed at every write point and rerun,
the same folder as an uninterrupted run; folders diffusers loads alone; the caption tokenizer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dtrak_core.training_run as training_run
import dtrak_core.training_sd as training_sd
from dtrak_core.lora import BASE_FILE, DIFFUSERS_WEIGHTS
from dtrak_core.tasks import ModelError, load_task
from dtrak_core.training_run import RunError
from dtrak_core.training_sd import SdTrainConfig, build_caption_tokenizer, train_lora, train_sd
from tests.reliability.harness import KILLED, run_cli, snapshot
from tests.sd.conftest import caption, lora_config

#: Differ between two correct runs: wall-clock seconds (the recipe; the marker holds the recipe's
#: sha256; the state holds the seconds). Compared without them below.
WALL_CLOCK = ("recipe.json", "train_complete.json", "train_state.pt")
UNFINISHED = "is an unfinished training run (train_state.pt but no train_complete.json)"


def _recipe_without_wall_clock(folder: Path) -> dict:
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe.pop("wall_seconds")
    return recipe


def _state_without_wall_clock(folder: Path) -> dict:
    state = torch.load(folder / "train_state.pt", weights_only=True)
    state.pop("wall_seconds"), state.pop("digest")
    return json.loads(json.dumps(state, default=lambda t: t.tolist()))


def _assert_same_run(folder: Path, reference: Path) -> None:
    assert snapshot(folder, ignore=WALL_CLOCK) == snapshot(reference, ignore=WALL_CLOCK)
    assert _recipe_without_wall_clock(folder) == _recipe_without_wall_clock(reference)
    assert _state_without_wall_clock(folder) == _state_without_wall_clock(reference)
    marker, expected = (json.loads((f / "train_complete.json").read_text()) for f in (folder, reference))
    marker["files"].pop("recipe.json"), expected["files"].pop("recipe.json")
    assert marker == expected


def lora_args(base: Path, data: Path, out: Path) -> list:
    return ["train-lora", "--base", base, "--data", data, "--out", out, "--rank", "2", "--steps", "4",
            "--batch-size", "4", "--warmup-steps", "2", "--checkpoint-every", "2", "--lr", "1e-2",
            "--caption-dropout", "0.3", "--keep-checkpoints"]


def test_train_lora_killed_at_every_write_point_resumes_to_the_uninterrupted_run(sd_base, sd_data, tmp_path):
    """One chain of SIGKILLed runs through train.state, train.checkpoint, train.pipeline and
    train.marker, each rerun starting from what the previous kill left; readers refuse the
    folder in between; the last rerun gives the uninterrupted run's folder byte for byte."""
    out = tmp_path / "lora"
    config = lora_config(sd_base, sd_data, out, rank=2, steps=4, batch_size=4, warmup_steps=2, checkpoint_every=2,
                         learning_rate=1e-2, caption_dropout=0.3, keep_checkpoints=True)  # = lora_args
    # the killed runs write to the same path (out_dir is in the recipe)
    reference = shutil.move(train_lora(config, progress=False), tmp_path / "reference")
    chain = [
        # The last state save (step 4): its temporary file is left, the state stays at step 2
        # (the step-4 checkpoint was renamed before it: the rerun removes it).
        ("train.state@2", "checkpoints/step-0000004/pytorch_lora_weights.safetensors"),
        # Resumed at 2; killed with the new step-4 checkpoint written but not renamed.
        ("train.checkpoint@1", "checkpoints/.step-0000004.tmp/pytorch_lora_weights.safetensors"),
        # Resumed at 2 again, finished; the adapter folder half moved in: base_model.json only.
        ("train.pipeline@2", "base_model.json"),
        # A repair from the state (no step left to train), killed before the marker.
        ("train.marker@1", DIFFUSERS_WEIGHTS),
    ]
    for fault, left in chain:
        result = run_cli(lora_args(sd_base, sd_data, out), fault=fault)
        assert result.returncode == KILLED, (fault, result.stderr[-2000:])
        assert (out / left).exists() and not (out / "train_complete.json").exists(), fault
        with pytest.raises(ModelError, match=re.escape(f"{out} {UNFINISHED}")):
            load_task(out)
    result = run_cli(lora_args(sd_base, sd_data, out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"wrote {out}"
    _assert_same_run(out, reference)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["trainer"] == "sd-lora" and recipe["steps_done"] == 4 and recipe["config"]["subset"] is None
    assert recipe["train_files"] == [f"img_{i:02d}.png" for i in range(8)]
    assert json.loads((out / BASE_FILE).read_text())["base_model"] == str(Path(sd_base).resolve())
    # each kept checkpoint is an adapter folder of its own (for TracIn); the last one is the final adapter
    last = out / "checkpoints" / "step-0000004"
    assert (last / DIFFUSERS_WEIGHTS).read_bytes() == (out / DIFFUSERS_WEIGHTS).read_bytes()
    first = out / "checkpoints" / "step-0000002"
    assert (first / DIFFUSERS_WEIGHTS).read_bytes() != (last / DIFFUSERS_WEIGHTS).read_bytes()
    assert load_task(first).has_adapter
    # a finished run is returned at once, and changed weights are refused at load
    assert train_lora(config, progress=False) == out
    _assert_same_run(out, reference)
    weights = out / DIFFUSERS_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    with pytest.raises(ModelError, match=re.escape(f"{weights} does not match its sha256 in train_complete.json")):
        load_task(out)


def test_train_lora_refuses_to_resume_with_other_settings_or_another_trainers_folder(sd_base, sd_data, tmp_path):
    def config(**changes):
        return lora_config(sd_base, sd_data, tmp_path / "out", **{"steps": 3, "warmup_steps": 1, **changes})

    train_lora(config(), progress=False)
    with pytest.raises(RunError) as error:
        train_lora(config(rank=2), progress=False)
    assert str(error.value) == (f"{tmp_path / 'out'} holds a run with other settings (rank 4 -> 2); use another --out "
                                "or delete it")
    # more steps: the learning rate of step 2 (cosine decay over --steps) would change
    with pytest.raises(RunError, match=re.escape(" --steps 6 (recorded: 3) would change the learning rate of the 3 "
                                                 "steps already done (from step 2)")):
        train_lora(config(steps=6), progress=False)
    assert train_lora(config(checkpoint_every=1), progress=False) == tmp_path / "out"  # free: finished as it was
    sd_copy = shutil.copytree(sd_base, tmp_path / "sd")
    with pytest.raises(RunError) as error:
        train_lora(lora_config(sd_base, sd_data, sd_copy), progress=False)
    assert str(error.value) == (f"{sd_copy / 'train_complete.json'} was written by the sd trainer, not sd-lora; "
                                "use another --out")


def _sd_config(data: Path, out: Path, **changes) -> SdTrainConfig:
    values = dict(data_dir=str(data), out_dir=str(out), preset="tiny", image_size=16, vae_steps=3, steps=4,
                  batch_size=4, warmup_steps=1, checkpoint_every=2, max_length=12, learning_rate=1e-2,
                  text_learning_rate=1e-3, caption_dropout=0.5)
    values.update(changes)
    return SdTrainConfig(**values)


class _Killed(Exception):
    pass


def _fail_at(monkeypatch, point: str, nth: int) -> None:
    """Make the run mechanics' ``nth`` hit of fault point ``point`` raise (an in-process stand-in
    for the harness's SIGKILL: nothing after the point is written)."""
    hits = []

    def fault(name: str) -> None:
        if name == point:
            hits.append(name)
            if len(hits) == nth:
                raise _Killed(point)

    monkeypatch.setattr(training_run, "fault_point", fault)


def test_train_sd_interrupted_in_the_unet_stage_and_in_its_final_write_gives_the_uninterrupted_run(
        sd_data, tmp_path, monkeypatch):
    """States at steps 2 (VAE stage), 4, 6 (UNet stage), 7. Interrupted saving step 6's state,
    resumed from step 4; then interrupted before the pipeline's first part moves in; the last
    rerun only repairs the folder from the state (no step left), which must set the VAE's latent
    scale as the run did: the same files as a run never interrupted."""
    out = tmp_path / "sd"
    reference = shutil.move(train_sd(_sd_config(sd_data, out), progress=False), tmp_path / "reference")
    for point, nth in (("train.state", 3), ("train.pipeline", 1)):
        _fail_at(monkeypatch, point, nth)
        with pytest.raises(_Killed):
            train_sd(_sd_config(sd_data, out), progress=False)
        monkeypatch.undo()
        assert not (out / "train_complete.json").exists()
        with pytest.raises(ModelError, match=re.escape(UNFINISHED)):
            load_task(out)
    assert torch.load(out / "train_state.pt", weights_only=True)["run"]["step"] == 7
    assert train_sd(_sd_config(sd_data, out), progress=False) == out
    _assert_same_run(out, reference)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["trainer"] == "sd" and recipe["steps_done"] == 7 and recipe["scaling_factor"] > 0
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == recipe["scaling_factor"]
    assert sorted(p.name for p in out.iterdir()) == [
        ".train.lock", "model_index.json", "recipe.json", "scheduler", "text_encoder", "tokenizer",
        "train_complete.json", "train_config.json", "train_state.pt", "unet", "vae"]
    # more steps than vae_steps + steps allows are refused with what to do
    with pytest.raises(RunError) as error:
        train_sd(_sd_config(sd_data, out, steps=2), progress=False)
    assert str(error.value) == (f"{out} has done 7 steps already, more than the 5 of steps=2 and the other stages: "
                                "rerun with --steps 4, or train into another --out")


def test_sd_learning_rate_counts_the_vae_steps_first():
    config = _sd_config(Path("d"), Path("o"), vae_steps=3, steps=10, warmup_steps=2, vae_learning_rate=0.5,
                        learning_rate=0.1)
    assert [training_sd.sd_learning_rate(config, s) for s in range(5)] == [0.5, 0.5, 0.5, 0.05, 0.1]
    assert training_sd.sd_learning_rate(config, 12) < 0.1 and training_sd._sd_spec().steps_of(
        {"vae_steps": 3, "steps": 10}) == 13


def test_train_sd_output_loads_with_diffusers_alone(sd_base, tmp_path):
    """A separate process that never imports dtrak_core loads the folder and generates an image."""
    script = textwrap.dedent(f"""
        import sys
        import torch
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(sd_base)!r}, safety_checker=None, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        image = pipe({caption(3)!r}, num_inference_steps=3, guidance_scale=2.0, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert "dtrak_core" not in sys.modules
        print(type(pipe.scheduler).__name__, image.shape, pipe.vae.config.scaling_factor != 0.18215)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "DDIMScheduler (16, 16, 3) True"


def test_caption_tokenizer_makes_each_caption_word_one_token_and_saves_offline(tmp_path):
    from transformers import CLIPTokenizer

    captions = [caption(i) for i in range(8)]
    tokenizer = build_caption_tokenizer(captions, 12)
    assert tokenizer.backend_tokenizer.to_str() == build_caption_tokenizer(captions, 12).backend_tokenizer.to_str()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption(5)).input_ids)
    assert tokens == ["<|startoftext|>", "green</w>", "bar</w>", ",</w>", "bob</w>", "style</w>", "<|endoftext|>"]
    assert len(tokenizer) > 512  # CLIP's 512 byte tokens, the merges, start and end
    training_sd.save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert loaded(caption(5)).input_ids == tokenizer(caption(5)).input_ids
    assert loaded.model_max_length == 12
    # unseen words still tokenize (byte by byte), never to the unknown token
    unseen = loaded("zebra")["input_ids"][1:-1]
    assert len(unseen) == 5 and loaded.unk_token_id not in unseen
    assert (tmp_path / "tok" / "merges.txt").read_text().startswith("#version: 0.2\n")
