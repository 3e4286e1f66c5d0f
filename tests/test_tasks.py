"""The diffusion task interface: prediction types, v / sample pipelines end to end, loading errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from dtrak_core.attribution.featurizer import FeatureSettings
from dtrak_core.attribution.gradients import flatten_gradients, make_vmap_friendly, select_parameters
from dtrak_core.attribution.output_functions import OUTPUT_FUNCTIONS
from dtrak_core.attribution.dataset_features import featurize_folder
from dtrak_core.attribution.loading import load_model
from dtrak_core.attribution.timesteps import batch_noise
from dtrak_core.datasets import load_image_folder
from dtrak_core.models import UNET_PRESETS, ModelError
from dtrak_core.schedule import NoiseSchedule
from dtrak_core.tasks import DiffusionInputs, UnconditionalPixelTask, load_task
from dtrak_core.tasks.prediction import prediction_type
from dtrak_core.training import TrainConfig, held_out_loss, train

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def scheduler_for(prediction: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type=prediction)


def abar(t: int) -> float:
    """abar_t of the linear schedule, from the betas in float64 (brute force, not the library's)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32).astype(np.float64)
    return float(np.prod(1.0 - betas[: t + 1]))


def eps_by_hand(prediction: str, raw: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    a, s = abar(t) ** 0.5, (1 - abar(t)) ** 0.5
    if prediction == "epsilon":
        return raw
    if prediction == "v_prediction":
        return a * raw + s * x_t
    return (x_t - a * raw) / s


@pytest.fixture
def pipeline_dir(tmp_path, request):
    """A DDPMPipeline folder of the given prediction type, built from configs (random weights)."""
    unet = UNET_PRESETS["tiny"].build(image_size=16, seed=0).eval()
    folder = tmp_path / request.param
    DDPMPipeline(unet=unet, scheduler=scheduler_for(request.param)).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("name", PREDICTIONS)
def test_each_prediction_type_gives_back_eps_from_its_own_target(name):
    schedule = NoiseSchedule.from_scheduler(scheduler_for(name))
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    x_t = schedule.add_noise(x0, eps, t)
    kind = prediction_type(name)
    torch.testing.assert_close(kind.to_epsilon(kind.target(x0, eps, t, schedule), x_t, t, schedule), eps,
                               rtol=1e-4, atol=2e-4)
    for i, step in enumerate(t.tolist()):
        torch.testing.assert_close(kind.to_epsilon(x0[i:i + 1], x_t[i:i + 1], t[i:i + 1], schedule),
                                   eps_by_hand(name, x0[i:i + 1], x_t[i:i + 1], step), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pipeline_dir", ["v_prediction", "sample"], indirect=True)
def test_v_and_sample_pipelines_featurize_and_their_gradients_equal_a_plain_loop(pipeline_dir, tmp_path):
    task = load_task(pipeline_dir)
    name = task.scheduler.config.prediction_type
    assert task.prediction.name == name
    model = task.denoiser
    make_vmap_friendly(model)
    names = select_parameters(model, "all")
    x0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = [3, 400, 999]
    noise = batch_noise(0, [0, 1], steps, (3, 16, 16))
    fn = OUTPUT_FUNCTIONS.get("square")
    from dtrak_core.attribution.gradients import per_sample_gradients

    mine = flatten_gradients(per_sample_gradients(task, names, DiffusionInputs(x0, None, [0, 1]), noise, steps,
                                                  fn, 2), names)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    rows = []
    for b in range(2):
        model.zero_grad(set_to_none=True)
        for i, t in enumerate(steps):
            a, s = abar(t) ** 0.5, (1 - abar(t)) ** 0.5
            x_t = a * x0[b:b + 1] + s * noise[b, i:i + 1]
            raw = model(x_t, torch.tensor([t])).sample
            eps_hat = eps_by_hand(name, raw, x_t, t)
            (eps_hat.pow(2).mean() / len(steps)).backward()
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    ref = torch.stack(rows)
    assert ((mine - ref).norm(dim=1) / ref.norm(dim=1)).max().item() < 1e-5

    # And the folder featurizes end to end through the public entry point.
    data = tmp_path / "data"
    from tests.attribution.conftest import synthetic_images, write_image_folder

    write_image_folder(data, synthetic_images(3))
    settings = FeatureSettings(num_timesteps=2, projection_dim=32, device="cpu")
    features = featurize_folder(pipeline_dir, data, settings, root=tmp_path / "store", progress=False)
    assert features.shape == (3, 32) and np.isfinite(np.asarray(features.features)).all()


@pytest.mark.parametrize("pipeline_dir", ["v_prediction"], indirect=True)
def test_held_out_loss_of_a_v_model_is_measured_in_epsilon_space(pipeline_dir, tmp_path):
    from tests.attribution.conftest import synthetic_images, write_image_folder

    data = load_image_folder(write_image_folder(tmp_path / "data", synthetic_images(2)))
    loss = held_out_loss(pipeline_dir, data, seed=0, num_timesteps=2)  # t = 0 and 500
    task = load_task(pipeline_dir)
    from dtrak_core.diffusion import generator

    x0 = data.to_tensor()
    by_hand, naive = [], []
    for i in range(2):
        for t in (0, 500):
            eps = torch.randn(x0.shape[1:], generator=generator(0, i, t))
            a, s = abar(t) ** 0.5, (1 - abar(t)) ** 0.5
            x_t = (a * x0[i] + s * eps)[None]
            with torch.no_grad():
                raw = task.denoiser(x_t, torch.tensor([t])).sample
            by_hand.append((eps_by_hand("v_prediction", raw, x_t, t)[0] - eps).pow(2).mean().item())
            naive.append((raw[0] - eps).pow(2).mean().item())
    assert loss == pytest.approx(np.mean(by_hand), rel=1e-4)
    assert abs(loss - np.mean(naive)) > 1e-3  # comparing v with the noise would be another number


def test_training_a_v_model_regresses_v_and_records_it(tmp_path):
    from tests.attribution.conftest import synthetic_images, write_image_folder

    data = write_image_folder(tmp_path / "data", synthetic_images(4))
    config = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "v"), preset="tiny", image_size=16, steps=2,
                         batch_size=2, warmup_steps=1, checkpoint_every=2, split=None, prediction_type="v_prediction")
    out = train(config, progress=False)
    scheduler_config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == "v_prediction"
    assert json.loads((out / "recipe.json").read_text())["config"]["prediction_type"] == "v_prediction"
    assert load_model(out).task.prediction.name == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type 'flow' is not one of"):
        TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "f"), prediction_type="flow").validate()


