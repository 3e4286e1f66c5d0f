"""The Stable Diffusion + LoRA task: gradients, features, targets, formats, errors, cache keys."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrak_core import cli
from dtrak_core.attribution.dataset_features import featurize
from dtrak_core.attribution.feature_store import feature_identity, feature_key
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.gradients import make_vmap_friendly, per_sample_gradients, select_parameters
from dtrak_core.attribution.loading import load_dataset_for, load_model
from dtrak_core.attribution.output_functions import get_output_function
from dtrak_core.attribution.scorers import KernelScorer
from dtrak_core.attribution.timesteps import batch_noise
from dtrak_core.datasets import load_image_folder
from dtrak_core.hashing import state_dict_hash
from dtrak_core.lora import BASE_FILE, LoraError, attach_adapter, write_base
from dtrak_core.tasks import Batch, load_task
from dtrak_core.tasks.text_to_image import (GuidanceSettings, PromptError, TextToImageTarget, TextToImageTask,
                                            generate_target, target_features, target_from_image, tokenizer_hash)
from dtrak_core.training_sd import SD_PRESETS, build_caption_tokenizer
from tests.sd.conftest import caption, write_captioned_folder


def _batch(data_dir: Path, rows) -> Batch:
    data = load_image_folder(data_dir, label_column=None)
    return Batch(data.to_tensor(list(rows)), list(rows), [data.metadata["text"][r] for r in rows])


def _loop_gradients(task, names, inputs, noise, timesteps, output_fn):
    """Reference: one sample at a time, plain autograd, (1/K) sum_t grad f."""
    params = dict(task.denoiser.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    rows = []
    for b in range(len(inputs)):
        total = 0.0
        for i, t in enumerate(timesteps):
            steps = torch.tensor([t])
            x_t = task.schedule.add_noise(inputs.x0[b:b + 1], noise[b:b + 1, i], steps)
            eps = task.predict_epsilon(x_t, steps, inputs.condition[b:b + 1])
            total = total + output_fn(eps[0], noise[b, i], steps[0], task.schedule)
        grads = torch.autograd.grad(total / len(timesteps), [params[n] for n in names])
        rows.append({n: g for n, g in zip(names, grads)})
    for n in names:
        params[n].requires_grad_(False)
    return rows


def _check_per_sample_gradients(task, batch):
    make_vmap_friendly(task.denoiser)
    task.denoiser.eval().requires_grad_(False)
    names = select_parameters(task.denoiser, "lora")
    inputs = task.prepare(batch)
    timesteps = [10, 400, 990]
    noise = batch_noise(0, inputs.sample_ids, timesteps, task.input_shape)
    output_fn = get_output_function("square")
    fast = per_sample_gradients(task, names, inputs, noise, timesteps, output_fn, timestep_chunk=2)
    slow = _loop_gradients(task, names, inputs, noise, timesteps, output_fn)
    worst = max(float((fast[n][b] - slow[b][n]).abs().max()) for b in range(len(inputs)) for n in names)
    assert worst < 1e-5
    assert max(float(fast[n].abs().max()) for n in names) > 1e-4  # not vacuous: the gradients are not zero


def test_per_sample_lora_gradients_equal_a_plain_loop(sd_lora, sd_data):
    task = load_task(sd_lora)
    names = select_parameters(task.denoiser, "lora")
    assert names and all(".lora_" in n for n in names)
    _check_per_sample_gradients(task, _batch(sd_data, [0, 3, 5]))


def test_sd2_layout_with_v_prediction_gradients_equal_a_plain_loop(sd_base, sd_data):
    """SD 2.x: linear projections in the transformer blocks, per-level head dims, v-prediction."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    base = load_task(sd_base)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=(2, 4), use_linear_projection=True)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    scheduler = type(base.scheduler).from_config(base.scheduler.config, prediction_type="v_prediction")
    task = TextToImageTask(unet.eval(), scheduler, base.vae, base.text_encoder, base.tokenizer)
    assert task.prediction.name == "v_prediction"
    _check_per_sample_gradients(task, _batch(sd_data, [1, 2]))


