"""Latent text-to-image models: a diffusers ``StableDiffusionPipeline`` folder, optionally with a LoRA.

The pipeline holds a UNet2DConditionModel (the denoiser), an AutoencoderKL (the VAE), a CLIP
text encoder and its tokenizer, and a scheduler (SD 1.x and 2.x layouts; epsilon or v
prediction: ``tasks.prediction`` converts). For every stage:

- x0 = the VAE posterior **mean** of the image times ``vae.config.scaling_factor`` (minus the
  ``shift_factor`` first, where a VAE has one), shape (4, H/8, W/8) for SD. The mean, not a sample:
  it is the encoder's estimate of the image's latent, and it makes a training image's features a
  deterministic function of the image. A posterior sample adds noise that has nothing to do with
  the image's identity, and the diffusion timesteps already noise x0 on purpose.
- condition = the caption's text-encoder hidden states (B, L, D), L = the tokenizer's
  ``model_max_length`` (77 for SD), computed once per batch without gradients, exactly as
  diffusers' pipeline encodes a prompt (padding to L; a prompt longer than L is a
  :class:`PromptError`, never silently truncated).
- the model call = ``unet(x_t, t, encoder_hidden_states=condition)``, through
  ``torch.func.functional_call`` when per-sample gradients substitute parameters.
- ``to_images`` decodes latents with the VAE.

Captions come from the data folder's ``metadata.csv`` column ``text`` (:func:`dataset_captions`).
A LoRA adapter (``dtrak_core.lora``) is attached to the UNet (and to the text encoder when it
has text-encoder weights); features then differentiate the LoRA parameters by default
(``FeatureSettings.params = "auto"``).

Targets (:class:`TextToImageTarget`): an image generated from (prompt, seed, guidance scale,
steps) keeps its final latents and its prompt embedding, so it is attributed with exactly the
latents it was decoded from (never re-encoded through the VAE); an uploaded image is encoded
with a typed prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call

from dtrak_core.hashing import state_dict_hash
from dtrak_core.io import sha256_bytes, sha256_file, sha256_json, write_bytes_atomic
from dtrak_core.tasks.base import Batch, DiffusionInputs, DiffusionTask, ModelError

if TYPE_CHECKING:  # heavy imports only where used: loading dtrak_core.tasks stays fast
    from dtrak_core.datasets.imagefolder import ImageFolderDataset

#: The metadata.csv column that holds each training image's caption.
CAPTION_COLUMN = "text"
#: The files of a target record: tensors, then the JSON written last (its completion marker).
TARGET_TENSORS, TARGET_JSON = "target.safetensors", "target.json"


class PromptError(ValueError):
    """A prompt the tokenizer cannot take whole (too long); the message names it and the limit."""


def dataset_captions(dataset: "ImageFolderDataset", column: str = CAPTION_COLUMN) -> list[str]:
    """The caption of every row of ``dataset`` (its ``metadata.csv`` column ``column``)."""
    from dtrak_core.datasets.imagefolder import METADATA_FILE, DatasetError

    if column not in dataset.metadata.columns:
        raise DatasetError(f"{dataset.root / METADATA_FILE} has no {column!r} caption column, which a "
                           f"text-to-image model needs (columns are {list(dataset.metadata.columns)})")
    return dataset.metadata[column].astype(str).tolist()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what a tokenizer does: its full serialized form (vocabulary, merges, normaliser,
    special tokens) and its maximum length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return sha256_json({"class": type(tokenizer).__name__, "max_length": int(tokenizer.model_max_length),
                        "tokenizer_sha256": hashlib.sha256(body.encode()).hexdigest()})


def _config_json(module: torch.nn.Module) -> dict:
    config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "_diffusers_version")}
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def sd_pipeline_class():
    """diffusers' ``StableDiffusionPipeline``, imported without transformers' notes about optional
    image-processor backends, and with its per-load progress bars off (they only clutter output)."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        transformers_logging.set_verbosity(level)
    transformers_logging.disable_progress_bar()
    return StableDiffusionPipeline