def test_a_folder_of_an_unregistered_pipeline_is_refused_with_the_supported_ones(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ModelError, match="KandinskyPipeline; supported pipelines: DDPMPipeline"):
        load_model(tmp_path / "m")


def test_the_schedule_comes_from_the_scheduler_not_an_assumed_T():
    scheduler = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    task = UnconditionalPixelTask(UNET_PRESETS["tiny"].build(image_size=16, seed=0), scheduler)
    assert task.num_train_timesteps == 50
    torch.testing.assert_close(task.schedule.scheduler_alphas_cumprod, scheduler.alphas_cumprod)
    settings = FeatureSettings(num_timesteps=5, projection_dim=8, device="cpu")
    from dtrak_core.attribution.featurizer import Featurizer

    assert Featurizer.create(task, settings).timesteps == [0, 10, 20, 30, 40]


# -- what is not supported is refused at load, in one line (issue 13) ---------------------------

def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _use_scheduler(folder, name):
    _edit_json(folder / "model_index.json", scheduler=["diffusers", name])
    _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name=name)


def _unet_folder(folder, **config):
    from diffusers import UNet2DModel

    base = {k: v for k, v in UNET_PRESETS["tiny"].build(image_size=16).config.items() if not k.startswith("_")}
    import shutil

    shutil.rmtree(folder / "unet")
    UNet2DModel(**{**base, **config}).save_pretrained(folder / "unet", safe_serialization=True)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))


UNSUPPORTED = {
    "unknown beta schedule": (lambda d: _edit_json(d / "scheduler" / "scheduler_config.json", beta_schedule="cubic"),
                              "could not load the pipeline in {d}: cubic is not implemented for <class "
                              "'diffusers.schedulers.scheduling_ddpm.DDPMScheduler'>"),
    "variance-exploding scheduler": (lambda d: _use_scheduler(d, "ScoreSdeVeScheduler"),
                                     "{d}: the scheduler ScoreSdeVeScheduler is not supported (its noise process is "
                                     "not the discrete-beta DDPM one we reproduce); expected one of "),
    "unknown scheduler class": (lambda d: _use_scheduler(d, "NoSuchScheduler"),
                                "could not load the pipeline in {d}: `diffusers` has no class `NoSuchScheduler`."),
    "learned variance": (lambda d: _unet_folder(d, out_channels=6),
                         "{d}: the UNet maps 3 to 6 channels; expected 3 to 3 (RGB images, a prediction of the same "
                         "shape: learned-variance models are not supported)"),
    "grayscale": (lambda d: _unet_folder(d, in_channels=1, out_channels=1),
                  "{d}: the UNet maps 1 to 1 channels; expected 3 to 3"),
    "conditional UNet": (lambda d: _edit_json(d / "model_index.json", unet=["diffusers", "UNet2DConditionModel"]),
                         "{d}: the denoiser is a UNet2DConditionModel; a DDPMPipeline here must hold a UNet2DModel"),
    "damaged weights": (lambda d: _flip_a_byte(d / "unet" / "diffusion_pytorch_model.safetensors"),
                        "could not load the pipeline in {d}: Unable to load weights from checkpoint file"),
}


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
@pytest.mark.parametrize("pipeline_dir", ["epsilon"], indirect=True)
def test_an_unsupported_model_is_refused_at_load_in_one_line(pipeline_dir, kind):
    change, message = UNSUPPORTED[kind]
    change(pipeline_dir)
    with pytest.raises(ModelError) as error:
        load_task(pipeline_dir)
    assert str(error.value).startswith(message.format(d=pipeline_dir))
    assert "\n" not in str(error.value) and len(str(error.value)) < 600


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler"])
@pytest.mark.parametrize("pipeline_dir", ["v_prediction"], indirect=True)
def test_schedulers_of_the_same_noise_process_load_with_their_own_betas(pipeline_dir, scheduler):
    reference = load_task(pipeline_dir)
    _use_scheduler(pipeline_dir, scheduler)
    task = load_task(pipeline_dir)
    assert type(task.scheduler).__name__ == scheduler and task.prediction.name == "v_prediction"
    torch.testing.assert_close(task.schedule.betas, reference.schedule.betas)
    torch.testing.assert_close(task.schedule.scheduler_alphas_cumprod, reference.schedule.scheduler_alphas_cumprod)