def test_features_are_deterministic_and_independent_of_the_batch(sd_lora, sd_data):
    task = load_task(sd_lora)
    settings = FeatureSettings(num_timesteps=3, projection_dim=32, device="cpu", batch_size=3)
    featurizer = Featurizer.create(task, settings)
    assert featurizer.settings.params == "lora"  # "auto" on an adapter model: its LoRA only
    assert featurizer.num_parameters == sum(p.numel() for n, p in task.denoiser.named_parameters() if "lora" in n)
    everything = featurizer.featurize(_batch(sd_data, range(6)))
    again = featurizer.featurize(_batch(sd_data, range(6)))
    np.testing.assert_array_equal(everything, again)
    alone = featurizer.featurize(_batch(sd_data, [4]))
    shuffled = featurizer.featurize(_batch(sd_data, [5, 2, 0]))
    np.testing.assert_allclose(alone[0], everything[4], atol=1e-6, rtol=0)
    np.testing.assert_allclose(shuffled, everything[[5, 2, 0]], atol=1e-6, rtol=0)
    # the caption is the condition: another caption, other features for that row only
    batch = _batch(sd_data, [0, 1])
    recaptioned = featurizer.featurize(Batch(batch.images, batch.sample_ids, [caption(1), batch.captions[1]]))
    assert np.abs(recaptioned[0] - everything[0]).max() > 1e-2 * np.abs(everything[0]).max()
    np.testing.assert_allclose(recaptioned[1], everything[1], atol=1e-6, rtol=0)


def test_base_model_without_adapter_differentiates_all_parameters(sd_base):
    task = load_task(sd_base)
    featurizer = Featurizer.create(task, FeatureSettings(num_timesteps=1, projection_dim=8, device="cpu"))
    assert featurizer.settings.params == "all"
    assert featurizer.num_parameters == sum(p.numel() for p in task.denoiser.parameters())


def test_a_training_image_with_its_caption_ranks_itself_first_and_a_wrong_caption_lowers_it(sd_lora, sd_data,
                                                                                            tmp_path):
    """Measured on this tiny, briefly trained model: with 10 low-noise timesteps (t < 250, where x_t
    is mostly the image) and a small ridge lambda (the Gram diagonal is ~1e-3), every image ranks
    itself first (margin >= 0.4 of the top score) and every wrong caption lowers its own score,
    over several training lengths and learning rates; at K = 10 uniform timesteps the barely
    trained model's features are still dominated by the noise draw."""
    model = load_model(sd_lora)
    train = load_dataset_for(model, sd_data)
    settings = FeatureSettings(timesteps=tuple(range(0, 250, 25)), projection_dim=256, device="cpu", batch_size=8)
    phi = featurize(model, train, settings, root=tmp_path, progress=False)  # through the store, with captions
    featurizer = Featurizer.create(model.task, settings)
    captions = train.metadata["text"].tolist()
    own = [target_from_image(model.task, train.images[j], captions[j]) for j in range(len(train))]
    kernel = KernelScorer(np.asarray(phi.features))
    scores = kernel.scores(target_features(featurizer, own), lam=1e-5)
    assert scores.argmax(axis=1).tolist() == list(range(len(train)))
    # the same images, each with the caption of the image 5 rows on (other colour, shape and artist)
    wrong = [target_from_image(model.task, train.images[j], captions[(j + 5) % len(train)]) for j in range(len(train))]
    wrong_scores = kernel.scores(target_features(featurizer, wrong), lam=1e-5)
    own_score, wrong_own = np.diag(scores), np.diag(wrong_scores)
    assert (wrong_own < own_score).all(), (own_score, wrong_own)


