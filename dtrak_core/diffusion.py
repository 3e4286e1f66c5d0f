"""Reproducible random draws and the diffusion loss, through a model's task.

Every random draw is made from a ``torch.Generator`` seeded by a hash of what it is for (a
seed, a sample id, a step), on the CPU, so results never depend on batch size, batch position
or device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dtrak_core.seeds import experiment_seed
from dtrak_core.tasks import DiffusionInputs, DiffusionTask


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded by ``seeds.experiment_seed(*parts)`` (training and measuring draws)."""
    return torch.Generator(device="cpu").manual_seed(experiment_seed(*parts))



@torch.no_grad()
def diffusion_loss(
    task: DiffusionTask,
    inputs: DiffusionInputs,
    timesteps: Sequence[int],
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample loss mean_t mean((eps_hat(x_t, t) - eps)^2) over the given timesteps, float32 (n,).

    eps_hat is the model's prediction converted to epsilon space (``task.predict_epsilon``), so
    the number means the same for epsilon, v and sample prediction. x_t is noised with the
    scheduler's own coefficients, as in training. The noise of (sample id, t) is drawn from
    ``generator(seed, sample_id, t)``, so every model sees the same (t, eps) draws.
    """
    x0 = inputs.x0
    device = task.device
    pairs = [(i, t) for i in range(len(x0)) for t in timesteps]
    losses = torch.zeros(len(x0))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = torch.tensor([i for i, _ in chunk])
        ts = torch.tensor([t for _, t in chunk])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=generator(seed, inputs.sample_ids[i], t))
                             for i, t in chunk])
        x_t = task.schedule.add_noise_as_trained(x0[rows].cpu(), noise, ts).to(device)
        condition = None if inputs.condition is None else inputs.condition[rows.to(inputs.condition.device)]
        pred = task.predict_epsilon(x_t, ts.to(device), condition).cpu()
        losses.index_add_(0, rows, (pred - noise).pow(2).flatten(1).mean(1))
    return losses / len(timesteps)
