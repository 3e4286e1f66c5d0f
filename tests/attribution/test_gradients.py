import pytest
import torch

from dtrak_core.attribution.gradients import (flatten_gradients, make_vmap_friendly,
                                              per_sample_gradients, select_parameters)
from dtrak_core.attribution.output_functions import OUTPUT_FUNCTIONS
from dtrak_core.attribution.timesteps import batch_noise
from dtrak_core.schedule import NoiseSchedule
from dtrak_core.tasks import DiffusionInputs, UnconditionalPixelTask


def grads_of(model, scheduler, names, x0, noise, steps, fn, chunk=10):
    task = UnconditionalPixelTask(model, scheduler)
    inputs = DiffusionInputs(x0, None, list(range(len(x0))))
    return per_sample_gradients(task, names, inputs, noise, steps, fn, chunk)


def loop_gradients(model, names, x0, noise, timesteps, fn, schedule) -> torch.Tensor:
    """Reference: one backward per (sample, timestep), gradients averaged over timesteps."""
    params = dict(model.named_parameters())
    rows = []
    for b in range(len(x0)):
        model.zero_grad(set_to_none=True)
        for i, t in enumerate(timesteps):
            step = torch.tensor([t])
            x_t = schedule.add_noise(x0[b:b + 1], noise[b, i:i + 1], step)
            pred = model(x_t, step).sample[0]
            (fn(pred, noise[b, i], torch.tensor(t), schedule) / len(timesteps)).backward()
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["square", "loss", "elbo"])
def test_per_sample_gradients_equal_a_backward_loop(tiny_unet, scheduler, name):
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert make_vmap_friendly(tiny_unet) > 0
    names = select_parameters(tiny_unet, "all")
    x0 = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = [0, 250, 500, 999]
    noise = batch_noise(0, [0, 1, 2], steps, (3, 16, 16))
    fn = OUTPUT_FUNCTIONS[name]
    grads = grads_of(tiny_unet, scheduler, names, x0, noise, steps, fn, chunk=3)
    mine = flatten_gradients(grads, names)
    ref = loop_gradients(tiny_unet, names, x0, noise, steps, fn, schedule)
    rel = ((mine - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert rel < 1e-5
    assert ref.norm() > 0


def test_timestep_chunking_does_not_change_gradients(tiny_unet, scheduler):
    make_vmap_friendly(tiny_unet)
    names = select_parameters(tiny_unet, "all")
    x0 = torch.randn(2, 3, 16, 16)
    steps = [0, 300, 600]
    noise = batch_noise(0, [0, 1], steps, (3, 16, 16))
    fn = OUTPUT_FUNCTIONS["square"]
    a = flatten_gradients(grads_of(tiny_unet, scheduler, names, x0, noise, steps, fn, 1), names)
    b = flatten_gradients(grads_of(tiny_unet, scheduler, names, x0, noise, steps, fn, 3), names)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_selected_parameters_are_a_slice_of_all(tiny_unet, scheduler):
    make_vmap_friendly(tiny_unet)
    all_names = select_parameters(tiny_unet, "all")
    some = select_parameters(tiny_unet, "re:^conv_(in|out)\\.")
    assert some == ["conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"]
    x0 = torch.randn(2, 3, 16, 16)
    noise = batch_noise(0, [0, 1], [10], (3, 16, 16))
    fn = OUTPUT_FUNCTIONS["square"]
    full = grads_of(tiny_unet, scheduler, all_names, x0, noise, [10], fn)
    part = grads_of(tiny_unet, scheduler, some, x0, noise, [10], fn)
    assert list(part) == some
    for n in some:
        torch.testing.assert_close(part[n], full[n], rtol=1e-5, atol=1e-7)


def test_parameter_filters(tiny_unet):
    names = [n for n, _ in tiny_unet.named_parameters()]
    assert select_parameters(tiny_unet, "all") == names
    attention = select_parameters(tiny_unet, "attentions")
    assert attention and all("attentions" in n for n in attention)
    with pytest.raises(ValueError, match="parameter filter 'lora' selects none"):
        select_parameters(tiny_unet, "lora")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_parameters(tiny_unet, "re:(")


def test_lora_filter_picks_adapter_parameters():
    model = torch.nn.Module()
    model.base = torch.nn.Linear(2, 2)
    model.base_lora_A = torch.nn.Linear(2, 1)
    assert select_parameters(model, "lora") == ["base_lora_A.weight", "base_lora_A.bias"]


def test_mismatched_noise_is_a_clear_error(tiny_unet, scheduler):
    with pytest.raises(ValueError, match="noise has 2 timesteps but 1 were given"):
        grads_of(tiny_unet, scheduler, ["conv_in.bias"], torch.zeros(1, 3, 16, 16),
                 torch.zeros(1, 2, 3, 16, 16), [0], OUTPUT_FUNCTIONS["square"])
