import numpy as np
import pytest
import torch
from torch.func import vmap

from dtrak_core.tasks import UnconditionalPixelTask
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.output_functions import (OUTPUT_FUNCTIONS, NoiseSchedule,
                                                     get_output_function, square)
from dtrak_core.models import make_scheduler


@pytest.fixture
def schedule():
    return NoiseSchedule.from_scheduler(make_scheduler())


def brute_force(name: str, pred: np.ndarray, eps: np.ndarray, t: int) -> float:
    pred, eps = pred.astype(np.float64), eps.astype(np.float64)
    if name == "loss":
        return float(np.mean((pred - eps) ** 2))
    if name == "square":
        return float(np.mean(pred ** 2))
    if name == "avg":
        return float(np.mean(pred))
    if name == "l1":
        return float(np.sum(np.abs(pred)))
    if name == "l2":
        return float(np.sqrt(np.sum(pred ** 2)))
    if name == "linf":
        return float(np.max(np.abs(pred)))
    if name == "elbo":
        betas = np.linspace(1e-4, 0.02, 1000)
        alphas = 1 - betas
        abar = np.cumprod(alphas)
        weight = betas[t] / (2 * alphas[t] * (1 - abar[t]))
        return float(weight * np.mean((pred - eps) ** 2))
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(OUTPUT_FUNCTIONS))
@pytest.mark.parametrize("t", [0, 500, 999])
def test_output_function_matches_formula(name, t, schedule):
    gen = torch.Generator().manual_seed(t)
    pred, eps = torch.randn(3, 4, 4, generator=gen), torch.randn(3, 4, 4, generator=gen)
    value = OUTPUT_FUNCTIONS[name](pred, eps, torch.tensor(t), schedule)
    assert value.shape == ()
    assert value.item() == pytest.approx(brute_force(name, pred.numpy(), eps.numpy(), t), rel=1e-5)


@pytest.mark.parametrize("name", sorted(OUTPUT_FUNCTIONS))
def test_output_functions_vmap_like_a_loop(name, schedule):
    gen = torch.Generator().manual_seed(1)
    pred, eps = torch.randn(4, 3, 4, 4, generator=gen), torch.randn(4, 3, 4, 4, generator=gen)
    t = torch.tensor([0, 10, 300, 999])
    fn = OUTPUT_FUNCTIONS[name]
    batched = vmap(lambda p, e, s: fn(p, e, s, schedule))(pred, eps, t)
    looped = torch.stack([fn(pred[i], eps[i], t[i], schedule) for i in range(4)])
    torch.testing.assert_close(batched, looped)


def test_functions_that_ignore_the_noise_ignore_it(schedule):
    pred = torch.randn(3, 4, 4)
    for name in ("square", "avg", "l1", "l2", "linf"):
        fn = OUTPUT_FUNCTIONS[name]
        assert fn(pred, torch.zeros_like(pred), torch.tensor(5), schedule) == \
            fn(pred, torch.ones_like(pred), torch.tensor(5), schedule)


def test_unknown_output_function_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^unknown output function 'sqaure'; expected one of "
                       r"\['loss', 'square', 'avg', 'l1', 'l2', 'linf', 'elbo'\]$"):
        get_output_function("sqaure")
    with pytest.raises(ValueError, match="unknown output function 'sqaure'"):
        OUTPUT_FUNCTIONS["sqaure"]


def test_registry_holds_the_module_functions():
    assert sorted(OUTPUT_FUNCTIONS) == ["avg", "elbo", "l1", "l2", "linf", "loss", "square"]
    assert "square" in OUTPUT_FUNCTIONS and "sqaure" not in OUTPUT_FUNCTIONS
    assert get_output_function("square") is square is OUTPUT_FUNCTIONS["square"]


def negated_square(eps_pred, eps, t, schedule):
    return -eps_pred.pow(2).mean()


def test_a_function_registered_elsewhere_is_used_by_the_featurizer(monkeypatch, tiny_unet, scheduler):
    monkeypatch.setattr(OUTPUT_FUNCTIONS, "_entries", dict(OUTPUT_FUNCTIONS._entries))  # restored after
    OUTPUT_FUNCTIONS.register("test-negated-square")(negated_square)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = {}
    for name in ("square", "test-negated-square"):
        settings = FeatureSettings(output_fn=name, num_timesteps=2, projection_dim=32, device="cpu")
        out[name] = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), settings).featurize_batch(images, [0, 1])
    # The gradient of -f is -grad f, and projection is linear.
    assert np.abs(out["square"]).max() > 0
    np.testing.assert_allclose(out["test-negated-square"], -out["square"], rtol=1e-6, atol=1e-9)


def test_schedule_add_noise(schedule):
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 999])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    expected = torch.stack([np.sqrt(abar[s]) * x0[i] + np.sqrt(1 - abar[s]) * eps[i]
                            for i, s in enumerate([0, 999])]).float()
    torch.testing.assert_close(schedule.add_noise(x0, eps, t), expected, rtol=1e-5, atol=1e-6)