def test_generated_target_matches_diffusers_and_round_trips(sd_base, sd_lora, tmp_path):
    """Our CFG DDIM sampling gives diffusers' own pipeline output, loaded with diffusers alone."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    task = load_task(sd_lora)
    settings = GuidanceSettings(guidance_scale=3.0, steps=6)
    target = generate_target(task, caption(2), seed=7, settings=settings)
    pipe = StableDiffusionPipeline.from_pretrained(sd_base, safety_checker=None, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(sd_lora))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(caption(2), num_inference_steps=6, guidance_scale=3.0, output_type="latent",
                   generator=torch.Generator().manual_seed(7)).images
    assert float((latents[0] - target.latents).abs().max()) < 1e-5
    image = pipe(caption(2), num_inference_steps=6, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(7)).images[0]
    assert np.abs(np.round(image * 255).astype(int) - target.image.astype(int)).max() <= 1

    target.save(tmp_path / "t")
    back = TextToImageTarget.load(tmp_path / "t")
    assert back.info() == target.info() and back.kind == "generated" and back.seed == 7
    assert torch.equal(back.latents, target.latents) and torch.equal(back.prompt_embedding, target.prompt_embedding)
    featurizer = Featurizer.create(task, FeatureSettings(num_timesteps=2, projection_dim=16, device="cpu"))
    np.testing.assert_array_equal(target_features(featurizer, [target]), target_features(featurizer, [back]))
    # kept latents, not a re-encoding of the decoded image: the two differ
    assert float((target_from_image(task, target.image, target.prompt).latents - target.latents).abs().max()) > 1e-3


def test_save_and_reload_gives_identical_outputs(sd_lora, tmp_path):
    task = load_task(sd_lora)
    task.save(tmp_path / "again")  # an adapter model saves its adapter, naming the same base
    assert json.loads((tmp_path / "again" / BASE_FILE).read_text()) == json.loads((sd_lora / BASE_FILE).read_text())
    back = load_task(tmp_path / "again")
    assert back.content_hash() == task.content_hash()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    condition = task.encode_prompts([caption(0), caption(1)])
    with torch.no_grad():
        assert torch.equal(task.denoise(x, t, condition), back.denoise(x, t, condition))


def test_peft_format_adapter_loads_like_the_diffusers_one(sd_base, sd_lora, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    trained = load_task(sd_lora)
    fresh = load_task(sd_base)
    config = LoraConfig(r=4, lora_alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    wrapped = get_peft_model(copy.deepcopy(fresh.denoiser), config)  # peft's own wrapper, as people use it
    trained_lora = dict(trained.denoiser.named_parameters())
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora" in name:
                param.copy_(trained_lora[name.removeprefix("base_model.model.")])
    wrapped.save_pretrained(tmp_path / "peft")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["README.md", "adapter_config.json",
                                                                     "adapter_model.safetensors"]
    assert next(iter(load_file(tmp_path / "peft" / "adapter_model.safetensors"))).startswith("base_model.model.")
    fresh.attach_adapter(tmp_path / "peft")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 500])
    condition = trained.encode_prompts([caption(3), caption(4)])
    with torch.no_grad():
        np.testing.assert_allclose(fresh.denoise(x, t, condition), trained.denoise(x, t, condition), atol=1e-6)
    assert fresh.content_hash() != load_task(sd_base).content_hash()


def _misfit_adapter(folder: Path) -> Path:
    """A LoRA of a UNet whose cross-attention takes 32-wide text states (the base takes 16)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from dtrak_core.lora import save_adapter

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"]))
    save_adapter(unet, folder)
    return folder


