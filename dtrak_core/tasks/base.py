"""The diffusion task interface: what one model family needs to say for every stage to run.

A :class:`DiffusionTask` owns, for one model family (an unconditional pixel DDPM, a latent
text-to-image model, ...):

- ``prepare``: a :class:`Batch` of images (and captions or labels) -> :class:`DiffusionInputs`:
  the clean input x0 the diffusion runs on (pixels; or VAE latents times the scaling factor),
  its condition (None; class labels; text embeddings) and the sample ids that seed the noise;
- ``denoise``: the model call with that condition, optionally with substituted parameters
  (``torch.func.functional_call``), returning the raw prediction;
- ``predict_epsilon``: the raw prediction converted to epsilon space, so every output function
  and loss sees an epsilon prediction whatever the model predicts (``tasks.prediction``);
- ``training_target``: what the model regresses in training (its own prediction type);
- ``schedule``: the scheduler's own betas and number of training steps (never an assumed T).

Featurization, training, generation, the held-out loss and the LDS / counterfactual retrains
all go through it. A new model family is one subclass registered in ``tasks.TASKS`` under the
``_class_name`` of its diffusers pipeline folder.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

import torch

from dtrak_core.io import sha256_file, sha256_json
from dtrak_core.schedule import NoiseSchedule
from dtrak_core.tasks.prediction import PREDICTION_TYPES, PredictionType


@dataclass
class Batch:
    """What a dataset gives: images (B, C, H, W) in [-1, 1], their sample ids, and optional
    captions (B strings) or integer labels (B,)."""

    images: torch.Tensor
    sample_ids: Sequence[int]
    captions: Sequence[str] | None = None
    labels: torch.Tensor | None = None


@dataclass
class DiffusionInputs:
    """What the diffusion runs on: x0 (B, *input_shape), the condition (B, ...) or None, ids (B)."""

    x0: torch.Tensor
    condition: torch.Tensor | None
    sample_ids: list[int]

    def __len__(self) -> int:
        return int(self.x0.shape[0])


class ModelError(ValueError):
    """A model folder is not a pipeline any registered task can load; the message says why."""


#: Scheduler classes whose noise process is the discrete DDPM one, fixed by their betas
#: (abar_t = prod_{s<=t} (1 - beta_s)): training, the losses, the features and our DDIM / DDPM
#: samplers (built from the scheduler's config) reproduce it exactly. Variance-exploding,
#: continuous-time and flow-matching schedulers (ScoreSdeVe, EDM, FlowMatch, ...) have no such
#: betas; a model made with one is refused at load rather than trained or sampled as another.
DDPM_FAMILY_SCHEDULERS = frozenset({
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler"})


def check_scheduler(scheduler) -> str:
    """The scheduler's ``prediction_type`` once its class and prediction type are supported;
    else ``ModelError`` naming what is not."""
    kind = type(scheduler).__name__
    if kind not in DDPM_FAMILY_SCHEDULERS or getattr(scheduler, "betas", None) is None:
        raise ModelError(f"the scheduler {kind} is not supported (its noise process is not the discrete-beta DDPM "
                         f"one we reproduce); expected one of {sorted(DDPM_FAMILY_SCHEDULERS)}")
    name = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if name not in PREDICTION_TYPES:
        raise ModelError(f"the scheduler's prediction_type {name!r} is not supported; expected one of "
                         f"{PREDICTION_TYPES.names()}")
    return name


class DiffusionTask(ABC):
    """One model family. Subclasses set ``pipeline_class`` and implement the abstract methods."""

    #: The ``_class_name`` in ``model_index.json`` of the pipeline folders this task loads.
    pipeline_class: ClassVar[str] = ""

    def __init__(self, denoiser: torch.nn.Module, scheduler) -> None:
        name = check_scheduler(scheduler)
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.schedule = NoiseSchedule.from_scheduler(scheduler)
        self.prediction: PredictionType = PREDICTION_TYPES.get(name)()

    # -- loading and saving -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, model_dir: Path) -> "DiffusionTask":
        """Load the pipeline folder ``model_dir`` (``ModelError`` with the reason if it does not fit)."""

    @abstractmethod
    def save(self, model_dir: str | Path) -> None:
        """Write the pipeline folder (``save_pretrained``, safetensors) that ``load`` reads back."""

    @classmethod
    def files_hash(cls, model_dir: Path) -> str:
        """sha256 of the files of a model folder of this family, read without loading the model:
        what recognises a folder on disk (the samples cache, LDS and counterfactual builds,
        ``models.pipeline_files_hash``). ``content_hash`` is another thing: the loaded tensors
        that change a feature (feature keys). Default: ``model_index.json`` and every file of
        the components it names, as (relative path, sha256) pairs in path order; files beside
        them (recipe, training state, kept checkpoints) and hidden files are not the model."""
        model_dir = Path(model_dir)
        index = json.loads((model_dir / "model_index.json").read_text())
        files = [model_dir / "model_index.json"]
        for name in index:
            if not name.startswith("_") and (model_dir / name).is_dir():
                files += [p for p in (model_dir / name).rglob("*") if p.is_file()]
        parts = [(p.relative_to(model_dir).as_posix(), sha256_file(p)) for p in sorted(files)]
        return sha256_json([(rel, digest) for rel, digest in parts
                            if not any(part.startswith(".") for part in rel.split("/"))])

    # -- what the diffusion runs on -----------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        """T, from the scheduler's betas."""
        return self.schedule.num_train_timesteps

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one x0, e.g. (3, 32, 32) for pixels or (4, 8, 8) for latents."""

    @abstractmethod
    def prepare(self, batch: Batch) -> DiffusionInputs:
        """Batch -> (x0, condition, sample ids) on the denoiser's device."""

    @abstractmethod
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None,
                state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The raw model prediction (B, *input_shape) for x_t (B, ...), t (B,), condition (B, ...).

        ``state``: a full parameter/buffer mapping for ``torch.func.functional_call`` (per-sample
        gradients substitute the differentiated parameters); None calls the module as it is.
        """

    # -- shared by every family ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def predict_epsilon(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None,
                        state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The prediction in epsilon space, float32 (B, *input_shape)."""
        return self.prediction.to_epsilon(self.denoise(x_t, t, condition, state).float(), x_t, t, self.schedule)

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What ``denoise`` is trained to output for (x0, eps, t): eps, v or x0."""
        return self.prediction.target(x0, eps, t, self.schedule)

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 in the diffusion's space (B, *input_shape) -> images (B, 3, H, W) in [-1, 1].

        Pixel models return x0; latent models decode it.
        """
        return x0

    @property
    def image_size(self) -> int:
        """The side of the (square) images the model takes: x0's side for pixel models."""
        return int(self.input_shape[-1])

    def captions_for(self, dataset) -> Sequence[str] | None:
        """The captions a dataset's rows are conditioned on (None: the family uses none)."""
        return None

    def content_hash(self) -> str:
        """sha256 of everything of the model that changes a feature, for cache keys. Default: the
        denoiser's tensors (``hashing.state_dict_hash``); families with more parts (a VAE, a text
        encoder, a tokenizer, an adapter) hash them too."""
        from dtrak_core.hashing import state_dict_hash

        return state_dict_hash(self.denoiser)

    def with_denoiser(self, denoiser: torch.nn.Module) -> "DiffusionTask":
        """The same family and scheduler around another denoiser (a copy, a checkpoint, a fresh init)."""
        return type(self)(denoiser, self.scheduler)

    def to(self, device: torch.device | str) -> "DiffusionTask":
        """Move the denoiser (and anything else the task holds) to ``device``; returns self."""
        self.denoiser.to(device)
        return self
