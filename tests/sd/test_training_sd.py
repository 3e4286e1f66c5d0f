"""train-lora and train-sd: bit-identical resume after a kill, and folders diffusers loads alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dtrak_core.training_sd as training_sd
from dtrak_core.lora import BASE_FILE, DIFFUSERS_WEIGHTS
from dtrak_core.training_sd import SdTrainConfig, build_caption_tokenizer, train_lora, train_sd
from tests.reliability.harness import KILLED, run_cli
from tests.sd.conftest import caption, lora_config


def _lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / DIFFUSERS_WEIGHTS)


def test_train_lora_resumed_after_a_kill_is_bit_identical(sd_base, sd_data, tmp_path):
    args = ["train-lora", "--base", sd_base, "--data", sd_data, "--out", tmp_path / "killed", "--rank", "2",
            "--steps", "6", "--batch-size", "4", "--warmup-steps", "2", "--checkpoint-every", "2", "--lr", "1e-2",
            "--caption-dropout", "0.3"]
    killed = run_cli(args, fault="train_lora.state@2")  # after the state of step 4 is saved
    assert killed.returncode == KILLED, killed.stderr
    state = torch.load(tmp_path / "killed" / "train_state.pt", weights_only=True)
    assert int(state["step"]) == 4
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    straight = train_lora(lora_config(sd_base, sd_data, tmp_path / "straight", rank=2, steps=6, batch_size=4,
                                      warmup_steps=2, checkpoint_every=2, learning_rate=1e-2, caption_dropout=0.3),
                          progress=False)
    a, b = _lora_tensors(tmp_path / "killed"), _lora_tensors(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "killed" / DIFFUSERS_WEIGHTS).read_bytes() == (straight / DIFFUSERS_WEIGHTS).read_bytes()
    recipe = json.loads((straight / "recipe.json").read_text())
    assert recipe["trainer"] == "train-lora" and recipe["steps_done"] == 6
    assert recipe["train_files"] == [f"img_{i:02d}.png" for i in range(8)] and recipe["config"]["subset"] is None
    assert json.loads((straight / BASE_FILE).read_text())["base_model"] == str(Path(sd_base).resolve())


def test_train_lora_refuses_to_resume_with_other_settings(sd_base, sd_data, tmp_path):
    train_lora(lora_config(sd_base, sd_data, tmp_path / "out", steps=2, checkpoint_every=2), progress=False)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(rank\)"):
        train_lora(lora_config(sd_base, sd_data, tmp_path / "out", steps=2, checkpoint_every=2, rank=2),
                   progress=False)


def _sd_config(data: Path, out: Path, **changes) -> SdTrainConfig:
    values = dict(data_dir=str(data), out_dir=str(out), preset="tiny", image_size=16, vae_steps=3, steps=4,
                  batch_size=4, warmup_steps=1, checkpoint_every=2, max_length=12, learning_rate=1e-2,
                  text_learning_rate=1e-3, caption_dropout=0.5)
    values.update(changes)
    return SdTrainConfig(**values)


class _Killed(Exception):
    pass


def test_train_sd_resumed_after_an_interruption_is_bit_identical(sd_data, tmp_path, monkeypatch):
    """Interrupted in the UNet stage (after step 4's state), resumed: the same pipeline bytes."""
    hits = []

    def stop_at_second(name):
        if name == "train_sd.state":
            hits.append(name)
            if len(hits) == 2:
                raise _Killed

    monkeypatch.setattr(training_sd, "fault_point", stop_at_second)
    with pytest.raises(_Killed):
        train_sd(_sd_config(sd_data, tmp_path / "killed"), progress=False)
    monkeypatch.undo()
    resumed = train_sd(_sd_config(sd_data, tmp_path / "killed"), progress=False)
    straight = train_sd(_sd_config(sd_data, tmp_path / "straight"), progress=False)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "vae/config.json"):
        assert (resumed / part).read_bytes() == (straight / part).read_bytes(), part
    recipe = json.loads((straight / "recipe.json").read_text())
    assert recipe["trainer"] == "train-sd" and recipe["steps_done"] == 7 and recipe["scaling_factor"] > 0


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
