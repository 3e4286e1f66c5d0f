"""``train`` killed at each of its write points, rerun: the same folder as an uninterrupted run.

Write points (``DTRAK_FAULT``, see ``dtrak_core.training_run``): ``train.state`` (a state
written, not renamed), ``train.checkpoint`` (a checkpoint written, not renamed),
``train.pipeline`` (before each part of the finished pipeline moves in), ``train.marker`` (all
parts in place, no ``train_complete.json`` yet). One chain of killed runs passes through all of
them, each rerun starting from what the previous kill left; between kills, readers must refuse
the folder. Also here: a resume that would change the learning-rate schedule, and every command
that loads a model refusing the model kinds it does not support, at load, in one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from dtrak_core.cli import main
from dtrak_core.models import ModelError
from dtrak_core.tasks import load_task
from tests.conftest import write_image_folder
from tests.reliability.harness import KILLED, run_cli, snapshot

#: Differ between two correct runs: wall-clock seconds (recipe; the marker holds the recipe's
#: sha256; the state holds the seconds too). Compared separately below.
WALL_CLOCK = ("recipe.json", "train_complete.json", "train_state.pt")
UNFINISHED = "is an unfinished training run (train_state.pt but no train_complete.json)"


def train_args(data: Path, out: Path, steps: int = 4) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--image-size", "16",
            "--steps", str(steps), "--batch-size", "4", "--warmup-steps", "2", "--checkpoint-every", "2",
            "--keep-checkpoints"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, the uninterrupted run's folder), trained in this process on one thread."""
    root = tmp_path_factory.mktemp("kill-train")
    data = write_image_folder(root / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_args(data, root / "model")) == 0
    finally:
        torch.set_num_threads(threads)
    shutil.move(root / "model", root / "reference")  # the killed runs write to the same path
    return data, root / "reference"


def _recipe_without_wall_clock(folder: Path) -> dict:
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe.pop("wall_seconds")
    return recipe


def _state_without_wall_clock(folder: Path) -> dict:
    state = torch.load(folder / "train_state.pt", weights_only=True)
    state.pop("wall_seconds"), state.pop("digest")
    return state


def _assert_refused(folder: Path, message: str) -> None:
    with pytest.raises(ModelError, match=re.escape(message)):
        load_task(folder)


