"""Training Stable Diffusion models here: ``train-sd`` (a small one from scratch) and ``train-lora``.

Both follow ``training.train``'s rules: every draw of step s (batch rows, timesteps, noise,
caption dropout) comes from ``diffusion.generator(seed, ..., s)``, so a run resumed from its
``train_state.pt`` continues bit for bit. What happens on disk (the lock, the up-front space
check, the digest-checked state, the resume rule, kept checkpoints, the staged final write and
``train_complete.json`` last) is :mod:`dtrak_core.training_run`'s, as for ``train``: the
trainers are ``"sd"`` and ``"sd-lora"`` there (a folder of another trainer is refused), with the
fault points ``train.state``, ``train.checkpoint``, ``train.pipeline`` and ``train.marker``.

- :func:`train_sd`: an AutoencoderKL trained first (reconstruction + a small KL, ``vae_steps``),
  then its latent scale set to 1 / std of the training latents (as SD's 0.18215 was chosen),
  then a UNet2DConditionModel trained on the VAE means of the images (``steps``), with an EMA,
  conditioned on a CLIP text encoder (random and frozen unless ``text_learning_rate`` > 0: see
  the comment in :func:`_train_sd_steps`) and classifier-free guidance through caption dropout
  (the empty caption with probability ``caption_dropout``). The tokenizer is a CLIP BPE learned
  from the captions (:func:`build_caption_tokenizer`). The folder is a plain diffusers
  ``StableDiffusionPipeline`` (no safety checker). The run's step counts the VAE's steps first
  (its schedule: :func:`sd_learning_rate`), so it ends at ``vae_steps + steps``.
- :func:`train_lora`: a peft LoRA on the UNet's attention projections of any SD pipeline folder,
  written in diffusers' format (``pipeline.load_lora_weights(folder)`` loads it) with
  ``base_model.json`` naming the base (``dtrak_core.lora``); the adapter folder is the run's model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from dtrak_core.cli_options import add_field_option
from dtrak_core.datasets import ImageFolderDataset, load_image_folder
from dtrak_core.diffusion import generator
from dtrak_core.models import count_parameters, pipeline_files_hash
from dtrak_core.progress import progress_bar
from dtrak_core.tasks import load_task
from dtrak_core.tasks.base import ModelError
from dtrak_core.tasks.prediction import PREDICTION_TYPES
from dtrak_core.tasks.text_to_image import TextToImageTask, dataset_captions
from dtrak_core.training import batch_indices, learning_rate_at, select_training_rows, update_ema
from dtrak_core.training_run import Footprint, Resume, RunSpec, TrainingRun, machine_info, tensor_bytes

START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"


# -- the tokenizer -----------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character map, in its fixed order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def build_caption_tokenizer(captions: Sequence[str], max_length: int):
    """A ``CLIPTokenizer`` whose BPE merges are learned from ``captions`` until every caption word
    is one token (``tokenizers``' BPE trainer, deterministic), over CLIP's 256 byte characters (so
    any text still tokenizes, byte by byte). ``max_length`` includes the start and end tokens."""
    from tokenizers import pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import CLIPTokenizer

    if max_length < 3:
        raise ValueError(f"max_length {max_length} must be at least 3 (start, one token, end)")
    learner = CLIPTokenizer(model_max_length=max_length)
    trainer = BpeTrainer(vocab_size=1_000_000, min_frequency=0, show_progress=False, end_of_word_suffix="</w>",
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    learner.backend_tokenizer.train_from_iterator([str(c) for c in captions], trainer=trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(learner.backend_tokenizer.to_str())["model"]["merges"]]
    alphabet = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges), START_TOKEN, END_TOKEN]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """``save_pretrained`` plus ``vocab.json`` and ``merges.txt`` (what older CLIP loaders read)."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")


