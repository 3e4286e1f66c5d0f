"""TRAK / D-TRAK features: phi(z) = P^T (1/K) sum_{t in T_K} grad_theta f(theta; x_t, t).

:class:`FeatureSettings` says how (output function, timesteps, projector, k, seed, parameter
filter, batch size, device, dtype); :class:`Featurizer` turns batches of clean images into
float32 features (B, k). The settings that change the numbers are in
:meth:`FeatureSettings.key_fields`; batch size, device and timestep chunking are not, because
features do not depend on them (up to float rounding): the noise of a sample is a function of
(seed, sample id, t) only, see ``timesteps``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from dtrak_core.attribution.gradients import make_vmap_friendly, per_sample_gradients, select_parameters
from dtrak_core.attribution.output_functions import (DEFAULT_OUTPUT_FUNCTION, OUTPUT_FUNCTIONS,
                                                     NoiseSchedule, get_output_function)
from dtrak_core.attribution.projectors import PROJECTOR_SETTINGS, PROJECTORS, Projector, make_projector
from dtrak_core.attribution.timesteps import DEFAULT_NUM_TIMESTEPS, batch_noise, resolve_timesteps

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class FeatureSettings:
    """How features are computed.

    Attributes:
        output_fn: name in ``OUTPUT_FUNCTIONS`` ("square" = D-TRAK, "loss" = TRAK, ...).
        num_timesteps: K uniform timesteps of T (ignored when ``timesteps`` is given).
        timesteps: an explicit timestep list instead of the uniform K.
        projector: "sjlt" (sparse JL, fast: cost ~ p s per sample), "rademacher" or "gaussian"
            (dense, as TRAK; cost ~ p k), or "identity" (no projection, k = p).
        projection_dim: k; ignored by "identity".
        sparsity: s, buckets per coordinate for "sjlt".
        seed: seeds the noise and the projection.
        params: parameter filter: "all", "lora", "re:<regex>" or a name substring.
        batch_size: samples per vmap batch (memory ~ batch_size * timestep_chunk activations).
        timestep_chunk: timesteps evaluated together per sample.
        device: "auto" (cuda when available), "cpu" or "cuda".
        dtype: "fp32", or "bf16" / "fp16" autocast for the forward pass (gradients stay fp32).
    """

    output_fn: str = DEFAULT_OUTPUT_FUNCTION
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS
    timesteps: tuple[int, ...] | None = None
    projector: str = "sjlt"
    projection_dim: int = 2048
    sparsity: int = 4
    seed: int = 0
    params: str = "all"
    batch_size: int = 16
    timestep_chunk: int = 10
    device: str = "auto"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.output_fn not in OUTPUT_FUNCTIONS:
            raise ValueError(f"unknown output function {self.output_fn!r}; expected one of "
                             f"{sorted(OUTPUT_FUNCTIONS)}")
        if self.timesteps is None and self.num_timesteps < 1:
            raise ValueError(f"number of timesteps K={self.num_timesteps} must be at least 1")
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        PROJECTORS.get(self.projector)  # unknown names: one line naming the known ones
        if self.projection_dim < 1:
            raise ValueError(f"projection dimension k={self.projection_dim} must be at least 1")
        if self.sparsity < 1:
            raise ValueError(f"sparsity s={self.sparsity} must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} must be at least 1")
        if self.timestep_chunk < 1:
            raise ValueError(f"timestep chunk {self.timestep_chunk} must be at least 1")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {list(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def key_fields(self) -> dict:
        """The settings that change the feature values (the cache key uses these)."""
        fields = self.to_dict()
        for name in ("batch_size", "timestep_chunk", "device"):
            fields.pop(name)
        if self.timesteps is not None:
            fields["num_timesteps"] = None
        # The projector says which of k and s change its matrix; the others are None in the key.
        kept = PROJECTORS.get(self.projector).key_settings
        for name in PROJECTOR_SETTINGS:
            if name not in kept:
                fields[name] = None
        return fields


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available else cpu; "cuda" without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use 'cpu' or 'auto'")
    return torch.device(name)


@dataclass
class Featurizer:
    """Computes phi for batches of images with one model and one :class:`FeatureSettings`.

    Build with :meth:`create`; the model is moved to the device, put in eval mode and given a
    vmap-friendly attention processor (the instance is modified; nothing global).
    """

    model: torch.nn.Module
    schedule: NoiseSchedule
    settings: FeatureSettings
    device: torch.device
    param_names: list[str]
    timesteps: list[int]
    projector: Projector
    image_shape: tuple[int, int, int] = field(default=(3, 0, 0))

    @classmethod
    def create(cls, model: torch.nn.Module, scheduler, settings: FeatureSettings) -> "Featurizer":
        prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"the scheduler predicts {prediction!r}; the output functions are defined "
                             "for epsilon prediction only")
        device = resolve_device(settings.device)
        model = model.to(device).eval()
        make_vmap_friendly(model)
        for p in model.parameters():
            p.requires_grad_(False)
        schedule = NoiseSchedule.from_scheduler(scheduler)
        timesteps = resolve_timesteps(settings.num_timesteps, settings.timesteps, schedule.num_train_timesteps)
        param_names = select_parameters(model, settings.params)
        sizes = dict((n, p.numel()) for n, p in model.named_parameters())
        p = sum(sizes[n] for n in param_names)
        k = p if settings.projector == "identity" else settings.projection_dim
        if k > p:
            raise ValueError(f"projection dimension k={k} exceeds the number of selected gradient "
                             f"coordinates p={p}; choose k <= {p}")
        projector = make_projector(settings.projector, p, k, settings.seed, param_names, settings.sparsity)
        config = getattr(model, "config", None)
        size = getattr(config, "sample_size", 0) or 0
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        channels = int(getattr(config, "in_channels", 3) or 3)
        return cls(model, schedule.to(device), settings, device, param_names, timesteps, projector,
                   (channels, size, size))

    @property
    def feature_dim(self) -> int:
        return self.projector.output_dim

    @property
    def num_parameters(self) -> int:
        return self.projector.input_dim

    def gradients(self, images: torch.Tensor, sample_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Timestep-averaged per-sample gradients (unprojected) for images (B, C, H, W) in [-1, 1]."""
        if images.shape[0] != len(sample_ids):
            raise ValueError(f"{images.shape[0]} images but {len(sample_ids)} sample ids")
        noise = batch_noise(self.settings.seed, sample_ids, self.timesteps, tuple(images.shape[1:]))
        return per_sample_gradients(
            self.model, self.param_names, images.to(self.device, torch.float32), noise.to(self.device),
            self.timesteps, get_output_function(self.settings.output_fn), self.schedule,
            self.settings.timestep_chunk, DTYPES[self.settings.dtype])

    def featurize_batch(self, images: torch.Tensor, sample_ids: Sequence[int]) -> np.ndarray:
        """phi for one batch: images (B, C, H, W) in [-1, 1] -> float32 array (B, k)."""
        grads = self.gradients(images, sample_ids)
        return self.projector.project(grads).cpu().numpy().astype(np.float32, copy=False)

    def iter_features(self, images: torch.Tensor, sample_ids: Sequence[int] | None = None,
                      start: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, stop, features) batch by batch over rows ``start..`` of ``images`` (N, C, H, W)."""
        ids = list(range(len(images))) if sample_ids is None else list(sample_ids)
        for lo in range(start, len(images), self.settings.batch_size):
            hi = min(lo + self.settings.batch_size, len(images))
            yield lo, hi, self.featurize_batch(images[lo:hi], ids[lo:hi])