def test_killed_at_every_write_point_the_rerun_gives_the_uninterrupted_run(reference):
    data, ref = reference
    out = ref.parent / "model"
    chain = [
        # The last state save (step 4): its temporary file is left, the state stays at step 2.
        ("train.state@2", "train_state.pt"),
        # Resumed at 2 (the step-4 checkpoint of the killed run is removed); killed with the new
        # step-4 checkpoint written but not renamed.
        ("train.checkpoint@1", "checkpoints/.step-0000004.tmp"),
        # The pipeline half moved in: model_index.json and recipe.json, not scheduler/ or unet/.
        ("train.pipeline@3", "recipe.json"),
        # A repair from the state (no step left to train), killed before the marker.
        ("train.marker@1", "unet/diffusion_pytorch_model.safetensors"),
    ]
    for fault, left in chain:
        result = run_cli(train_args(data, out), fault=fault)
        assert result.returncode == KILLED, (fault, result.stderr[-2000:])
        assert (out / left).exists() and not (out / "train_complete.json").exists(), fault
        _assert_refused(out, UNFINISHED)
    result = run_cli(train_args(data, out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"wrote {out}"
    assert snapshot(out, ignore=WALL_CLOCK) == snapshot(ref, ignore=WALL_CLOCK)
    assert _recipe_without_wall_clock(out) == _recipe_without_wall_clock(ref)
    got, expected = _state_without_wall_clock(out), _state_without_wall_clock(ref)
    assert json.loads(json.dumps(got, default=lambda t: t.tolist())) == \
        json.loads(json.dumps(expected, default=lambda t: t.tolist()))
    load_task(out)


def test_a_resume_that_changes_the_schedule_is_refused_with_what_to_do(reference, tmp_path, capsys):
    data, ref = reference
    out = tmp_path / "model"
    shutil.copytree(ref, out)  # a run folder may move: out_dir is not a setting of the weights
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert main(train_args(data, out, steps=8)) == 2
    assert capsys.readouterr().err == (
        f"error: {out}: --steps 8 (recorded: 4) would change the learning rate of the 4 steps already done (from step "
        "3), so no single run would give these weights; rerun with --steps 4 to finish this run, or train into "
        "another --out\n")
    assert torch.equal(torch.load(out / "train_state.pt", weights_only=True)["ema"]["conv_out.bias"],
                       state["ema"]["conv_out.bias"])


# -- every command that loads a model refuses what is not supported, at load -------------------

def _unfinished(folder: Path) -> str:
    (folder / "train_complete.json").unlink()
    return f"{folder} {UNFINISHED}: it is being trained or was interrupted; rerun its train command to finish it"


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _flow_prediction(folder: Path) -> str:
    _edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="flow")
    return (f"{folder}: the scheduler's prediction_type 'flow' is not supported; expected one of "
            "['epsilon', 'v_prediction', 'sample']")


def _flow_matching_scheduler(folder: Path) -> str:
    _edit_json(folder / "model_index.json", scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"])
    _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="FlowMatchEulerDiscreteScheduler")
    return (f"{folder}: the scheduler FlowMatchEulerDiscreteScheduler is not supported (its noise process is not "
            "the discrete-beta DDPM one we reproduce); expected one of ['DDIMScheduler', 'DDPMScheduler', "
            "'DPMSolverMultistepScheduler', 'EulerAncestralDiscreteScheduler', 'EulerDiscreteScheduler', "
            "'HeunDiscreteScheduler', 'LMSDiscreteScheduler', 'PNDMScheduler', 'UniPCMultistepScheduler']")


def _class_conditional_unet(folder: Path) -> str:
    from diffusers import UNet2DModel

    for name in ("train_state.pt", "train_complete.json"):  # a pipeline another tool wrote
        (folder / name).unlink()
    config = json.loads((folder / "unet" / "config.json").read_text())
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    shutil.rmtree(folder / "unet")
    UNet2DModel(**{**settings, "num_class_embeds": 2}).save_pretrained(folder / "unet", safe_serialization=True)
    return (f"{folder}: the UNet is class-conditional (it has a class embedding) but a DDPMPipeline calls it "
            "without labels; register a class-conditional task for it")


def _other_pipeline(folder: Path) -> str:
    _edit_json(folder / "model_index.json", _class_name="KandinskyPipeline")
    return f"{folder} holds a KandinskyPipeline; supported pipelines: DDPMPipeline, StableDiffusionPipeline"


KINDS = {"unfinished": _unfinished, "flow prediction": _flow_prediction,
         "flow-matching scheduler": _flow_matching_scheduler, "class-conditional unet": _class_conditional_unet,
         "other pipeline": _other_pipeline}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_command_refuses_an_unsupported_model_at_load(reference, tmp_path, capsys, monkeypatch, kind):
    from dtrak_core import registry

    data, ref = reference
    # Registration accepts folders under its roots only.
    monkeypatch.setenv("DTRAK_MODEL_ROOTS", os.pathsep.join([str(tmp_path), str(Path(data).parent)]))
    model = tmp_path / "model"
    shutil.copytree(ref, model)
    message = KINDS[kind](model)
    out = tmp_path / "out"
    commands = {
        "generate": ["generate", "--model", model, "--seeds", "0-1", "--out", out / "samples"],
        "heldout-loss": ["heldout-loss", "--model", model, "--data", data, "--split", "train", "--timesteps", "2"],
        "featurize": ["featurize", "--model", model, "--data", data, "--cache-dir", out / "features"],
        "score": ["score", "--model", model, "--train", data, "--targets", data, "--out", out / "scores"],
        "lds build": ["lds", "build", "--model", model, "--out", out / "lds"],
        "counterfactual": ["counterfactual", "--model", model, "--target-seed", "0", "--results", out / "cf",
                           "--models-dir", out / "cf-models"],
    }
    for name, args in commands.items():
        assert main([str(a) for a in args]) == 2, name
        assert capsys.readouterr().err == f"error: {message}\n", name
    with pytest.raises(ModelError) as error:
        registry.register_model("bad", model, data, cache_root=out / "cache")
    assert str(error.value) == message
    assert not (out / "cache" / "registry.json").exists()


def test_train_refuses_to_resume_a_run_of_another_trainer(reference, tmp_path, capsys):
    data, ref = reference
    out = tmp_path / "model"
    shutil.copytree(ref, out)
    _edit_json(out / "train_complete.json", trainer="sd-lora")
    assert main(train_args(data, out)) == 2
    assert capsys.readouterr().err == (f"error: {out / 'train_complete.json'} was written by the sd-lora trainer, "
                                       "not ddpm-pixel; use another --out\n")
