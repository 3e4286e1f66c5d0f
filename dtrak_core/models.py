"""Model architectures (named UNet presets) and pipeline-folder loading and saving.

A model is a diffusers ``DDPMPipeline`` folder: ``unet/`` (UNet2DModel, safetensors) and
``scheduler/`` (DDPMScheduler: T = 1000, linear betas, epsilon prediction), written by
``save_pretrained``. Our training writes ``recipe.json`` beside them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging

RECIPE_FILE = "recipe.json"

# Loading a two-part pipeline takes milliseconds; diffusers' bar would only clutter our output.
diffusers_logging.disable_progress_bar()


class ModelError(ValueError):
    """A model folder is not a pipeline we can load; the message says why."""


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


def make_scheduler() -> DDPMScheduler:
    """The D-TRAK setup: T = 1000, linear betas 1e-4..0.02, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type="epsilon", clip_sample=True)


def load_pipeline(model_dir: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load ``(unet, scheduler)`` from a DDPMPipeline folder, with a clear error if it is not one."""
    model_dir = Path(model_dir)
    index = model_dir / "model_index.json"
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist")
    if not index.exists():
        raise ModelError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    import json

    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as error:
        raise ModelError(f"{index} is not valid JSON: {error}") from None
    if class_name != "DDPMPipeline":
        raise ModelError(f"{model_dir} holds a {class_name}; only DDPMPipeline (unconditional "
                         "UNet2DModel + DDPMScheduler) is supported for now")
    try:
        # low_cpu_mem_usage=False: the models are small, and it avoids a warning about accelerate.
        pipeline = DDPMPipeline.from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                low_cpu_mem_usage=False)
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelError(f"could not load the pipeline in {model_dir}: {error}") from None
    unet = pipeline.unet.eval()
    return unet, pipeline.scheduler


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, model_dir: str | Path) -> None:
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(model_dir, safe_serialization=True)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_hash(model_dir: str | Path) -> str:
    """Content hash of a pipeline folder: the UNet weights file and the two configs."""
    from dtrak_core.io import sha256_bytes, sha256_file

    model_dir = Path(model_dir)
    parts = [sha256_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors"),
             sha256_file(model_dir / "unet" / "config.json"),
             sha256_file(model_dir / "scheduler" / "scheduler_config.json")]
    return sha256_bytes("".join(parts).encode())
