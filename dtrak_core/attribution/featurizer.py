"""TRAK / D-TRAK features: phi(z) = P^T (1/K) sum_{t in T_K} grad_theta f(theta; x_t, t[, c]).

:class:`FeatureSettings` says how (output function, timesteps, projector, k, seed, parameter
filter, batch size, device, dtype); :class:`Featurizer` turns batches of clean images into
float32 features (B, k) through a model's task (``dtrak_core.tasks``) and a feature computer
(``feature_computers``). The settings that change the numbers are in
:meth:`FeatureSettings.key_fields`; batch size, device and timestep chunking are not, because
features do not depend on them (up to float rounding): the noise of a sample is a function of
(seed, sample id, t) only, see ``timesteps``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterator, Sequence

import numpy as np
import torch

from dtrak_core.attribution.feature_computers import (DTYPES, FEATURE_COMPUTERS, FeatureComputer,
                                                      PerSampleGradientProjection)
from dtrak_core.attribution.gradients import make_vmap_friendly, select_parameters
from dtrak_core.attribution.output_functions import DEFAULT_OUTPUT_FUNCTION, OUTPUT_FUNCTIONS
from dtrak_core.attribution.projectors import PROJECTOR_SETTINGS, PROJECTORS
from dtrak_core.attribution.timesteps import batch_noise, resolve_timesteps
from dtrak_core.conventions import DEFAULT_NUM_TIMESTEPS, DEFAULT_PROJECTION_DIM
from dtrak_core.schedule import NoiseSchedule
from dtrak_core.tasks import Batch, DiffusionInputs, DiffusionTask

DEVICES = ("auto", "cpu", "cuda")
#: The feature computer of format-1 features (before computers were pluggable): its name does not
#: enter the cache key, so features computed before stay valid.
DEFAULT_COMPUTER = "per-sample-gradients"
#: The parameter selection "the model's own": LoRA parameters when it has any, else all (resolved
#: by :meth:`FeatureSettings.for_model` before features are computed or keyed).
AUTO_PARAMS = "auto"


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
        computer: name in ``FEATURE_COMPUTERS`` (how features are computed from the inputs).
    """

    # metadata: the command line's flags and help (``cli_options`` builds the options from them).
    output_fn: str = field(default=DEFAULT_OUTPUT_FUNCTION, metadata={
        "flags": ("--output-fn",), "help": "output function f (square = D-TRAK, loss = TRAK)"})
    num_timesteps: int = field(default=DEFAULT_NUM_TIMESTEPS, metadata={
        "flags": ("-K", "--num-timesteps"), "help": "K uniform timesteps of T (100 is markedly better)"})
    timesteps: tuple[int, ...] | None = field(default=None, metadata={
        "flags": ("--timesteps",), "help": "explicit comma-separated timesteps instead of K uniform ones"})
    projector: str = field(default="sjlt", metadata={
        "flags": ("--projector",), "help": "random projection (sjlt: sparse JL, fast)"})
    projection_dim: int = field(default=DEFAULT_PROJECTION_DIM, metadata={
        "flags": ("-k", "--projection-dim"), "help": "k, the feature dimension"})
    sparsity: int = field(default=4, metadata={
        "flags": ("--sparsity",), "help": "buckets per coordinate for sjlt"})
    seed: int = field(default=0, metadata={"flags": ("--seed",), "help": "seed of noise and projection"})
    params: str = field(default=AUTO_PARAMS, metadata={
        "flags": ("--params",), "help": "parameters to differentiate: auto (lora for a model with a LoRA "
                                        "adapter, else all), all, lora, re:<regex> or a name substring"})
    batch_size: int = field(default=16, metadata={"flags": ("--batch-size",), "help": "samples per batch"})
    timestep_chunk: int = field(default=10, metadata={
        "flags": ("--timestep-chunk",), "help": "timesteps per sample evaluated together (memory ~ batch * chunk)"})
    device: str = field(default="auto", metadata={"flags": ("--device",), "help": "auto, cpu or cuda"})
    dtype: str = field(default="fp32", metadata={
        "flags": ("--dtype",), "help": "fp32, or bf16 / fp16 autocast of the forward pass"})
    computer: str = field(default=DEFAULT_COMPUTER, metadata={
        "flags": ("--computer",), "help": "how features are computed (a registered feature computer)"})

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
        if self.computer not in FEATURE_COMPUTERS:
            raise ValueError(f"unknown feature computer {self.computer!r}; expected one of {FEATURE_COMPUTERS.names()}")

    def to_dict(self) -> dict:
        return asdict(self)

    def for_model(self, model: torch.nn.Module) -> "FeatureSettings":
        """These settings with ``params="auto"`` resolved for ``model``: "lora" when it has LoRA
        parameters (an adapter model: its fine-tune is what attribution asks about), else "all".
        The one place of that default; feature keys are made from the resolved settings."""
        if self.params != AUTO_PARAMS:
            return self
        has_lora = any("lora" in name.lower() for name, _ in model.named_parameters())
        return replace(self, params="lora" if has_lora else "all")

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
        if self.computer == DEFAULT_COMPUTER:
            fields.pop("computer")
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
    """Computes phi for batches of one task (model family + model) with one :class:`FeatureSettings`.

    Build with :meth:`create`; the denoiser is moved to the device, put in eval mode and given a
    vmap-friendly attention processor (the instance is modified; nothing global). The featurizer
    draws the noise and the timesteps; its :class:`FeatureComputer` turns them into features.
    """

    task: DiffusionTask
    settings: FeatureSettings
    device: torch.device
    computer: FeatureComputer

    @classmethod
    def create(cls, task: DiffusionTask, settings: FeatureSettings) -> "Featurizer":
        device = resolve_device(settings.device)
        settings = settings.for_model(task.denoiser)
        task.to(device)
        model = task.denoiser.eval()
        make_vmap_friendly(model)
        for p in model.parameters():
            p.requires_grad_(False)
        timesteps = resolve_timesteps(settings.num_timesteps, settings.timesteps, task.num_train_timesteps)
        param_names = select_parameters(model, settings.params)
        computer = FEATURE_COMPUTERS.get(settings.computer)(task, settings, param_names, timesteps)
        return cls(task, settings, device, computer)

    @property
    def model(self) -> torch.nn.Module:
        return self.task.denoiser

    @property
    def schedule(self) -> NoiseSchedule:
        return self.task.schedule

    @property
    def param_names(self) -> list[str]:
        return self.computer.param_names

    @property
    def timesteps(self) -> list[int]:
        return self.computer.timesteps

    @property
    def feature_dim(self) -> int:
        return self.computer.feature_dim

    @property
    def num_parameters(self) -> int:
        return self.computer.num_parameters

    def _inputs_and_noise(self, batch: Batch) -> tuple[DiffusionInputs, torch.Tensor]:
        return self._noise_for(self.task.prepare(batch))

    def _noise_for(self, inputs: DiffusionInputs) -> tuple[DiffusionInputs, torch.Tensor]:
        noise = batch_noise(self.settings.seed, inputs.sample_ids, self.timesteps, tuple(inputs.x0.shape[1:]))
        return inputs, noise.to(self.device)

    def featurize_inputs(self, inputs: DiffusionInputs) -> np.ndarray:
        """phi for prepared inputs (x0 and condition already made, e.g. a generated target's
        latents and prompt embedding) -> float32 (B, k)."""
        inputs = DiffusionInputs(inputs.x0.to(self.device), None if inputs.condition is None
                                 else inputs.condition.to(self.device), list(inputs.sample_ids))
        features = self.computer.compute(*self._noise_for(inputs))
        return features.cpu().numpy().astype(np.float32, copy=False)

    def gradients(self, images: torch.Tensor, sample_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Timestep-averaged per-sample gradients (unprojected) for images (B, C, H, W) in [-1, 1]
        (the per-sample-gradient computer only)."""
        if not isinstance(self.computer, PerSampleGradientProjection):
            raise ValueError(f"the {self.settings.computer!r} feature computer forms no per-sample gradients")
        return self.computer.gradients(*self._inputs_and_noise(Batch(images, list(sample_ids))))

    def featurize(self, batch: Batch) -> np.ndarray:
        """phi for one batch -> float32 array (B, k)."""
        if batch.images.shape[0] != len(batch.sample_ids):
            raise ValueError(f"{batch.images.shape[0]} images but {len(batch.sample_ids)} sample ids")
        features = self.computer.compute(*self._inputs_and_noise(batch))
        return features.cpu().numpy().astype(np.float32, copy=False)

    def featurize_batch(self, images: torch.Tensor, sample_ids: Sequence[int]) -> np.ndarray:
        """phi for images (B, C, H, W) in [-1, 1] without captions or labels -> float32 (B, k)."""
        return self.featurize(Batch(images, list(sample_ids)))

    def iter_features(self, images: torch.Tensor, sample_ids: Sequence[int] | None = None,
                      start: int = 0, captions: Sequence[str] | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, stop, features) batch by batch over rows ``start..`` of ``images`` (N, C, H, W)
        (with their ``captions``, one per row, for text-conditioned models)."""
        ids = list(range(len(images))) if sample_ids is None else list(sample_ids)
        for lo in range(start, len(images), self.settings.batch_size):
            hi = min(lo + self.settings.batch_size, len(images))
            texts = None if captions is None else list(captions[lo:hi])
            yield lo, hi, self.featurize(Batch(images[lo:hi], ids[lo:hi], texts))
