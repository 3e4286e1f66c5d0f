"""The forward (noising) process and the diffusion loss with reproducible draws.

Every random draw is made from a ``torch.Generator`` seeded by a hash of what it is for (a
seed, a sample id, a step), on the CPU, so results never depend on batch size, batch position
or device.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from diffusers import DDPMScheduler, UNet2DModel


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (stable across runs, machines and Python versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generator(*parts: int | str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derived_seed(*parts))


def add_noise(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, for x0 and eps of shape (b, c, h, w)."""
    abar = scheduler.alphas_cumprod.to(x0.device, x0.dtype)[timesteps].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


@torch.no_grad()
def diffusion_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    sample_ids: Sequence[int],
    timesteps: Sequence[int],
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample loss mean_t mean((eps_theta(x_t, t) - eps)^2) over the given timesteps.

    x0: (n, 3, H, W) in [-1, 1]. The noise for (sample id, t) is drawn from
    ``generator(seed, sample_id, t)``, so every model sees the same (t, eps) draws.
    Returns a float tensor of shape (n,).
    """
    device = next(unet.parameters()).device
    pairs = [(i, t) for i in range(len(x0)) for t in timesteps]
    losses = torch.zeros(len(x0))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = torch.tensor([i for i, _ in chunk])
        ts = torch.tensor([t for _, t in chunk])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=generator(seed, sample_ids[i], t))
                             for i, t in chunk])
        x_t = add_noise(scheduler, x0[rows], noise, ts).to(device)
        pred = unet(x_t, ts.to(device)).sample.float().cpu()
        losses.index_add_(0, rows, (pred - noise).pow(2).flatten(1).mean(1))
    return losses / len(timesteps)