class TextToImageTask(DiffusionTask):
    """Stable Diffusion: x0 = VAE latents (posterior mean x scaling factor); condition = CLIP text
    hidden states (B, L, D); ``unet(x_t, t, encoder_hidden_states=condition)``."""

    pipeline_class = "StableDiffusionPipeline"

    def __init__(self, denoiser: torch.nn.Module, scheduler, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                 tokenizer, base_dir: Path | None = None, adapter_dir: Path | None = None) -> None:
        super().__init__(denoiser, scheduler)
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        #: Where the base pipeline and the adapter were loaded from (None for models built in memory).
        self.base_dir, self.adapter_dir = base_dir, adapter_dir
        size = denoiser.config.sample_size
        self.sample_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if int(vae.config.latent_channels) != int(denoiser.config.in_channels):
            raise ModelError(f"the VAE makes {vae.config.latent_channels}-channel latents but the UNet takes "
                             f"{denoiser.config.in_channels} channels")
        width = int(text_encoder.config.hidden_size)
        if width != int(denoiser.config.cross_attention_dim):
            raise ModelError(f"the text encoder's hidden size {width} differs from the UNet's "
                             f"cross_attention_dim {denoiser.config.cross_attention_dim}")

    # -- loading and saving -------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: Path, adapter: str | Path | None = None) -> "TextToImageTask":
        """A pipeline folder, or an adapter folder whose ``base_model.json`` names one (see
        ``dtrak_core.lora``); ``adapter``: a LoRA folder or file to attach to a pipeline folder."""
        from dtrak_core import lora

        model_dir = Path(model_dir)
        base_dir = model_dir
        pointer = lora.read_base(model_dir) if not (model_dir / "model_index.json").exists() else None
        if pointer is not None:
            if adapter is not None:
                raise ModelError(f"{model_dir} is an adapter folder already; give its base pipeline to attach {adapter}")
            base_dir, base_hash = pointer
            adapter = model_dir
            if not (base_dir / "model_index.json").exists():
                raise ModelError(f"the base pipeline {base_dir} named in {model_dir / lora.BASE_FILE} does not exist")
            if base_hash and cls.files_hash(base_dir) != base_hash:
                raise ModelError(f"the base pipeline {base_dir} has changed since the LoRA in {model_dir} was "
                                 f"trained on it (files hash differs from {lora.BASE_FILE})")
        task = cls._load_pipeline(base_dir)
        if adapter is not None:
            task.attach_adapter(adapter)
        return task

    @classmethod
    def files_hash(cls, model_dir: Path) -> str:
        """A pipeline folder: ``model_index.json`` and every file of its components (VAE, text
        encoder, tokenizer, UNet, scheduler; ``DiffusionTask.files_hash``). An adapter folder:
        sha256 over the adapter's files (weights; peft's config) and its base's files hash, so
        a changed adapter or base changes it. A hash of files for recognising a folder;
        :meth:`content_hash` (the loaded tensors, configs and tokenizer) keys features."""
        from dtrak_core import lora

        model_dir = Path(model_dir)
        pointer = lora.read_base(model_dir) if not (model_dir / "model_index.json").exists() else None
        if pointer is None:
            return super().files_hash(model_dir)
        files = lora.find_adapter(model_dir)
        adapter = {p.name: sha256_file(p) for p in (files.weights, files.config) if p is not None}
        return sha256_json({"adapter": adapter, "base": cls.files_hash(pointer[0])})

    @classmethod
    def _load_pipeline(cls, model_dir: Path) -> "TextToImageTask":
        StableDiffusionPipeline = sd_pipeline_class()
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                model_dir, safety_checker=None, requires_safety_checker=False, use_safetensors=True,
                local_files_only=True)
        except (OSError, ValueError, EnvironmentError, TypeError) as error:
            from dtrak_core.lora import one_line

            raise ModelError(f"could not load the Stable Diffusion pipeline in {model_dir}: {one_line(error)}") from None
        return cls(pipeline.unet.eval(), pipeline.scheduler, pipeline.vae.eval(), pipeline.text_encoder.eval(),
                   pipeline.tokenizer, base_dir=Path(model_dir))

    def attach_adapter(self, adapter: str | Path) -> None:
        """Attach a LoRA (folder or file, diffusers or peft format) to the UNet (``LoraError`` if it does not fit)."""
        from dtrak_core.lora import attach_adapter

        attach_adapter(self.denoiser, self.text_encoder, adapter, self.base_dir or "the pipeline")
        self.denoiser.eval()
        self.adapter_dir = Path(adapter)

    @property
    def has_adapter(self) -> bool:
        from dtrak_core.lora import adapter_config

        return adapter_config(self.denoiser) is not None

    def pipeline(self):
        """The diffusers ``StableDiffusionPipeline`` of these components (no safety checker)."""
        StableDiffusionPipeline = sd_pipeline_class()

        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.denoiser, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def save(self, model_dir: str | Path) -> None:
        """Without an adapter: the pipeline folder (``save_pretrained``, safetensors). With one: the
        adapter folder (diffusers format) naming its base folder, which must be on disk."""
        from dtrak_core import lora

        if self.has_adapter:
            if self.base_dir is None:
                raise ModelError("this LoRA model has no base pipeline folder on disk; save the base first")
            lora.save_adapter(self.denoiser, model_dir)
            lora.write_base(model_dir, self.base_dir, type(self).files_hash(self.base_dir))
            return
        self.pipeline().save_pretrained(model_dir, safe_serialization=True)

    def with_denoiser(self, denoiser: torch.nn.Module) -> "TextToImageTask":
        return type(self)(denoiser, self.scheduler, self.vae, self.text_encoder, self.tokenizer, self.base_dir)

    def to(self, device: torch.device | str) -> "TextToImageTask":
        for module in (self.denoiser, self.vae, self.text_encoder):
            module.to(device)
        return self

    # -- what the diffusion runs on -----------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (int(self.denoiser.config.in_channels), self.sample_size, self.sample_size)

    @property
    def image_size(self) -> int:
        """The side of the images the pipeline makes and encodes: latent side x VAE factor."""
        return self.sample_size * self.vae_scale_factor

    def captions_for(self, dataset: "ImageFolderDataset") -> list[str]:
        return dataset_captions(dataset)

    def content_hash(self) -> str:
        """sha256 over every part that changes a feature: the UNet's tensors (LoRA included), the
        LoRA's settings (alpha / r scale its output), the VAE's and text encoder's tensors, the
        three configs (the VAE's scaling factor lives there) and the tokenizer."""
        from dtrak_core.lora import adapter_config

        return sha256_json({
            "family": self.pipeline_class,
            "unet": state_dict_hash(self.denoiser), "unet_config": _config_json(self.denoiser),
            "adapter": adapter_config(self.denoiser),
            "vae": state_dict_hash(self.vae), "vae_config": _config_json(self.vae),
            "text_encoder": state_dict_hash(self.text_encoder),
            "text_encoder_config": _config_json(self.text_encoder),
            "tokenizer": tokenizer_hash(self.tokenizer),
        })

    def prepare(self, batch: Batch) -> DiffusionInputs:
        if batch.images.shape[0] != len(batch.sample_ids):
            raise ValueError(f"{batch.images.shape[0]} images but {len(batch.sample_ids)} sample ids")
        if batch.captions is None or len(batch.captions) != len(batch.sample_ids):
            raise ValueError(f"a text-to-image model needs one caption per image; got "
                             f"{'none' if batch.captions is None else len(batch.captions)} for {len(batch.sample_ids)} images")
        return DiffusionInputs(self.encode_images(batch.images), self.encode_prompts(batch.captions),
                               [int(i) for i in batch.sample_ids])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> x0 = (posterior mean - shift) x scaling factor, float32 (B, *input_shape)."""
        side = images.shape[-1]
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {side}x{images.shape[-2]} but the pipeline takes "
                             f"{self.image_size}x{self.image_size}")
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        mean = vae.encode(images.to(self.device, dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (mean - shift) * float(vae.config.scaling_factor)

    def token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B, L) padded to the tokenizer's ``model_max_length`` L, as the pipeline does;
        a prompt longer than L is a :class:`PromptError` (never silently truncated)."""
        limit = int(self.tokenizer.model_max_length)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=False,
                             verbose=False).input_ids
        for prompt, row in zip(prompts, ids):
            if len(row) > limit:
                raise PromptError(f"prompt {prompt!r} is {len(row)} tokens long but the tokenizer takes at most "
                                  f"{limit} (with its start and end tokens); shorten it")
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> the text encoder's last hidden states, float32 (B, L, D) (diffusers' ``encode_prompt``)."""
        ids = self.token_ids(prompts).to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return self.text_encoder(ids, attention_mask=mask)[0].float()

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None,
                state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if condition is None:
            raise ValueError("a text-to-image model needs a condition (the prompt's text embedding)")
        kwargs = {"encoder_hidden_states": condition, "return_dict": False}
        if state is None:
            return self.denoiser(x_t, t, **kwargs)[0]
        return functional_call(self.denoiser, dict(state), (x_t, t), kwargs)[0]

    @torch.no_grad()
    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Latents (B, *input_shape) -> images (B, 3, H, W) in [-1, 1] through the VAE decoder."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = x0 / float(self.vae.config.scaling_factor) + shift
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(self.device, dtype), return_dict=False)[0].float().clamp(-1, 1)


# -- targets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidanceSettings:
    """How a target is generated: classifier-free guidance scale (<= 1: none, as diffusers) and
    DDIM steps (eta 0: deterministic)."""

    guidance_scale: float = 7.5
    steps: int = 50


class _Guided:
    """A task whose ``denoise`` applies classifier-free guidance as diffusers' pipeline does: the
    batch [uncond; cond] through the UNet, then u + g (c - u) on the raw predictions (linear,
    so right for epsilon and v alike). Only what ``generation.sample_latents`` reads."""

    def __init__(self, task: TextToImageTask, uncond: torch.Tensor, scale: float) -> None:
        self.task, self.uncond, self.scale = task, uncond, scale
        self.device, self.input_shape, self.scheduler = task.device, task.input_shape, task.scheduler
        self.num_train_timesteps = task.num_train_timesteps

    def denoise(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        if self.scale <= 1.0:
            return self.task.denoise(x, t, condition)
        both = torch.cat([self.uncond.expand(len(x), -1, -1), condition])
        uncond, cond = self.task.denoise(torch.cat([x, x]), t, both).chunk(2)
        return uncond + self.scale * (cond - uncond)


@dataclass
class TextToImageTarget:
    """An image to attribute with its prompt: ``latents`` (C, h, w) is x0 in the diffusion's space
    (the generated latents, or the VAE mean of an uploaded image, times the scaling factor);
    ``prompt_embedding`` (L, D) its condition; ``image`` (H, W, 3) uint8 what it looks like."""

    prompt: str
    latents: torch.Tensor
    prompt_embedding: torch.Tensor
    image: np.ndarray
    kind: str  # "generated" or "uploaded"
    model_hash: str
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None

    def inputs(self, sample_id: int) -> DiffusionInputs:
        """The diffusion inputs of this target (batch of one) with noise id ``sample_id``."""
        return DiffusionInputs(self.latents[None].float(), self.prompt_embedding[None].float(), [int(sample_id)])

    def info(self) -> dict:
        return {"prompt": self.prompt, "kind": self.kind, "model_hash": self.model_hash, "seed": self.seed,
                "guidance_scale": self.guidance_scale, "steps": self.steps}

    def files(self) -> list[tuple[str, bytes]]:
        """The record's files as (name, bytes), in writing order: ``target.safetensors`` (latents,
        prompt embedding, image), then ``target.json`` (the settings and the tensors' sha256),
        which marks the record complete. Deterministic: the same target gives the same bytes."""
        from safetensors.torch import save

        tensors = save({"latents": self.latents.detach().cpu().float().contiguous(),
                        "prompt_embedding": self.prompt_embedding.detach().cpu().float().contiguous(),
                        "image": torch.from_numpy(np.ascontiguousarray(self.image))})
        info = {**self.info(), "tensors_sha256": sha256_bytes(tensors)}
        # write_json_atomic's format, so a record read back and saved again is the same file
        return [(TARGET_TENSORS, tensors), (TARGET_JSON, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())]

    def save(self, folder: str | Path) -> Path:
        """Write :meth:`files` into ``folder``, each atomically, ``target.json`` last: a folder
        with the JSON is complete."""
        folder = Path(folder)
        for name, data in self.files():
            write_bytes_atomic(folder / name, data)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "TextToImageTarget":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / TARGET_JSON).is_file():
            raise FileNotFoundError(f"{folder} holds no finished target ({TARGET_JSON} missing)")
        info = json.loads((folder / TARGET_JSON).read_text())
        if sha256_file(folder / TARGET_TENSORS) != info.pop("tensors_sha256", None):
            raise ValueError(f"{folder / TARGET_TENSORS} does not match the checksum in {TARGET_JSON}; regenerate it")
        tensors = load_file(str(folder / TARGET_TENSORS))
        return cls(latents=tensors["latents"], prompt_embedding=tensors["prompt_embedding"],
                   image=tensors["image"].numpy(), **info)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    from dtrak_core.conventions import model_range_to_uint8

    return model_range_to_uint8(images.cpu())


@torch.no_grad()
def generate_target(task: TextToImageTask, prompt: str, seed: int,
                    settings: GuidanceSettings = GuidanceSettings()) -> TextToImageTarget:
    """Generate the image of (prompt, seed, guidance scale, steps) with DDIM (eta 0) and keep its
    latents and prompt embedding. The initial noise is ``torch.Generator().manual_seed(seed)``'s
    (1, *input_shape) draw, as ``generation.sample`` and diffusers' pipeline draw it on the CPU."""
    return generate_targets(task, prompt, [seed], settings)[0]


@torch.no_grad()
def generate_targets(task: TextToImageTask, prompt: str, seeds: Sequence[int],
                     settings: GuidanceSettings = GuidanceSettings()) -> list[TextToImageTarget]:
    """:func:`generate_target` for several seeds of one prompt, sampled as one batch (each seed's
    initial noise is its own generator's draw, so its image does not depend on the others but
    for float rounding). A prompt longer than the tokenizer allows is a :class:`PromptError`."""
    from dtrak_core.generation import SamplerConfig, sample_latents

    condition = task.encode_prompts([prompt])
    uncond = task.encode_prompts([""])
    guided = _Guided(task, uncond, float(settings.guidance_scale))
    latents = sample_latents(guided, [int(s) for s in seeds], SamplerConfig("ddim", settings.steps, 0.0),
                             condition.expand(len(seeds), -1, -1))
    images = _to_uint8(task.to_images(latents.to(task.device)))
    model_hash = task.content_hash()
    return [TextToImageTarget(prompt, latents[i].cpu(), condition[0].cpu(), images[i], "generated", model_hash,
                              int(seed), float(settings.guidance_scale), int(settings.steps))
            for i, seed in enumerate(seeds)]


@torch.no_grad()
def target_from_image(task: TextToImageTask, image: np.ndarray, prompt: str) -> TextToImageTarget:
    """An uploaded image (H, W, 3) uint8 of the pipeline's size with a typed prompt."""
    from dtrak_core.conventions import uint8_to_model_range

    pixels = uint8_to_model_range(np.asarray(image)[None])
    latents = task.encode_images(pixels)
    return TextToImageTarget(prompt, latents[0].cpu(), task.encode_prompts([prompt])[0].cpu(),
                             np.asarray(image, dtype=np.uint8), "uploaded", task.content_hash())


def target_features(featurizer, targets: Sequence[TextToImageTarget], first_id: int = 0) -> np.ndarray:
    """Features (m, k) of targets, with noise ids ``conventions.target_ids`` (never a training id)."""
    from dtrak_core.conventions import target_ids

    ids = target_ids(len(targets), first_id)
    return np.concatenate([featurizer.featurize_inputs(t.inputs(i)) for t, i in zip(targets, ids)])


__all__ = ["TextToImageTask", "TextToImageTarget", "GuidanceSettings", "PromptError", "CAPTION_COLUMN",
           "dataset_captions", "generate_target", "generate_targets", "target_from_image", "target_features",
           "tokenizer_hash"]