# -- architectures -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SdPreset:
    """A small Stable Diffusion: VAE, UNet2DConditionModel and CLIP text encoder sizes."""

    vae_channels: tuple[int, ...]
    unet_channels: tuple[int, ...]
    text_width: int
    text_layers: int
    text_heads: int
    attention_head_dim: int
    norm_groups: int
    latent_channels: int = 4

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    def build_vae(self, image_size: int, seed: int):
        from diffusers import AutoencoderKL

        torch.manual_seed(seed)
        n = len(self.vae_channels)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=self.latent_channels,
                             block_out_channels=self.vae_channels, layers_per_block=1,
                             down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             norm_num_groups=self.norm_groups, sample_size=image_size)

    def build_unet(self, latent_size: int, seed: int):
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        n = len(self.unet_channels)
        # Cross-attention at every level but the first (the largest maps): cheap, and enough.
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
        up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
        return UNet2DConditionModel(sample_size=latent_size, in_channels=self.latent_channels,
                                    out_channels=self.latent_channels, block_out_channels=self.unet_channels,
                                    layers_per_block=1, down_block_types=down, up_block_types=up,
                                    cross_attention_dim=self.text_width, attention_head_dim=self.attention_head_dim,
                                    norm_num_groups=self.norm_groups)

    def build_text_encoder(self, tokenizer, seed: int):
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(seed)
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=self.text_width,
                                intermediate_size=4 * self.text_width, num_attention_heads=self.text_heads,
                                num_hidden_layers=self.text_layers, max_position_embeddings=tokenizer.model_max_length,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        return CLIPTextModel(config)


SD_PRESETS: dict[str, SdPreset] = {
    # The embedded demo: 32 px -> 8x8x4 latents; a UNet of 3.8M parameters (0.4 s per step of
    # 32 on 2 busy CPU cores), a VAE of 1M, a text encoder of 0.4M + its vocabulary.
    "demo": SdPreset(vae_channels=(32, 64, 64), unet_channels=(48, 96, 96), text_width=128, text_layers=2,
                     text_heads=4, attention_head_dim=24, norm_groups=16),
    # For tests: 16 px -> 8x8x4 latents, tens of thousands of parameters.
    "tiny": SdPreset(vae_channels=(8, 16), unet_channels=(8, 16), text_width=16, text_layers=1, text_heads=2,
                     attention_head_dim=4, norm_groups=4),
}


