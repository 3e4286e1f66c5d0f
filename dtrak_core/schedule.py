"""The noise schedule of a diffusion model: betas -> the coefficients of the forward process.

Everything is read from the model's own scheduler (its betas and its number of training steps);
nothing assumes T = 1000 or linear betas.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """Coefficients of a DDPM noise schedule, each a float32 tensor of shape (T,).

    ``alphas[t] = 1 - betas[t]``, ``alphas_cumprod[t] = prod_{s<=t} alphas[s]`` (abar_t),
    ``elbo_weights[t] = beta_t / (2 alpha_t (1 - abar_t))``. Derived coefficients are computed
    from the betas in float64 (1 - abar_0 = 1e-4 loses 3 digits in float32) and then rounded.

    ``scheduler_alphas_cumprod`` is the scheduler's own float32 abar (a float32 cumulative
    product, as diffusers computes it). It differs from ``alphas_cumprod`` in the last bits; the
    models here were trained, and their losses measured, with it, so :meth:`add_noise_as_trained`
    uses it and bit-for-bit retrains stay bit for bit. Features use the float64-derived
    coefficients (:meth:`add_noise`); both are kept because stored results depend on each.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    elbo_weights: torch.Tensor
    scheduler_alphas_cumprod: torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """Read the betas (and abar) of a diffusers ``DDPMScheduler`` or anything with the same attributes."""
        abar = getattr(scheduler, "alphas_cumprod", None)
        return cls.from_betas(torch.as_tensor(scheduler.betas),
                              None if abar is None else torch.as_tensor(abar, dtype=torch.float32))

    @classmethod
    def from_betas(cls, betas: torch.Tensor, scheduler_alphas_cumprod: torch.Tensor | None = None) -> "NoiseSchedule":
        """The schedule of ``betas`` (T,); ``scheduler_alphas_cumprod`` defaults to a float32 cumprod."""
        betas32 = torch.as_tensor(betas, dtype=torch.float32)
        betas = torch.as_tensor(betas, dtype=torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        one_minus = 1.0 - alphas_cumprod
        elbo = betas / (2.0 * alphas * one_minus)
        if scheduler_alphas_cumprod is None:
            scheduler_alphas_cumprod = torch.cumprod(1.0 - betas32, dim=0)
        return cls(*(x.float() for x in (betas, alphas, alphas_cumprod, alphas_cumprod.sqrt(),
                                         one_minus.sqrt(), elbo)), scheduler_alphas_cumprod.float())

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        return NoiseSchedule(*(getattr(self, f.name).to(device) for f in fields(self)))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; ``t`` of shape (B,) broadcasts over (B, ...)."""
        return self.signal_scale(t, x0.dim()) * x0 + self.noise_scale(t, x0.dim()) * eps

    def add_noise_as_trained(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The same x_t with the scheduler's float32 abar (training and the diffusion loss use it)."""
        abar = self.scheduler_alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps

    def signal_scale(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """sqrt(abar_t), shaped (B, 1, ...) to broadcast over a (B, ...) tensor of ``ndim`` dims."""
        return self.sqrt_alphas_cumprod[t].reshape(-1, *([1] * (ndim - 1)))

    def noise_scale(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """sqrt(1 - abar_t), shaped like :meth:`signal_scale`."""
        return self.sqrt_one_minus_alphas_cumprod[t].reshape(-1, *([1] * (ndim - 1)))
