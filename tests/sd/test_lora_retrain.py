"""LDS and counterfactual retraining of a LoRA model: ``train-lora``'s recipe replayed.

A tiny LoRA (tests/sd/conftest.py's base, adapted on 8 captioned images with 4 held-out ones)
goes through ``lds build`` (2 tuning + 3 reported subsets, 1 seed, an ensemble seed),
``lds attribute`` / ``lds score`` and a counterfactual, each retrain an adapter over the same
base. References are independent: a direct ``train_lora`` call on the same subset, the
targets generated one by one, the losses measured with shuffled captions.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.sd.conftest import caption, lora_config, write_captioned_folder

GUIDANCE, SAMPLER_STEPS = 2.0, 3
LORA_STEPS, LORA_WARMUP = 12, 2


def _with_validation(root: Path, n_train: int = 8, n_validation: int = 4) -> Path:
    """A captioned folder whose last ``n_validation`` rows are split "validation"."""
    write_captioned_folder(root, n=n_train + n_validation)
    with open(root / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows[n_train:]:
        row["split"] = "validation"
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory, sd_base):
    """(LoRA folder, its data folder, a work folder): a LoRA trained with checkpoints kept (TracIn)."""
    from dtrak_core.training_sd import train_lora

    root = tmp_path_factory.mktemp("lora-retrain")
    data = _with_validation(root / "data")
    lora = train_lora(lora_config(sd_base, data, root / "lora", steps=LORA_STEPS, warmup_steps=LORA_WARMUP,
                                  checkpoint_every=6, keep_checkpoints=True), progress=False)
    return lora, data, root


def _lds_config(lora: Path, out: Path, **changes):
    from dtrak_core.evaluation.lds.config import LdsBuildConfig

    values = dict(model_dir=str(lora), out_dir=str(out), num_subsets=3, num_tuning_subsets=2, seeds=[0],
                  ensemble_seeds=[1], measure_timesteps=4, generated_seeds=[0, 1, 2], sampler_steps=SAMPLER_STEPS,
                  guidance_scale=GUIDANCE, checkpoint_every=4, keep_models=True)
    values.update(changes)
    return LdsBuildConfig(**values)


def test_lds_build_retrains_the_lora_and_attribute_and_score_give_finite_lds(lora_setup, tmp_path):
    from safetensors.torch import load_file

    from dtrak_core.attribution.featurizer import FeatureSettings
    from dtrak_core.attribution.loading import load_model, load_training_set
    from dtrak_core.attribution.methods import score_targets
    from dtrak_core.evaluation.lds.build import build_lds
    from dtrak_core.evaluation.lds.measure import measure_losses
    from dtrak_core.evaluation.lds.outputs import read_output
    from dtrak_core.evaluation.lds.report import write_report
    from dtrak_core.evaluation.lds.scores import compute_scores, evaluate, get_entry, load_scores
    from dtrak_core.evaluation.lds.targets import Targets
    from dtrak_core.evaluation.subsets import SubsetPlan
    from dtrak_core.models import pipeline_files_hash
    from dtrak_core.tasks import load_task
    from dtrak_core.tasks.text_to_image import GuidanceSettings, generate_target
    from dtrak_core.training_sd import LoraTrainConfig, train_lora

    lora, data, _ = lora_setup
    out = tmp_path / "build"
    config = _lds_config(lora, out)
    assert build_lds(config, progress=False) == {"done": 6, "total": 6}  # 5 subsets x 1 seed + 1 ensemble model
    build = json.loads((out / "lds.json").read_text())
    assert build["identity"]["guidance_scale"] == GUIDANCE and build["recipe_config"]["base_model"]

    # Targets: the 4 held-out images with their captions, then 3 generated ones whose prompts
    # cycle through the LoRA's training captions, each the image of (prompt, seed) made alone.
    targets = Targets.load(out / "targets")
    assert targets.kinds == ["validation"] * 4 + ["generated"] * 3
    assert targets.captions == [caption(i) for i in range(8, 12)] + [caption(0), caption(1), caption(2)]
    task = load_task(lora)
    for j, seed in enumerate([0, 1, 2]):
        alone = generate_target(task, caption(j), seed, GuidanceSettings(GUIDANCE, SAMPLER_STEPS)).image
        np.testing.assert_array_equal(targets.images[4 + j], alone)

    # Each retrain is an adapter over the same base, equal byte for byte to train_lora called
    # directly on its subset with the same-epochs rule (4 of 8 images: half the steps and warm-up).
    recipe = json.loads((lora / "recipe.json").read_text())
    plan = SubsetPlan.load(out)
    full_weights = (lora / "pytorch_lora_weights.safetensors").read_bytes()
    subset = plan.by_role("report")[0]
    retrained = out / "runs" / f"{subset.name}-s0"
    direct = train_lora(LoraTrainConfig(**{**recipe["config"], "subset": list(subset.indices), "seed": 0,
                                           "steps": LORA_STEPS // 2, "warmup_steps": LORA_WARMUP // 2,
                                           "out_dir": str(tmp_path / "direct"), "keep_checkpoints": False}),
                        progress=False)
    weights = (retrained / "pytorch_lora_weights.safetensors").read_bytes()
    assert weights == (direct / "pytorch_lora_weights.safetensors").read_bytes()
    assert (retrained / "base_model.json").read_bytes() == (direct / "base_model.json").read_bytes()
    assert weights != full_weights
    assert json.loads((retrained / "recipe.json").read_text())["trainer"] == "sd-lora"
    for name in [f"{s.name}-s0" for s in plan.subsets] + ["ensemble-s1"]:
        other = load_file(str(out / "runs" / name / "pytorch_lora_weights.safetensors"))
        assert any((other[k] != v).any() for k, v in load_file(str(lora / "pytorch_lora_weights.safetensors")).items())
        assert read_output(out, name)["model_hash"] == pipeline_files_hash(out / "runs" / name)

    # The losses are measured with each target's own caption (other captions give other losses).
    full = np.array(read_output(out, "full")["losses"])
    timesteps = build["measure_timesteps_list"]
    own = measure_losses(lora, targets.images, timesteps, config.measure_seed, captions=targets.captions)
    np.testing.assert_array_equal(full, own)
    shuffled = measure_losses(lora, targets.images, timesteps, config.measure_seed,
                              captions=targets.captions[1:] + targets.captions[:1])
    assert np.all(full != shuffled)

    # lds attribute / lds score: every entry (D-TRAK, TRAK, TracIn over the kept adapter
    # checkpoints, the ensemble, pixel, random) gives a finite LDS for both kinds of target.
    entries = [get_entry(name) for name in ("dtrak-K10", "trak-K10", "tracin-K10", "ensemble-K10", "pixel", "random")]
    features = tmp_path / "features"
    lambdas = [0.1, 10.0]
    status = compute_scores(out, entries, lambdas, projection_dim=32, feature_root=features, progress=False)
    assert set(status.values()) == {"written"}
    results = evaluate(out, entries, num_bootstrap=50)
    for entry in entries:
        for kind in ("validation", "generated"):
            record = results["entries"][entry.name]["kinds"][kind]
            assert record["status"] == "measured" and np.isfinite(record["mean"]), (entry.name, kind)
    report = write_report(out, tmp_path / "lds.md", "python -m dtrak_core lds score").read_text()
    assert all(f"| {entry.label} |" in report for entry in entries)

    # The stored D-TRAK scores are the targets attributed with their own captions.
    model = load_model(lora)
    train = load_training_set(model)
    settings = FeatureSettings(num_timesteps=10, projection_dim=32, output_fn="square")
    _, stored = load_scores(out / "scores" / "dtrak-K10.npz")
    mine = score_targets("dtrak", [model], train, targets.images, settings, lambdas, features,
                         captions=targets.captions)
    np.testing.assert_allclose(stored[0], mine[0.1], rtol=1e-5, atol=1e-7)
    other = score_targets("dtrak", [model], train, targets.images, settings, lambdas, features,
                          captions=[caption(3)] * len(targets))
    assert not np.allclose(stored[0], other[0.1])


def test_a_resumed_build_keeps_its_targets_and_another_guidance_is_refused(lora_setup, tmp_path):
    """The build settings of a text-to-image model hold its guidance scale; the targets file its captions."""
    from dtrak_core.evaluation.lds.build import build_lds

    lora, _, _ = lora_setup
    out = tmp_path / "build"
    config = _lds_config(lora, out, num_subsets=2, num_tuning_subsets=0, ensemble_seeds=[], generated_seeds=[5],
                         keep_models=False)
    assert build_lds(config, progress=False, max_models=0) == {"done": 0, "total": 2}
    files = {name: (out / name).read_bytes() for name in ("lds.json", "targets/targets.json", "targets/images.npy")}
    assert build_lds(config, progress=False, max_models=0) == {"done": 0, "total": 2}
    assert files == {name: (out / name).read_bytes() for name in files}
    with pytest.raises(ValueError, match=r"holds an LDS build with other settings \(guidance_scale\)"):
        build_lds(_lds_config(lora, out, num_subsets=2, num_tuning_subsets=0, ensemble_seeds=[],
                              generated_seeds=[5], guidance_scale=3.0), progress=False, max_models=0)


def test_a_counterfactual_on_a_lora_retrains_without_the_removed_images_and_keeps_the_prompt(lora_setup, tmp_path):
    from dtrak_core.attribution.featurizer import FeatureSettings
    from dtrak_core.attribution.loading import load_model, load_training_set
    from dtrak_core.attribution.methods import score_targets
    from dtrak_core.evaluation.counterfactual import (CounterfactualConfig, generate_one, load_results,
                                                      run_counterfactual, top_k_proponents)
    from dtrak_core.evaluation.counterfactual import write_report as write_counterfactual_report
    from dtrak_core.generation import prompt_folder
    from dtrak_core.tasks import load_task
    from dtrak_core.tasks.text_to_image import GuidanceSettings, generate_target

    lora, _, _ = lora_setup
    prompt = caption(5)
    config = CounterfactualConfig(model_dir=str(lora), target_seed=3, method="dtrak", k=2, num_timesteps=2,
                                  projection_dim=32, sampler_steps=SAMPLER_STEPS, prompt=prompt,
                                  guidance_scale=GUIDANCE, results_dir=str(tmp_path / "results"),
                                  models_dir=str(tmp_path / "models"), feature_root=str(tmp_path / "features"))
    record = run_counterfactual(config, progress=False)
    assert (record["prompt"], record["guidance_scale"], record["sampler_steps"]) == (prompt, GUIDANCE, SAMPLER_STEPS)
    assert Path(record["folder"]) == tmp_path / "results" / prompt_folder(prompt) / "seed-3"

    # Before: the full LoRA's image of (prompt, seed, guidance, steps); the removal: its top 2
    # D-TRAK proponents attributed with that prompt.
    guidance = GuidanceSettings(GUIDANCE, SAMPLER_STEPS)
    before = generate_target(load_task(lora), prompt, 3, guidance).image
    model = load_model(lora)
    train = load_training_set(model)
    scores = score_targets("dtrak", [model], train, before[None],
                           FeatureSettings(num_timesteps=2, projection_dim=32, output_fn="square"), [config.lam],
                           tmp_path / "features", captions=[prompt])[config.lam][0]
    removed = top_k_proponents(scores, 2)
    assert record["removed"] == removed.tolist()

    # The retrained adapter trained on exactly the kept images (same-epochs rule) over the same
    # base, and regenerates the same prompt and seed.
    retrained = Path(record["retrained_model"])
    recipe = json.loads((retrained / "recipe.json").read_text())
    assert recipe["trainer"] == "sd-lora" and recipe["config"]["subset"] == sorted(set(range(8)) - set(removed))
    assert recipe["config"]["steps"] == round(LORA_STEPS * 6 / 8)
    assert recipe["base_hash"] == json.loads((lora / "recipe.json").read_text())["base_hash"]
    folder = Path(record["folder"])
    after = np.asarray(Image.open(folder / record["after_png"]))
    np.testing.assert_array_equal(after, generate_one(retrained, 3, SAMPLER_STEPS, prompt, guidance))
    assert not np.array_equal(after, before)
    assert record["pixel_l2"] > 0

    # A rerun reads the stored record back; the results folder lists it with its prompt.
    assert run_counterfactual(config, progress=False)["record_sha256"] == record["record_sha256"]
    assert [r["prompt"] for r in load_results(tmp_path / "results")] == [prompt]
    report = write_counterfactual_report(tmp_path / "results", tmp_path / "cf.md", "cmd").read_text()
    assert "| dtrak (k=2) | 1 |" in report


def test_prompts_are_refused_for_the_wrong_family_in_one_line(lora_setup, tiny_model_dir, tmp_path, capsys):
    from dtrak_core.cli import main
    from dtrak_core.generation import prompt_folder

    lora, _, _ = lora_setup
    models = str(tmp_path / "models")
    assert main(["counterfactual", "--model", str(lora), "--target-seed", "1", "--models-dir", models,
                 "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {lora} is a text-to-image model: give the target's prompt (--prompt)\n"
    assert main(["counterfactual", "--model", str(tiny_model_dir), "--target-seed", "1", "--prompt", "a cat",
                 "--models-dir", models, "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tiny_model_dir} is an unconditional model, which takes no prompt; run the "
                   "counterfactual without --prompt and --guidance\n")
    assert not (tmp_path / "r").exists() and not (tmp_path / "models").exists()
    long = " ".join(["red square"] * 8)
    assert main(["counterfactual", "--model", str(lora), "--target-seed", "1", "--prompt", long, "--method", "random",
                 "--k", "2", "--models-dir", models, "--results", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: prompt {long!r} is ") and err.endswith(
        "tokens long but the tokenizer takes at most 12 (with its start and end tokens); shorten it\n")
    assert not (tmp_path / "r" / prompt_folder(long)).exists() and not (tmp_path / "models").exists()
    assert main(["lds", "build", "--model", str(tiny_model_dir), "--out", str(tmp_path / "build"), "--guidance", "3",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: --guidance 3.0 is for text-to-image models; {tiny_model_dir} is an "
                                       "unconditional model (its generated targets take no prompt)\n")
    assert not (tmp_path / "build").exists()


def test_a_lora_whose_base_changed_and_a_train_sd_model_are_refused_in_one_line(lora_setup, sd_base, tmp_path,
                                                                                capsys):
    from dtrak_core.cli import main
    from dtrak_core.evaluation.retrain import read_retrain_recipe
    from dtrak_core.training_sd import train_lora

    _, data, _ = lora_setup
    base = tmp_path / "base"
    shutil.copytree(sd_base, base)
    lora = train_lora(lora_config(base, data, tmp_path / "lora", steps=2, checkpoint_every=2), progress=False)
    assert read_retrain_recipe(lora)["trainer"] == "sd-lora"
    scheduler = base / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text() + "\n")  # any changed byte of the base's files

    with pytest.raises(ValueError) as error:
        read_retrain_recipe(lora)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{lora / 'recipe.json'}: the base pipeline {base} has changed "
                                                      "since the LoRA was trained (files hash ")
    out = tmp_path / "build"
    assert main(["lds", "build", "--model", str(lora), "--out", str(out), "--subsets", "2", "--tuning-subsets", "0",
                 "--seeds", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "has changed since the LoRA" in err
    assert not out.exists()

    with pytest.raises(ValueError, match=r"^\S+ cannot be retrained \(LDS, counterfactual\): it is a whole Stable "
                                         r"Diffusion trained from scratch by train-sd, .*train-lora\) instead$"):
        read_retrain_recipe(sd_base)
