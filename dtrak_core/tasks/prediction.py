"""What a denoiser predicts, and the conversion of each prediction type to epsilon space.

With x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (a = sqrt(abar_t), s = sqrt(1 - abar_t)):

| type           | the model predicts          | eps from the prediction p      |
|----------------|-----------------------------|--------------------------------|
| ``epsilon``    | eps                         | p                              |
| ``v_prediction`` | v = a eps - s x0          | a p + s x_t                    |
| ``sample``     | x0                          | (x_t - a p) / s                |

Every output function and every loss here works on the epsilon-space prediction and the true
eps, whatever the model predicts; training regresses the model's own target.
"""

from __future__ import annotations

import torch

from dtrak_core.plugins import Registry
from dtrak_core.schedule import NoiseSchedule


class PredictionType:
    """A diffusers ``prediction_type``: its training target and its conversion to epsilon."""

    name = "base"

    def to_epsilon(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   schedule: NoiseSchedule) -> torch.Tensor:
        """The epsilon-space prediction (same shape as ``prediction``: (B, ...)); t: (B,)."""
        raise NotImplementedError

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
               schedule: NoiseSchedule) -> torch.Tensor:
        """What the model is trained to predict for (x0, eps, t), (B, ...)."""
        raise NotImplementedError


PREDICTION_TYPES: Registry[type[PredictionType]] = Registry("prediction type")


@PREDICTION_TYPES.register("epsilon")
class EpsilonPrediction(PredictionType):
    name = "epsilon"

    def to_epsilon(self, prediction, x_t, t, schedule):
        return prediction  # already eps: returned as is, so features stay bit for bit

    def target(self, x0, eps, t, schedule):
        return eps


@PREDICTION_TYPES.register("v_prediction")
class VPrediction(PredictionType):
    name = "v_prediction"

    def to_epsilon(self, prediction, x_t, t, schedule):
        a, s = schedule.signal_scale(t, x_t.dim()), schedule.noise_scale(t, x_t.dim())
        return a * prediction + s * x_t

    def target(self, x0, eps, t, schedule):
        a, s = schedule.signal_scale(t, x0.dim()), schedule.noise_scale(t, x0.dim())
        return a * eps - s * x0


@PREDICTION_TYPES.register("sample")
class SamplePrediction(PredictionType):
    name = "sample"

    def to_epsilon(self, prediction, x_t, t, schedule):
        # s >= sqrt(beta_0) > 0 for every t, so the division is defined (large at t = 0: that is the maths).
        a, s = schedule.signal_scale(t, x_t.dim()), schedule.noise_scale(t, x_t.dim())
        return (x_t - a * prediction) / s

    def target(self, x0, eps, t, schedule):
        return x0


def prediction_type(name: str) -> PredictionType:
    """The conversion object for a scheduler's ``prediction_type`` (a clear error for others)."""
    return PREDICTION_TYPES.get(name)()
