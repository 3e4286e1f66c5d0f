"""Output functions f of the UNet's noise prediction eps_theta, for ONE sample at ONE timestep.

TRAK-style attribution differentiates a scalar "model output" f(theta; z) per sample. For a
diffusion model the choice of f matters a lot (D-TRAK, Zheng et al. 2024, Table 2): functions
that ignore the true noise eps (``square``, ``avg``, ``l1``, ``l2``) beat the training loss.

Every function here has the signature ``f(eps_pred, eps, t, schedule) -> scalar tensor`` with

- ``eps_pred``: (C, H, W), the model's prediction in epsilon space eps_theta(x_t, t) for one
  sample (converted from v or x0 prediction by the model's task),
- ``eps``: (C, H, W), the Gaussian noise that made x_t,
- ``t``: 0-d integer tensor, the timestep,
- ``schedule``: :class:`NoiseSchedule`, the scheduler's coefficients.

They are written without data-dependent Python control flow so ``torch.func.vmap`` can batch
them. To add one: write the function and decorate it with ``@OUTPUT_FUNCTIONS.register(name)``.
"""

from __future__ import annotations

from typing import Callable

import torch

from dtrak_core.plugins import Registry
from dtrak_core.schedule import NoiseSchedule

OutputFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, NoiseSchedule], torch.Tensor]

#: name -> function; the featurizer looks names up here.
OUTPUT_FUNCTIONS: Registry[OutputFunction] = Registry("output function")


@OUTPUT_FUNCTIONS.register("loss")
def loss(eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """TRAK: the training loss mean((eps_theta - eps)^2)."""
    return (eps_pred - eps).pow(2).mean()


@OUTPUT_FUNCTIONS.register("square")
def square(eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """D-TRAK (the default): mean(eps_theta^2), independent of the true noise."""
    return eps_pred.pow(2).mean()


@OUTPUT_FUNCTIONS.register("avg")
def avg(eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """mean(eps_theta): as good as ``square`` in the D-TRAK ablation."""
    return eps_pred.mean()


@OUTPUT_FUNCTIONS.register("l1")
def l1(eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """sum |eps_theta|."""
    return eps_pred.abs().sum()


@OUTPUT_FUNCTIONS.register("l2")
def l2(eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """sqrt(sum eps_theta^2), the Euclidean norm of the prediction."""
    return eps_pred.pow(2).sum().sqrt()


@OUTPUT_FUNCTIONS.register("linf")
def linf(eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """max |eps_theta| (poor in the ablation: its gradient touches one output element)."""
    return eps_pred.abs().amax()


@OUTPUT_FUNCTIONS.register("elbo")
def elbo(eps_pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """w_t * mean((eps_theta - eps)^2) with the ELBO weight w_t = beta_t / (2 alpha_t (1 - abar_t))."""
    return schedule.elbo_weights[t] * (eps_pred - eps).pow(2).mean()


DEFAULT_OUTPUT_FUNCTION = "square"


def get_output_function(name: str) -> OutputFunction:
    """Look up an output function by name; an unknown name is a one-line error naming the known ones."""
    return OUTPUT_FUNCTIONS.get(name)
