"""Model architectures (named UNet presets), the default scheduler, and pipeline-folder hashes.

A model is a diffusers pipeline folder written by ``save_pretrained`` (safetensors); which
pipeline classes load is decided by ``dtrak_core.tasks`` (one task per model family). Our
training writes ``recipe.json`` beside the pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging

from dtrak_core.tasks import ModelError, load_task, task_class_for
from dtrak_core.training_run import RECIPE_FILE

# Loading a two-part pipeline takes milliseconds; diffusers' bar would only clutter our output.
diffusers_logging.disable_progress_bar()


@dataclass(frozen=True)
class UNetPreset:
    """A UNet2DModel configuration, small enough to train on a CPU."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int = 1
    norm_num_groups: int = 16
    attention_head_dim: int = 32
    dropout: float = 0.0

    def build(self, image_size: int, seed: int = 0) -> UNet2DModel:
        torch.manual_seed(seed)
        return UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, **asdict(self))


UNET_PRESETS: dict[str, UNetPreset] = {
    # The embedded demo (32 px): attention only at 8 px, where it is cheap.
    "demo": UNetPreset(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # The evaluation model (16 px), retrained many times by LDS and counterfactual runs.
    "mini": UNetPreset(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ),
    # For tests: a few thousand parameters.
    "tiny": UNetPreset(
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ),
}


def make_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The D-TRAK setup: T = 1000, linear betas 1e-4..0.02, epsilon prediction by default."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type=prediction_type, clip_sample=True)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pipeline_files_hash(model_dir: str | Path) -> str:
    """sha256 of a model folder's *files*, as its task defines it (``DiffusionTask.files_hash``),
    read without loading the model: what the samples cache and LDS / counterfactual builds
    record to recognise a folder.

    - a ``DDPMPipeline``: the UNet weights file and the two configs (the value recorded so far);
    - a ``StableDiffusionPipeline``: ``model_index.json`` and every file of its components (VAE,
      text encoder, tokenizer, UNet, scheduler);
    - an adapter folder (``base_model.json``): the adapter's files and its base's files hash.

    Compare ``DiffusionTask.content_hash``, a hash of the loaded tensors (feature cache keys).
    """
    return task_class_for(model_dir).files_hash(Path(model_dir))


__all__ = ["RECIPE_FILE", "UNET_PRESETS", "UNetPreset", "ModelError", "make_scheduler", "count_parameters",
           "pipeline_files_hash", "load_task"]

