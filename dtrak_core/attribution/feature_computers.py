"""Feature computers: a batch of diffusion inputs -> features phi (B, k).

The interface every way of computing TRAK-style features implements. The featurizer draws the
noise (a function of (seed, sample id, t) only) and picks the timesteps; a computer turns
(inputs, noise) into features. Implementations:

- :class:`PerSampleGradientProjection` (``"per-sample-gradients"``, the default): vmap
  per-sample gradients of the output function, averaged over the K timesteps, then projected:
  phi = P^T (1/K) sum_t grad f. Memory ~ B * p (every per-sample gradient is formed).

The interface admits computers that never form per-sample gradients (a layer-factored
projection from each layer's inputs and output gradients: ``compute`` gets the task and the
inputs, not gradients), and computers whose features come in per-layer-group blocks
(``groups`` names the column ranges, for block-wise preconditioning).

A new computer: subclass :class:`FeatureComputer`, register it with
``@FEATURE_COMPUTERS.register("name")``, and select it with ``FeatureSettings(computer="name")``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from dtrak_core.attribution.gradients import per_sample_gradients
from dtrak_core.attribution.output_functions import get_output_function
from dtrak_core.attribution.projectors import PROJECTORS, Projector, make_projector
from dtrak_core.plugins import Registry
from dtrak_core.tasks import DiffusionInputs, DiffusionTask

if TYPE_CHECKING:  # featurizer imports this module: settings only for type hints
    from dtrak_core.attribution.featurizer import FeatureSettings

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FeatureGroup:
    """Columns [start, stop) of the features belong to the parameter group ``name``."""

    name: str
    start: int
    stop: int


class FeatureComputer(ABC):
    """Computes phi (B, k) for the selected parameters of ``task``'s denoiser.

    Attributes set by the base class: ``task``, ``settings``, ``param_names`` (the parameters
    whose gradients define the features), ``timesteps`` (the K timesteps), ``num_parameters``
    (p, the number of selected gradient coordinates).
    """

    #: FeatureSettings fields that this computer alone reads and that change its numbers; they
    #: enter the feature cache key (beside the fields every computer uses).
    key_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, task: DiffusionTask, settings: "FeatureSettings", param_names: Sequence[str],
                 timesteps: Sequence[int]) -> None:
        self.task, self.settings = task, settings
        self.param_names, self.timesteps = list(param_names), list(timesteps)
        sizes = {n: p.numel() for n, p in task.denoiser.named_parameters()}
        self.num_parameters = sum(sizes[n] for n in self.param_names)

    @property
    @abstractmethod
    def feature_dim(self) -> int:
        """k, the number of feature columns."""

    def groups(self) -> list[FeatureGroup]:
        """The column blocks of the features (one block unless the computer keeps groups apart)."""
        return [FeatureGroup("all", 0, self.feature_dim)]

    def describe(self) -> dict:
        """What the manifest records about this computer (not part of the key)."""
        return {"computer": type(self).__name__, "feature_dim": self.feature_dim,
                "num_parameters": self.num_parameters}

    @abstractmethod
    def compute(self, inputs: DiffusionInputs, noise: torch.Tensor) -> torch.Tensor:
        """Features (B, k) float32 on the inputs' device.

        inputs: x0 (B, *input_shape) on the model's device, condition, sample ids;
        noise: (B, K, *input_shape), noise[b, i] is eps of sample b at ``timesteps[i]``.
        """


FEATURE_COMPUTERS: Registry[type[FeatureComputer]] = Registry("feature computer")


@FEATURE_COMPUTERS.register("per-sample-gradients")
class PerSampleGradientProjection(FeatureComputer):
    """phi = P^T (1/K) sum_t grad_theta f: vmap per-sample gradients, then a random projection."""

    key_settings = ()  # the projector declares its own key fields

    def __init__(self, task: DiffusionTask, settings: "FeatureSettings", param_names: Sequence[str],
                 timesteps: Sequence[int]) -> None:
        super().__init__(task, settings, param_names, timesteps)
        p, k = self.num_parameters, settings.projection_dim
        # Only a projector whose matrix depends on k (its key settings) is held to k <= p.
        if "projection_dim" in PROJECTORS.get(settings.projector).key_settings and k > p:
            raise ValueError(f"projection dimension k={k} exceeds the number of selected gradient "
                             f"coordinates p={p}; choose k <= {p}")
        self.projector: Projector = make_projector(settings.projector, p, k, settings.seed, self.param_names,
                                                   settings.sparsity)
        self.output_fn = get_output_function(settings.output_fn)

    @property
    def feature_dim(self) -> int:
        return self.projector.output_dim

    def describe(self) -> dict:
        return {**super().describe(), "projector": self.projector.describe()}

    def gradients(self, inputs: DiffusionInputs, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Timestep-averaged per-sample gradients, name -> (B, *param.shape), unprojected."""
        return per_sample_gradients(self.task, self.param_names, inputs, noise.to(inputs.x0.device),
                                    self.timesteps, self.output_fn, self.settings.timestep_chunk,
                                    DTYPES[self.settings.dtype])

    def compute(self, inputs: DiffusionInputs, noise: torch.Tensor) -> torch.Tensor:
        return self.projector.project(self.gradients(inputs, noise))