def test_a_lora_that_does_not_fit_the_unet_is_one_line(sd_base, sd_data, tmp_path, capsys):
    bad = _misfit_adapter(tmp_path / "bad")
    task = load_task(sd_base)
    with pytest.raises(LoraError) as error:
        attach_adapter(task.denoiser, task.text_encoder, bad, sd_base)
    message = str(error.value)
    assert message.startswith(f"the LoRA in {bad} does not fit the UNet of {sd_base}: ")
    assert "size mismatch" in message and "\n" not in message
    write_base(bad, sd_base, None)
    code = cli.main(["featurize", "--model", str(bad), "--data", str(sd_data), "-K", "1", "-k", "8",
                     "--device", "cpu", "--cache-dir", str(tmp_path / "features"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {message}"]


def test_data_without_a_text_column_is_one_line(sd_lora, tmp_path, capsys):
    data = write_captioned_folder(tmp_path / "plain", text=False)
    code = cli.main(["featurize", "--model", str(sd_lora), "--data", str(data), "-K", "1", "-k", "8",
                     "--device", "cpu", "--cache-dir", str(tmp_path / "features"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: {data / 'metadata.csv'} has no 'text' caption column, which a text-to-image model "
                   "needs (columns are ['file_name', 'artist', 'split'])"]


def test_a_prompt_longer_than_the_tokenizer_allows_is_one_line(sd_lora):
    task = load_task(sd_lora)
    prompt = " ".join(["red square"] * 8)
    with pytest.raises(PromptError) as error:
        generate_target(task, prompt, seed=0, settings=GuidanceSettings(steps=2))
    assert str(error.value) == (f"prompt {prompt!r} is 18 tokens long but the tokenizer takes at most 12 "
                                "(with its start and end tokens); shorten it")
    assert task.token_ids([" ".join(["red square"] * 5)]).shape == (1, 12)  # 10 words + 2: fits exactly


def test_cache_keys_change_with_every_component(sd_lora, sd_base, sd_data):
    task = load_task(sd_lora)
    reference = task.content_hash()
    assert load_task(sd_lora).content_hash() == reference  # deterministic
    assert load_task(sd_base).content_hash() != reference  # the adapter enters

    def changed(edit) -> str:
        other = load_task(sd_lora)
        with torch.no_grad():
            edit(other)
        return other.content_hash()

    def bump(module, needle):
        name, param = next((n, p) for n, p in module.named_parameters() if needle in n)
        param.view(-1)[0] += 1e-3

    vae = changed(lambda t: bump(t.vae, "decoder"))
    text = changed(lambda t: bump(t.text_encoder, "embeddings"))
    adapter = changed(lambda t: bump(t.denoiser, "lora_B"))
    scale = changed(lambda t: setattr(t.denoiser.peft_config["default"], "lora_alpha", 4.0))
    latent_scale = changed(lambda t: t.vae.register_to_config(scaling_factor=0.5))
    captions = [caption(i) for i in range(8)] + ["purple circle"]
    tokenizer = changed(lambda t: setattr(t, "tokenizer", build_caption_tokenizer(captions, 12)))
    hashes = [reference, vae, text, adapter, scale, latent_scale, tokenizer]
    assert len(set(hashes)) == len(hashes)
    # only the VAE changed: the UNet's own tensors hash the same, yet the feature key moves
    other = load_task(sd_lora)
    with torch.no_grad():
        bump(other.vae, "decoder")
    assert state_dict_hash(other.denoiser) == state_dict_hash(task.denoiser)
    settings = FeatureSettings(num_timesteps=2, projection_dim=8).for_model(task.denoiser)
    keys = {feature_key(feature_identity(m.content_hash(), "s", "d", settings, range(3))) for m in (task, other)}
    assert len(keys) == 2
    assert load_model(sd_lora).state_dict_hash == reference
    assert tokenizer_hash(task.tokenizer) == tokenizer_hash(load_task(sd_base).tokenizer)


def test_default_task_hash_is_the_denoiser_state_dict(tiny_unet_task):
    assert tiny_unet_task.content_hash() == state_dict_hash(tiny_unet_task.denoiser)


@pytest.fixture
def tiny_unet_task():
    from dtrak_core.models import UNET_PRESETS, make_scheduler
    from dtrak_core.tasks import UnconditionalPixelTask

    return UnconditionalPixelTask(UNET_PRESETS["tiny"].build(16), make_scheduler())


def test_adapter_folder_with_a_changed_base_is_refused(sd_lora, tmp_path):
    import shutil

    base = Path(json.loads((sd_lora / BASE_FILE).read_text())["base_model"])
    moved_base = shutil.copytree(base, tmp_path / "base")
    adapter = shutil.copytree(sd_lora, tmp_path / "lora")
    write_base(adapter, moved_base, json.loads((sd_lora / BASE_FILE).read_text())["base_hash"])
    assert load_task(adapter).content_hash() == load_task(sd_lora).content_hash()
    config = json.loads((moved_base / "scheduler" / "scheduler_config.json").read_text())
    (moved_base / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "steps_offset": 0}))
    with pytest.raises(ValueError, match="has changed since the LoRA"):
        load_task(adapter)


def test_preset_sizes_are_what_the_demo_needs():
    demo = SD_PRESETS["demo"]
    assert demo.vae_factor == 4  # 32 px -> 8x8x4 latents
    unet = demo.build_unet(8, seed=0)
    assert sum(p.numel() for p in unet.parameters()) < 5_000_000


# -- files hash: what recognises a folder on disk (samples cache, LDS / counterfactual builds) ----

def _flip_last_byte(path: Path) -> bytes:
    """Change ``path``'s bytes (a JSON file stays valid: one more space); returns the original
    bytes (to restore them)."""
    original = path.read_bytes()
    path.write_bytes(original + b" " if path.suffix == ".json" else original[:-1] + bytes([original[-1] ^ 1]))
    return original


def test_files_hash_of_an_sd_folder_covers_every_component_and_nothing_else(sd_base, tmp_path):
    import shutil

    from dtrak_core.models import pipeline_files_hash

    base = shutil.copytree(sd_base, tmp_path / "base")
    reference = pipeline_files_hash(base)
    assert reference == pipeline_files_hash(sd_base)  # the files, not where they are
    # beside the components: our bookkeeping, kept checkpoints, a killed writer's staging folder
    (base / "recipe.json").write_text("{}")
    (base / "checkpoints" / "step-1").mkdir(parents=True)
    (base / "checkpoints" / "step-1" / "x.safetensors").write_bytes(b"x")
    (base / ".pipeline.tmp" / "unet").mkdir(parents=True)
    (base / ".pipeline.tmp" / "unet" / "config.json").write_text("{}")
    (base / "unet" / ".config.json.123.tmp").write_text("{}")
    assert pipeline_files_hash(base) == reference
    changed = {}
    for part in ("vae/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/model.safetensors",
                 "tokenizer/vocab.json", "tokenizer/tokenizer.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "model_index.json"):
        original = _flip_last_byte(base / part)
        changed[part] = pipeline_files_hash(base)
        (base / part).write_bytes(original)
    assert pipeline_files_hash(base) == reference
    assert len(set(changed.values()) | {reference}) == len(changed) + 1, changed


def test_files_hash_of_an_adapter_folder_covers_the_adapter_and_its_base(sd_base, sd_lora, tmp_path):
    import shutil

    from dtrak_core.models import pipeline_files_hash

    base = shutil.copytree(sd_base, tmp_path / "base")
    adapter = shutil.copytree(sd_lora, tmp_path / "lora")
    write_base(adapter, base, None)
    reference = pipeline_files_hash(adapter)
    assert reference == pipeline_files_hash(sd_lora) != pipeline_files_hash(sd_base)
    (adapter / "recipe.json").write_text("{}")  # not the adapter
    assert pipeline_files_hash(adapter) == reference
    original = _flip_last_byte(adapter / "pytorch_lora_weights.safetensors")
    only_adapter = pipeline_files_hash(adapter)
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(original)
    _flip_last_byte(base / "vae" / "diffusion_pytorch_model.safetensors")
    only_base_vae = pipeline_files_hash(adapter)
    assert len({reference, only_adapter, only_base_vae}) == 3


def test_files_hash_of_a_ddpm_folder_is_the_value_recorded_so_far(tiny_model_dir):
    """The UNet weights file and the two configs, as LDS builds and the golden tests record it
    (a brute-force copy of the formula those values were made with)."""
    import hashlib

    from dtrak_core.models import pipeline_files_hash

    def sha(rel: str) -> str:
        return hashlib.sha256((tiny_model_dir / rel).read_bytes()).hexdigest()

    old = hashlib.sha256("".join(sha(rel) for rel in ("unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                                                      "scheduler/scheduler_config.json")).encode()).hexdigest()
    assert pipeline_files_hash(tiny_model_dir) == old
