"""``generate`` for text-to-image models: every prompt with every seed, PNGs plus target records,
under the samples cache's rules (one writer, atomic files, checksums, a key with prompt, guidance
and steps); the refusals, one line each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtrak_core import cli, generation
from dtrak_core.generation import (default_samples_dir, generate_text_to_image, generate_to_folder, prompt_folder,
                                   text_sample_key)
from dtrak_core.models import pipeline_files_hash
from dtrak_core.tasks import ModelError, load_task
from dtrak_core.tasks.text_to_image import GuidanceSettings, TextToImageTarget, generate_target
from tests.reliability.harness import snapshot
from tests.sd.conftest import caption

SETTINGS = GuidanceSettings(guidance_scale=3.0, steps=4)
PROMPTS = [caption(0), caption(5)]  # red square, alice / green bar, bob


def _generate(model: Path, out: Path, prompts=PROMPTS, seeds=(0, 1), settings=SETTINGS) -> Path:
    return generate_text_to_image(model, prompts, list(seeds), settings, out, progress=False)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _calls(monkeypatch) -> list[tuple[str, list[int]]]:
    """Record the (prompt, seeds) of each batch the writer samples."""
    calls, real = [], generation.generate_targets

    def recording(task, prompt, seeds, settings):
        calls.append((prompt, list(seeds)))
        return real(task, prompt, seeds, settings)

    monkeypatch.setattr(generation, "generate_targets", recording)
    return calls


def test_same_prompt_and_seed_give_the_same_png_and_a_target_record_of_it(sd_lora, tmp_path):
    a = _generate(sd_lora, tmp_path / "a")
    b = _generate(sd_lora, tmp_path / "b", prompts=[PROMPTS[0]])
    key = text_sample_key(PROMPTS[0], 1)
    assert (a / f"{key}.png").read_bytes() == (b / f"{key}.png").read_bytes()
    # another prompt, another image (the tiny model conditions weakly: far above float rounding, not by much more)
    other = text_sample_key(PROMPTS[1], 1)
    assert not np.array_equal(_pixels(a / f"{key}.png"), _pixels(a / f"{other}.png"))
    latents = [TextToImageTarget.load(a / k).latents for k in (key, other)]
    assert float((latents[0] - latents[1]).abs().max()) > 1e-2
    assert (a / f"{key}.png").read_bytes() != (a / f"{text_sample_key(PROMPTS[0], 0)}.png").read_bytes()
    # the record: the PNG's pixels, the settings, and the latents the image was decoded from
    target = TextToImageTarget.load(a / key)
    assert (target.prompt, target.seed, target.guidance_scale, target.steps, target.kind) == (
        PROMPTS[0], 1, 3.0, 4, "generated")
    np.testing.assert_array_equal(target.image, _pixels(a / f"{key}.png"))
    task = load_task(sd_lora)
    alone = generate_target(task, PROMPTS[0], 1, SETTINGS)  # a batch of one: the same up to float rounding
    assert float((alone.latents - target.latents).abs().max()) < 1e-5
    assert torch.equal(alone.prompt_embedding, target.prompt_embedding) and target.model_hash == task.content_hash()
    index = json.loads((a / "samples.json").read_text())
    assert index["prompts"] == {prompt_folder(p): p for p in PROMPTS}
    assert index["seeds"] == {prompt_folder(p): [0, 1] for p in sorted(PROMPTS, key=prompt_folder)}
    assert index["guidance_scale"] == 3.0 and index["sampler"] == {"kind": "ddim", "steps": 4, "eta": 0.0}
    assert index["model_hash"] == pipeline_files_hash(sd_lora)


def test_intact_samples_are_reused_and_a_torn_record_is_made_again(sd_lora, tmp_path, monkeypatch):
    out = _generate(sd_lora, tmp_path / "s")
    clean = snapshot(out)
    calls = _calls(monkeypatch)
    assert _generate(sd_lora, out) == out
    assert calls == []  # everything verified: nothing sampled
    torn = out / text_sample_key(PROMPTS[1], 0) / "target.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    _generate(sd_lora, out, seeds=(0, 1, 2))
    assert calls == [(PROMPTS[0], [2]), (PROMPTS[1], [0, 2])]
    # the torn record is made again, the same bytes; the others untouched (the index grew by seed 2)
    assert {k: v for k, v in snapshot(out).items() if k in clean and k != "samples.json"} == \
        {k: v for k, v in clean.items() if k != "samples.json"}
    with pytest.raises(ValueError, match=f"^{out} holds samples of another model or sampler; choose another --out$"):
        _generate(sd_lora, out, settings=GuidanceSettings(guidance_scale=2.0, steps=4))


def test_interrupted_after_an_item_the_rerun_gives_the_uninterrupted_folder(sd_lora, tmp_path, monkeypatch):
    clean = _generate(sd_lora, tmp_path / "clean")

    def killed(name: str) -> None:
        if name == "samples.image":
            raise KeyboardInterrupt  # after the first item's files, before the index records them

    monkeypatch.setattr(generation, "fault_point", killed)
    with pytest.raises(KeyboardInterrupt):
        _generate(sd_lora, tmp_path / "out")
    monkeypatch.undo()
    assert not (tmp_path / "out" / "samples.json").exists()
    out = _generate(sd_lora, tmp_path / "out")
    assert snapshot(out) == snapshot(clean)


def test_the_cache_key_holds_the_model_files_steps_guidance_and_prompt(sd_base, sd_lora, tmp_path, monkeypatch):
    monkeypatch.setenv("DTRAK_CACHE", str(tmp_path / "cache"))
    out = generate_text_to_image(sd_lora, [PROMPTS[0]], [0], SETTINGS, progress=False)
    assert out == tmp_path / "cache" / "samples" / pipeline_files_hash(sd_lora)[:16] / "ddim-4-eta0-cfg3"
    assert out == default_samples_dir(pipeline_files_hash(sd_lora), generation.SamplerConfig("ddim", 4), 3.0)
    assert (out / f"{prompt_folder(PROMPTS[0])}/0.png").is_file()
    folders = {default_samples_dir(pipeline_files_hash(model), generation.SamplerConfig("ddim", steps), guidance)
               for model in (sd_base, sd_lora) for steps in (4, 5) for guidance in (2.0, 3.0)}
    assert len(folders) == 8


def test_prompt_folders_are_readable_safe_and_distinct():
    folder = prompt_folder("grinning face, openmoji style")
    words = "grinning-face-openmoji-style-"
    assert folder.startswith(words) and len(folder) == len(words) + 12
    assert prompt_folder("../../etc/passwd").startswith("etc-passwd-")
    assert len(prompt_folder("!!!")) == 12 and "/" not in prompt_folder("a/b") and "." not in prompt_folder(".")
    assert len(prompt_folder("word " * 50)) <= 40 + 1 + 12
    assert prompt_folder("Red square") != prompt_folder("red square")


def _main(args: list, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_command_with_prompts_file_and_grid(sd_lora, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[1]}\n\n")
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    code, stdout, err = _main(["generate", "--model", sd_lora, "--prompt", PROMPTS[0], "--prompts-file", prompts_file,
                               "--seeds", "0-2", "--guidance", "3", "--steps", "4", "--out", out, "--grid", grid,
                               "--grid-scale", "1", "--batch-size", "2"], capsys)
    assert code == 0, err
    assert stdout.splitlines() == [f"wrote 6 samples (2 prompts x 3 seeds) to {out}", f"wrote {grid}"]
    picture = _pixels(grid)
    assert picture.shape == (2 * 16, 3 * 16, 3)  # a row per prompt
    np.testing.assert_array_equal(picture[16:, 32:], _pixels(out / f"{text_sample_key(PROMPTS[1], 2)}.png"))
    assert sorted(json.loads((out / "samples.json").read_text())["prompts"].values()) == sorted(PROMPTS)


def test_generate_refusals_are_one_line(sd_lora, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    long_prompt = " ".join(["red square"] * 8)
    (tmp_path / "empty.txt").write_text("\n \n")
    cases = [
        (["--model", tiny_model_dir, "--prompt", "red square", "--seeds", "0"],
         f"{tiny_model_dir} holds a DDPMPipeline, which takes no prompt; generate without --prompt / --prompts-file"),
        (["--model", tiny_model_dir, "--guidance", "3", "--seeds", "0"],
         f"{tiny_model_dir} holds a DDPMPipeline, which takes no --guidance (text-to-image models only)"),
        (["--model", sd_lora, "--seeds", "0"],
         f"{sd_lora} is a text-to-image model (StableDiffusionPipeline); give --prompt or --prompts-file"),
        (["--model", sd_lora, "--prompt", "red square", "--sampler", "ddpm"],
         "text-to-image samples are generated with DDIM at eta 0 (what their targets record); drop --sampler / --eta"),
        (["--model", sd_lora, "--prompts-file", tmp_path / "empty.txt"],
         f"{tmp_path / 'empty.txt'} holds no prompt; expected one prompt per line"),
        (["--model", sd_lora, "--prompt", "red square", "--prompt", long_prompt, "--steps", "2"],
         f"prompt {long_prompt!r} is 18 tokens long but the tokenizer takes at most 12 (with its start and end "
         "tokens); shorten it"),
    ]
    for args, message in cases:
        code, stdout, err = _main(["generate", *args, "--out", out], capsys)
        assert (code, stdout, err) == (2, "", f"error: {message}\n"), args
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ModelError, match="is a text-to-image model"):
        generate_to_folder(sd_lora, [0], generation.SamplerConfig(), tmp_path / "x", progress=False)