def make_sd_scheduler(prediction_type: str = "epsilon"):
    """SD's schedule (T = 1000, "scaled_linear" betas 0.00085..0.012) in a DDIM scheduler, so
    the saved pipeline samples deterministically in few steps out of the box."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type)


# -- shared pieces -----------------------------------------------------------------------------
#: Settings that never change the weights: checkpointing, and the folder's own path (a moved run
#: folder resumes).
FREE_SETTINGS = frozenset({"checkpoint_every", "keep_checkpoints", "out_dir"})


def _run_spec(trainer: str, config_class: type, learning_rate: Callable[[Any, int], float],
              total_steps: Callable[[Mapping[str, Any]], int] | None = None) -> RunSpec:
    """A trainer as the run mechanics see it (as ``training._run_spec``): ``steps`` may change on
    resume only where ``learning_rate(config, step)`` of every step done stays the same."""
    specs = dataclasses.fields(config_class)
    return RunSpec(
        trainer=trainer, free_settings=FREE_SETTINGS, schedule_settings=frozenset({"steps"}),
        learning_rate=lambda config, step: learning_rate(config_class(**config), step), total_steps=total_steps,
        defaults={f.name: f.default for f in specs if f.default is not dataclasses.MISSING},
        flags={f.name: f.metadata["flags"][0] for f in specs})


def _load_captioned(data_dir: str, image_size: int, config) -> tuple[ImageFolderDataset, list[str]]:
    data = load_image_folder(data_dir, image_size=image_size, resize=True, split=config.split)
    data = select_training_rows(data, config)
    if len(data) == 0:
        raise ValueError(f"the training selection of {data_dir} is empty")
    return data, dataset_captions(data)


def _recipe(trainer: str, config, data: ImageFolderDataset, step: int, wall: float, losses: list[float],
            **extra) -> dict:
    """``recipe.json``: ``training``'s fields (config, data hash, training files, ...), plus
    ``trainer`` (the run's trainer name, as in its ``train_complete.json``) and ``extra``."""
    return {"trainer": trainer, "config": asdict(config), "data_hash": data.pixels_and_metadata_hash,
            "num_train_images": len(data), "train_files": data.metadata["file_name"].tolist(),
            "steps_done": step, "wall_seconds": round(wall, 1), "final_loss_ema": losses[-1] if losses else None,
            "machine": machine_info("cpu"), **extra}


def _diffusion_loss(task: TextToImageTask, x0: torch.Tensor, condition: torch.Tensor,
                    g: torch.Generator) -> torch.Tensor:
    """The training loss of one step: t and eps drawn from ``g``, the model's own target."""
    timesteps = torch.randint(0, task.num_train_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = task.schedule.add_noise_as_trained(x0, noise, timesteps)
    target = task.training_target(x0, noise, timesteps)
    return (task.denoise(x_t, timesteps, condition).float() - target).pow(2).mean()


def _dropped(g: torch.Generator, count: int, p: float) -> torch.Tensor:
    """Which rows get the empty caption (always drawn, so the stream does not depend on p)."""
    return torch.rand(count, generator=g) < p


def _losses_tensor(losses: list[float]) -> torch.Tensor:
    # float64: the recipe's final loss is then the same number after a resume.
    return torch.tensor(losses, dtype=torch.float64)


# -- train-lora --------------------------------------------------------------------------------
@dataclass
class LoraTrainConfig:
    """A LoRA fine-tune of a Stable Diffusion pipeline folder (recorded in ``recipe.json``).

    The data-selection fields (``split``, ``filter_column`` / ``filter_values``, ``subset``) mean
    what they mean in ``training.TrainConfig``, so LDS / counterfactual retrains can restrict them.
    """

    base_model: str = field(metadata={"flags": ("--base",), "help": "Stable Diffusion pipeline folder to adapt"})
    data_dir: str = field(metadata={"flags": ("--data",), "help": "captioned image folder (metadata.csv with 'text')"})
    out_dir: str = field(metadata={"flags": ("--out",), "help": "adapter folder to write (or resume)"})
    split: str | None = field(default="train", metadata={"flags": ("--split",), "help": "metadata split, or 'all'"})
    filter_column: str | None = field(default=None, metadata={
        "flags": ("--filter-column",), "help": "keep rows whose COLUMN is one of --filter-values"})
    filter_values: list[str] = field(default_factory=list, metadata={"flags": ("--filter-values",), "help": ""})
    subset: list[int] | None = field(default=None, metadata={
        "flags": ("--subset",), "help": "file of whitespace-separated indices into the selection"})
    rank: int = field(default=8, metadata={"flags": ("--rank",), "help": "LoRA rank r"})
    lora_alpha: float = field(default=8.0, metadata={"flags": ("--alpha",), "help": "LoRA alpha (scale alpha / r)"})
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={
        "flags": ("--target-modules",), "help": "UNet module names the LoRA adapts (default: the attention projections)"})
    steps: int = field(default=1000, metadata={"flags": ("--steps",), "help": "optimiser steps"})
    batch_size: int = field(default=16, metadata={"flags": ("--batch-size",), "help": "images per step"})
    learning_rate: float = field(default=1e-3, metadata={"flags": ("--lr",), "help": "peak learning rate"})
    warmup_steps: int = field(default=50, metadata={"flags": ("--warmup-steps",), "help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"flags": ("--weight-decay",), "help": "AdamW weight decay"})
    caption_dropout: float = field(default=0.0, metadata={
        "flags": ("--caption-dropout",), "help": "probability of training a row with the empty caption"})
    seed: int = field(default=0, metadata={"flags": ("--seed",), "help": "seeds the LoRA init, batches and noise"})
    checkpoint_every: int = field(default=100, metadata={
        "flags": ("--checkpoint-every",), "help": "steps between resumable checkpoints"})
    keep_checkpoints: bool = field(default=False, metadata={
        "flags": ("--keep-checkpoints",), "help": "keep the adapter of every checkpoint (for TracIn)"})

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one UNet module (e.g. to_q)")


def lora_learning_rate(config: LoraTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay over ``steps`` (``training.learning_rate_at``)."""
    return learning_rate_at(step, config)  # reads learning_rate, warmup_steps, steps only


def _lora_spec() -> RunSpec:
    return _run_spec("sd-lora", LoraTrainConfig, lora_learning_rate)


def _lora_footprint(lora_tensors: Mapping[str, torch.Tensor], config: LoraTrainConfig) -> Footprint:
    """Bytes the run writes: the state holds the LoRA weights and AdamW's two moments (3 copies,
    float32); the adapter and each kept checkpoint hold the weights once."""
    weights = tensor_bytes(lora_tensors)
    checkpoints = -(-config.steps // config.checkpoint_every) if config.keep_checkpoints else 0
    return Footprint(state_bytes=3 * weights, model_bytes=weights, checkpoint_bytes=weights, checkpoints=checkpoints)


def train_lora(config: LoraTrainConfig, progress: bool = True) -> Path:
    """Train (or resume) a LoRA of ``config.base_model`` and write the adapter folder ``config.out_dir``.

    The folder (the "model" of this run, written by ``TrainingRun.publish``):
    ``pytorch_lora_weights.safetensors`` (diffusers format), ``base_model.json`` (the base folder
    and its files hash), ``recipe.json``, then ``train_complete.json`` last; ``train_state.pt``
    for resuming; with ``keep_checkpoints``, ``checkpoints/step-N/`` holds the adapter of every
    checkpoint with its own ``base_model.json`` (each loads as a model, for TracIn). The base
    (VAE, text encoder, UNet) stays frozen, so the latents and text embeddings of the training
    set are computed once. Resume rules: :func:`dtrak_core.training_run.check_resume`.
    """
    from peft import LoraConfig

    from dtrak_core import lora

    config.validate()
    out_dir = Path(config.out_dir)
    base = load_task(config.base_model)
    if not isinstance(base, TextToImageTask) or base.has_adapter:
        raise ModelError(f"{config.base_model} is not a Stable Diffusion pipeline folder without an adapter; "
                         "train-lora adapts a base pipeline")
    data, captions = _load_captioned(config.data_dir, base.image_size, config)
    unet = base.denoiser
    torch.manual_seed(config.seed)  # the LoRA's initial A (B starts at zero)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
                                init_lora_weights=True), adapter_name=lora.ADAPTER_NAME)
    unet.requires_grad_(False)
    names = lora.lora_parameter_names(unet)
    if not names:
        raise ModelError(f"no module of the UNet of {config.base_model} is named {config.target_modules}")
    params = dict(unet.named_parameters())
    run = TrainingRun(out_dir, _lora_spec(), asdict(config))
    with run.open(_lora_footprint({n: params[n] for n in names}, config)):
        resume = run.begin()
        if resume.complete:
            return out_dir
        _train_lora_steps(run, resume, config, base, data, captions, names, progress)
    return out_dir


def _train_lora_steps(run: TrainingRun, resume: Resume, config: LoraTrainConfig, base: TextToImageTask,
                      data: ImageFolderDataset, captions: list[str], names: list[str], progress: bool) -> None:
    """Steps ``resume.step`` .. ``config.steps`` (state saved every ``checkpoint_every`` steps and
    at the end), then the adapter folder."""
    from dtrak_core import lora

    base_hash = pipeline_files_hash(config.base_model)
    with torch.no_grad():
        x_all = torch.cat([base.encode_images(data.to_tensor(range(i, min(i + 64, len(data)))))
                           for i in range(0, len(data), 64)])
        text_all = base.encode_prompts(captions)
        empty = base.encode_prompts([""])
    unet = base.denoiser
    params = dict(unet.named_parameters())
    trainable = [params[n].requires_grad_(True) for n in names]
    unet.train()
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    step, wall, losses = 0, 0.0, []
    if resume.payload is not None:
        state = resume.payload
        with torch.no_grad():
            for n in names:
                params[n].copy_(state["lora"][n])
        optimizer.load_state_dict(state["optimizer"])
        step, wall, losses = resume.step, float(state["wall_seconds"]), state["losses"].tolist()

    def write_adapter(folder: Path) -> None:
        """An adapter folder: the weights and ``base_model.json`` (the final one and each checkpoint)."""
        lora.save_adapter(unet, folder)
        lora.write_base(folder, config.base_model, base_hash)

    n = len(data)
    bar = progress_bar(total=config.steps, initial=step, desc="train-lora", disable=not progress, unit="step")
    started, loss_ema = time.time() - wall, (losses[-1] if losses else None)
    while step < config.steps:
        rows = batch_indices(step, n, config.batch_size, config.seed)
        g = generator(config.seed, "step", step)
        condition = text_all[rows]
        drop = _dropped(g, len(rows), config.caption_dropout)
        condition = torch.where(drop[:, None, None], empty.expand_as(condition), condition)
        loss = _diffusion_loss(base, x_all[rows], condition, g)
        for group in optimizer.param_groups:
            group["lr"] = lora_learning_rate(config, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        losses.append(loss_ema)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            wall = time.time() - started
            if config.keep_checkpoints:
                run.keep_checkpoint(step, write_adapter)
            run.save_state({"lora": {k: params[k].detach().clone() for k in names}, "optimizer": optimizer.state_dict(),
                            "step": torch.tensor(step), "wall_seconds": torch.tensor(wall),
                            "losses": _losses_tensor(losses)}, step)
    bar.close()
    # Also reached with no step taken: the state is complete and the adapter folder was not (a repair).
    run.publish(write_adapter, _recipe("sd-lora", config, data, step, wall, losses, base_hash=base_hash,
                                       lora_parameters=sum(params[k].numel() for k in names)), step)


# -- train-sd ----------------------------------------------------------------------------------
@dataclass
class SdTrainConfig:
    """A small Stable Diffusion trained from scratch on a captioned folder (recorded in ``recipe.json``)."""

    data_dir: str = field(metadata={"flags": ("--data",), "help": "captioned image folder (metadata.csv with 'text')"})
    out_dir: str = field(metadata={"flags": ("--out",), "help": "pipeline folder to write (or resume)"})
    preset: str = field(default="demo", metadata={"flags": ("--preset",), "help": "model sizes"})
    image_size: int = field(default=32, metadata={"flags": ("--image-size",), "help": "image side in pixels"})
    split: str | None = field(default="train", metadata={"flags": ("--split",), "help": "metadata split, or 'all'"})
    filter_column: str | None = field(default=None, metadata={
        "flags": ("--filter-column",), "help": "keep rows whose COLUMN is one of --filter-values"})
    filter_values: list[str] = field(default_factory=list, metadata={"flags": ("--filter-values",), "help": ""})
    subset: list[int] | None = field(default=None, metadata={
        "flags": ("--subset",), "help": "file of whitespace-separated indices into the selection"})
    vae_steps: int = field(default=2000, metadata={"flags": ("--vae-steps",), "help": "VAE steps (first stage)"})
    steps: int = field(default=10_000, metadata={"flags": ("--steps",), "help": "UNet + text encoder steps"})
    batch_size: int = field(default=32, metadata={"flags": ("--batch-size",), "help": "images per step"})
    vae_learning_rate: float = field(default=1e-3, metadata={"flags": ("--vae-lr",), "help": "VAE learning rate"})
    learning_rate: float = field(default=5e-4, metadata={"flags": ("--lr",), "help": "peak UNet learning rate"})
    text_learning_rate: float = field(default=0.0, metadata={
        "flags": ("--text-lr",), "help": "peak text-encoder learning rate; 0 keeps the random encoder frozen"})
    warmup_steps: int = field(default=500, metadata={"flags": ("--warmup-steps",), "help": "linear warm-up steps"})
    weight_decay: float = field(default=1e-6, metadata={"flags": ("--weight-decay",), "help": "AdamW weight decay"})
    ema_decay: float = field(default=0.999, metadata={"flags": ("--ema-decay",), "help": "EMA decay (UNet, text)"})
    kl_weight: float = field(default=1e-6, metadata={"flags": ("--kl-weight",), "help": "KL weight of the VAE loss"})
    caption_dropout: float = field(default=0.1, metadata={
        "flags": ("--caption-dropout",), "help": "empty-caption probability (classifier-free guidance)"})
    max_length: int = field(default=16, metadata={
        "flags": ("--max-length",), "help": "tokens per prompt, with start and end tokens"})
    prediction_type: str = field(default="epsilon", metadata={
        "flags": ("--prediction-type",), "help": "what the UNet predicts: epsilon or v_prediction"})
    seed: int = field(default=0, metadata={"flags": ("--seed",), "help": "seeds initialisation, batches and noise"})
    checkpoint_every: int = field(default=500, metadata={
        "flags": ("--checkpoint-every",), "help": "steps between resumable checkpoints"})

    def validate(self) -> None:
        if self.preset not in SD_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {sorted(SD_PRESETS)}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not epsilon or v_prediction")
        if self.text_learning_rate < 0 or self.learning_rate <= 0:
            raise ValueError(f"learning rates must be positive (text: >= 0), got {self.learning_rate}, "
                             f"{self.text_learning_rate}")
        for name in ("steps", "batch_size", "image_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vae_steps < 0:
            raise ValueError(f"vae_steps must be >= 0, got {self.vae_steps}")
        preset = SD_PRESETS[self.preset]
        unet_factor = 2 ** (len(preset.unet_channels) - 1)
        if self.image_size % (preset.vae_factor * unet_factor):
            raise ValueError(f"image_size {self.image_size} must be a multiple of {preset.vae_factor * unet_factor} "
                             f"for the {self.preset!r} preset")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def _vae_loss(vae, images: torch.Tensor, g: torch.Generator, kl_weight: float) -> torch.Tensor:
    posterior = vae.encode(images).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    reconstruction = vae.decode(z).sample
    return (reconstruction - images).pow(2).mean() + kl_weight * posterior.kl().mean()


@torch.no_grad()
def _latent_means(vae, images: torch.Tensor) -> torch.Tensor:
    was_training = vae.training
    vae.eval()
    means = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)])
    vae.train(was_training)
    return means


def sd_learning_rate(config: SdTrainConfig, step: int) -> float:
    """The learning rate of step ``step`` of a train-sd run, which counts the VAE's steps first:
    ``vae_learning_rate`` (constant) for steps 0 .. vae_steps-1, then the UNet's warm-up and
    cosine decay over ``steps`` (the text encoder's is this times ``text_learning_rate / learning_rate``)."""
    if step < config.vae_steps:
        return config.vae_learning_rate
    return learning_rate_at(step - config.vae_steps, config)  # reads learning_rate, warmup_steps, steps only


def _sd_spec() -> RunSpec:
    return _run_spec("sd", SdTrainConfig, sd_learning_rate,
                     total_steps=lambda config: int(config["vae_steps"]) + int(config["steps"]))


def _sd_footprint(task: TextToImageTask, config: SdTrainConfig) -> Footprint:
    """Bytes the run writes: the state holds the VAE with AdamW's two moments (3 copies), the UNet
    with its EMA and moments (4), the text encoder with its EMA (2; 4 when it trains), float32;
    the pipeline each model once (the tokenizer and configs fit in the small files' room)."""
    vae, unet, text = (tensor_bytes(m.state_dict()) for m in (task.vae, task.denoiser, task.text_encoder))
    text_copies = 4 if config.text_learning_rate > 0 else 2
    return Footprint(state_bytes=3 * vae + 4 * unet + text_copies * text, model_bytes=vae + unet + text)


def train_sd(config: SdTrainConfig, progress: bool = True) -> Path:
    """Train (or resume) a small Stable Diffusion and write the pipeline folder ``config.out_dir``.

    Steps 0 .. vae_steps-1 train the VAE, the next ``steps`` the UNet (and the text encoder when
    ``text_learning_rate`` > 0); the EMA weights are saved. The run's state is saved every
    ``checkpoint_every`` steps and at the end; the pipeline (tokenizer included) is written once,
    at the end, by ``TrainingRun.publish``, with ``train_complete.json`` last. The folder loads
    with ``StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)``.
    """
    config.validate()
    preset = SD_PRESETS[config.preset]
    out_dir = Path(config.out_dir)
    data, captions = _load_captioned(config.data_dir, config.image_size, config)
    tokenizer = build_caption_tokenizer(captions, config.max_length)
    scheduler = make_sd_scheduler(config.prediction_type)
    vae = preset.build_vae(config.image_size, config.seed).train()
    text_encoder = preset.build_text_encoder(tokenizer, config.seed + 1).train()
    unet = preset.build_unet(config.image_size // preset.vae_factor, config.seed + 2).train()
    task = TextToImageTask(unet, scheduler, vae, text_encoder, tokenizer)
    ids = task.token_ids(captions)  # PromptError for a caption longer than max_length, before any write
    run = TrainingRun(out_dir, _sd_spec(), asdict(config))
    with run.open(_sd_footprint(task, config)):
        resume = run.begin()
        if resume.complete:
            return out_dir
        _train_sd_steps(run, resume, config, data, task, ids, progress)
    return out_dir


def _unet_stage_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Enter the second stage: the VAE is final, so its latent scale is set (1 / std of the
    training latent means, in its config) and it is frozen; returns the scaled means."""
    means = _latent_means(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    vae.eval().requires_grad_(False)
    return means * float(vae.config.scaling_factor)


def _train_sd_steps(run: TrainingRun, resume: Resume, config: SdTrainConfig, data: ImageFolderDataset,
                    task: TextToImageTask, ids: torch.Tensor, progress: bool) -> None:
    """Steps ``resume.step`` .. vae_steps + steps, then the pipeline of the EMA weights."""
    vae, text_encoder, unet = task.vae, task.text_encoder, task.denoiser
    images = data.to_tensor()
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    empty_ids = task.token_ids([""])
    vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=config.weight_decay)
    # Frozen by default: trained jointly from scratch at this scale, the text encoder collapses every
    # caption onto nearly one embedding within a few steps (caption cosines 0.75 -> 0.95 after 6
    # steps at lr 1e-3, measured), while a random CLIP encoder keeps them apart (0.6-0.9).
    text_encoder.requires_grad_(config.text_learning_rate > 0)
    groups = [{"params": list(unet.parameters()), "scale": 1.0}]
    if config.text_learning_rate > 0:
        groups.append({"params": list(text_encoder.parameters()),
                       "scale": config.text_learning_rate / config.learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.95, 0.999),
                                  weight_decay=config.weight_decay)
    step, wall, losses = 0, 0.0, []
    if resume.payload is not None:
        state = resume.payload
        for module, key in ((vae, "vae"), (unet, "unet"), (text_encoder, "text_encoder"), (ema_unet, "ema_unet"),
                            (ema_text, "ema_text"), (vae_optimizer, "vae_optimizer"), (optimizer, "optimizer")):
            module.load_state_dict(state[key])
        step, wall, losses = resume.step, float(state["wall_seconds"]), state["losses"].tolist()

    total = config.vae_steps + config.steps
    latents = None
    bar = progress_bar(total=total, initial=step, desc="train-sd", disable=not progress, unit="step")
    started, loss_ema = time.time() - wall, (losses[-1] if losses else None)
    while step < total:
        g = generator(config.seed, "step", step)
        if step < config.vae_steps:
            rows = batch_indices(step, len(data), config.batch_size, config.seed)
            loss = _vae_loss(vae, images[rows], g, config.kl_weight)
            for group in vae_optimizer.param_groups:
                group["lr"] = sd_learning_rate(config, step)
            vae_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            vae_optimizer.step()
        else:
            if latents is None:
                latents = _unet_stage_latents(vae, images)
            s = step - config.vae_steps
            rows = batch_indices(s, len(data), config.batch_size, config.seed)
            drop = _dropped(g, len(rows), config.caption_dropout)
            batch_ids = torch.where(drop[:, None], empty_ids.expand(len(rows), -1), ids[rows])
            condition = text_encoder(batch_ids)[0]
            loss = _diffusion_loss(task, latents[rows], condition, g)
            for group in optimizer.param_groups:
                group["lr"] = sd_learning_rate(config, step) * group["scale"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update_ema(ema_unet, unet, config.ema_decay, s)
            if config.text_learning_rate > 0:
                update_ema(ema_text, text_encoder, config.ema_decay, s)
        step += 1
        fresh_stage = loss_ema is None or step == config.vae_steps + 1  # the UNet's loss is not the VAE's
        loss_ema = loss.item() if fresh_stage else 0.98 * loss_ema + 0.02 * loss.item()
        losses.append(loss_ema)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}", stage="vae" if step <= config.vae_steps else "unet")
        if step % config.checkpoint_every == 0 or step == total:
            wall = time.time() - started
            run.save_state({"vae": vae.state_dict(), "unet": unet.state_dict(),
                            "text_encoder": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                            "ema_text": ema_text.state_dict(),
                            "vae_optimizer": vae_optimizer.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": torch.tensor(step), "wall_seconds": torch.tensor(wall),
                            "losses": _losses_tensor(losses)}, step)
    bar.close()
    if latents is None:  # a repair (no step left to train): the VAE's scale is still the run's to set
        _unet_stage_latents(vae, images)
    final = TextToImageTask(ema_unet, task.scheduler, vae, ema_text, task.tokenizer)
    recipe = _recipe("sd", config, data, step, wall, losses, scaling_factor=float(vae.config.scaling_factor),
                     parameters={"unet": count_parameters(unet), "vae": count_parameters(vae),
                                 "text_encoder": count_parameters(text_encoder)})
    run.publish(lambda staging: _save_pipeline(final, staging), recipe, step)


def _save_pipeline(task: TextToImageTask, folder: Path) -> None:
    """The pipeline (``save_pretrained``) with the tokenizer's ``vocab.json`` and ``merges.txt`` too."""
    task.save(folder)
    save_tokenizer(task.tokenizer, folder / "tokenizer")


# -- command line ------------------------------------------------------------------------------
def _option_kwargs(spec: dataclasses.Field) -> dict:
    special = {"filter_values": {"nargs": "*"}, "target_modules": {"nargs": "+"},
               "keep_checkpoints": {"action": "store_true"}, "preset": {"choices": sorted(SD_PRESETS)},
               "prediction_type": {"choices": [p for p in PREDICTION_TYPES.names() if p != "sample"]}}
    if spec.name in special:
        return special[spec.name]
    if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
        return {"required": True, "default": None}
    return {"type": {"int": int, "float": float}[spec.type]} if spec.type in ("int", "float") else {}


def _add_config_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    for spec in dataclasses.fields(config_class):
        add_field_option(parser, config_class, spec.name, *spec.metadata["flags"],
                         dest=spec.name, **_option_kwargs(spec))


def _config_from_args(config_class: type, args: argparse.Namespace):
    values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(config_class)}
    values["split"] = None if values["split"] == "all" else values["split"]
    if values.get("subset"):
        values["subset"] = [int(x) for x in Path(values["subset"]).read_text().split()]
    return config_class(**values)


def add_subcommands(sub) -> None:
    """Register ``train-sd`` and ``train-lora`` on the CLI's sub-parser group."""
    p = sub.add_parser("train-sd", help="train (or resume) a small Stable Diffusion on a captioned folder")
    _add_config_options(p, SdTrainConfig)
    p.set_defaults(func=lambda args: print(f"wrote {train_sd(_config_from_args(SdTrainConfig, args))}"))
    p = sub.add_parser("train-lora", help="train (or resume) a LoRA of a Stable Diffusion pipeline")
    _add_config_options(p, LoraTrainConfig)
    p.set_defaults(func=lambda args: print(f"wrote {train_lora(_config_from_args(LoraTrainConfig, args))}"))
