"""Unconditional pixel-space DDPMs: a diffusers ``DDPMPipeline`` (UNet2DModel + DDPMScheduler)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from diffusers import DDPMPipeline, UNet2DModel
from torch.func import functional_call

from dtrak_core.io import sha256_bytes, sha256_file
from dtrak_core.tasks.base import Batch, DiffusionInputs, DiffusionTask, ModelError


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class UnconditionalPixelTask(DiffusionTask):
    """x0 = the images themselves (B, 3, H, W) in [-1, 1]; no condition; ``unet(x_t, t)``."""

    pipeline_class = "DDPMPipeline"

    def __init__(self, denoiser: UNet2DModel, scheduler) -> None:
        super().__init__(denoiser, scheduler)
        size = denoiser.config.sample_size
        if isinstance(size, (tuple, list)):
            if len(set(size)) != 1:
                raise ModelError(f"the UNet has a non-square sample size {tuple(size)}; only square images are supported")
            size = size[0]
        self.sample_size = int(size)

    @classmethod
    def load(cls, model_dir: Path) -> "UnconditionalPixelTask":
        try:
            # low_cpu_mem_usage=False: the models are small, and it avoids a warning about accelerate.
            pipeline = DDPMPipeline.from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                    low_cpu_mem_usage=False)
        # What diffusers raises for a folder it cannot read: missing or damaged files (OSError),
        # an unknown class or beta schedule (ValueError, NotImplementedError), weights that do
        # not fit the config (RuntimeError), configs of the wrong shape (KeyError, TypeError).
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as error:
            raise ModelError(f"could not load the pipeline in {model_dir}: {_one_line(error)}") from None
        try:
            cls.check_denoiser(pipeline.unet)
            return cls(pipeline.unet.eval(), pipeline.scheduler)
        except ModelError as error:
            raise ModelError(f"{model_dir}: {error}") from None

    @classmethod
    def check_denoiser(cls, unet: torch.nn.Module) -> None:
        """``ModelError`` unless ``unet`` is what a DDPMPipeline samples with and this task feeds:
        a ``UNet2DModel`` taking and predicting 3 channels (RGB; one prediction of the input's
        shape, so no learned variance) with no class embedding (it is called without labels).
        A conditional subclass overrides this to accept its condition."""
        if not isinstance(unet, UNet2DModel):
            raise ModelError(f"the denoiser is a {type(unet).__name__}; a DDPMPipeline here must hold a UNet2DModel")
        config = unet.config
        if config.in_channels != 3 or config.out_channels != 3:
            raise ModelError(f"the UNet maps {config.in_channels} to {config.out_channels} channels; expected 3 to 3 "
                             "(RGB images, a prediction of the same shape: learned-variance models are not supported)")
        if config.num_class_embeds is not None or config.class_embed_type is not None:
            raise ModelError("the UNet is class-conditional (it has a class embedding) but a DDPMPipeline calls it "
                             "without labels; register a class-conditional task for it")

    @classmethod
    def files_hash(cls, model_dir: Path) -> str:
        """The UNet's weights file and config and the scheduler's config (the whole of a
        DDPMPipeline's model), hashed as they always were: LDS builds and the golden tests
        record this value."""
        model_dir = Path(model_dir)
        parts = [sha256_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors"),
                 sha256_file(model_dir / "unet" / "config.json"),
                 sha256_file(model_dir / "scheduler" / "scheduler_config.json")]
        return sha256_bytes("".join(parts).encode())

    def save(self, model_dir: str | Path) -> None:
        DDPMPipeline(unet=self.denoiser, scheduler=self.scheduler).save_pretrained(model_dir, safe_serialization=True)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (int(self.denoiser.config.in_channels), self.sample_size, self.sample_size)

    def prepare(self, batch: Batch) -> DiffusionInputs:
        if batch.images.shape[0] != len(batch.sample_ids):
            raise ValueError(f"{batch.images.shape[0]} images but {len(batch.sample_ids)} sample ids")
        return DiffusionInputs(batch.images.to(self.device, torch.float32), None, [int(i) for i in batch.sample_ids])

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None,
                state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if state is None:
            return self.denoiser(x_t, t, return_dict=False)[0]
        return functional_call(self.denoiser, dict(state), (x_t, t), {"return_dict": False})[0]
