"""Training of an unconditional DDPM (diffusers UNet2DModel + DDPMScheduler) on an image folder.

Deterministic given its seed: the batch indices, timesteps and noise of step s are drawn from
generators seeded by (seed, s), so a run that resumes from a checkpoint continues exactly as if
it had never stopped, and LDS / counterfactual retrains are reproducible.

Optimiser: AdamW (betas 0.95, 0.999, as the D-TRAK recipe), linear warm-up then cosine decay,
an EMA of the weights (the EMA weights are what the pipeline folder holds and what samples use).

What happens on disk (the lock, the up-front space check, the state, the resume rule, the
checkpoints, the atomic final write and its marker) is :mod:`dtrak_core.training_run`'s.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch
from diffusers import UNet2DModel

from dtrak_core import paths, training_run
from dtrak_core.datasets import ImageFolderDataset, load_image_folder
from dtrak_core.datasets.imagefolder import DatasetError
from dtrak_core.diffusion import diffusion_loss, generator
from dtrak_core.models import RECIPE_FILE, UNET_PRESETS, count_parameters, make_scheduler
from dtrak_core.progress import progress_bar
from dtrak_core.tasks import Batch, UnconditionalPixelTask, load_task
from dtrak_core.tasks.prediction import PREDICTION_TYPES
from dtrak_core.training_run import Footprint, Resume, RunSpec, TrainingRun, machine_info, tensor_bytes

#: A run's state file (callers, e.g. the LDS tests, find it by this module's name).
STATE_FILE = training_run.STATE_FILE


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in ``recipe.json``).

    ``subset`` holds indices into the dataset as selected by ``split`` and ``filter_column`` /
    ``filter_values``; None keeps all of it.
    """

    # metadata: the command line's flags and help (``cli_options`` builds the options from them).
    data_dir: str = field(metadata={"flags": ("--data",), "help": "image folder (default: the cache's emoji3/)"})
    out_dir: str = field(metadata={"flags": ("--out",), "help": "pipeline folder to write (or resume)"})
    preset: str = field(default="demo", metadata={"flags": ("--preset",), "help": "UNet preset"})
    image_size: int = field(default=32, metadata={"flags": ("--image-size",), "help": "image side in pixels"})
    split: str | None = field(default="train", metadata={
        "flags": ("--split",), "help": "metadata split to train on, or 'all'"})
    filter_column: str | None = field(default=None, metadata={
        "flags": ("--filter-column",), "help": "keep rows whose COLUMN is one of --filter-values"})
    filter_values: list[str] = field(default_factory=list, metadata={"flags": ("--filter-values",), "help": ""})
    subset: list[int] | None = field(default=None, metadata={
        "flags": ("--subset",), "help": "file of whitespace-separated indices into the selection"})
    steps: int = field(default=10_000, metadata={"flags": ("--steps",), "help": "optimiser steps"})
    batch_size: int = field(default=32, metadata={"flags": ("--batch-size",), "help": "images per step"})
    learning_rate: float = field(default=1e-3, metadata={"flags": ("--lr",), "help": "peak learning rate"})
    warmup_steps: int = field(default=500, metadata={"flags": ("--warmup-steps",), "help": "linear warm-up steps"})
    weight_decay: float = field(default=1e-6, metadata={"flags": ("--weight-decay",), "help": "AdamW weight decay"})
    ema_decay: float = field(default=0.999, metadata={"flags": ("--ema-decay",), "help": "EMA decay of the weights"})
    seed: int = field(default=0, metadata={"flags": ("--seed",), "help": "seeds initialisation, batches and noise"})
    checkpoint_every: int = field(default=500, metadata={
        "flags": ("--checkpoint-every",), "help": "steps between resumable checkpoints"})
    keep_checkpoints: bool = field(default=False, metadata={
        "flags": ("--keep-checkpoints",), "help": "keep the raw weights of every checkpoint (for TracIn)"})
    prediction_type: str = field(default="epsilon", metadata={
        "flags": ("--prediction-type",), "help": "what the UNet predicts: epsilon, v_prediction or sample"})

    def validate(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES.names()}")
        if self.preset not in UNET_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {sorted(UNET_PRESETS)}")
        for name in ("steps", "batch_size", "image_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def load_training_data(config: TrainConfig) -> ImageFolderDataset:
    """The training images the config selects (split, filter, then subset)."""
    dataset = load_image_folder(config.data_dir, image_size=config.image_size, resize=True,
                                split=config.split)
    dataset = select_training_rows(dataset, config)
    if len(dataset) == 0:
        raise ValueError(f"the training selection of {config.data_dir} is empty")
    return dataset


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``learning_rate`` over ``warmup_steps``, then cosine decay to 0."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of step ``step``: epochs are seeded permutations, cut into equal batches."""
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    epoch, position = divmod(step, per_epoch)
    permutation = torch.randperm(n, generator=generator(seed, "epoch", epoch))
    return permutation[position * batch_size:(position + 1) * batch_size]


@torch.no_grad()
def update_ema(ema: UNet2DModel, model: UNet2DModel, decay: float, step: int) -> None:
    # The usual warm-up of the decay: early EMA weights would otherwise be mostly the init.
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - d)


def _recipe(config: TrainConfig, data: ImageFolderDataset, model: UNet2DModel, step: int,
            wall_seconds: float, losses: list[float]) -> dict:
    return {
        "config": asdict(config),
        "data_hash": data.pixels_and_metadata_hash,
        "num_train_images": len(data),
        "train_files": data.metadata["file_name"].tolist(),
        "parameters": count_parameters(model),
        "steps_done": step,
        "wall_seconds": round(wall_seconds, 1),
        "final_loss_ema": losses[-1] if losses else None,
        "machine": machine_info("cpu"),
    }


def _run_spec() -> RunSpec:
    """This trainer, as the run mechanics see it: checkpointing and the folder's own path never
    change the weights (a moved run folder resumes); a changed ``steps`` is accepted only where
    the learning rate of the steps done is unchanged."""
    specs = fields(TrainConfig)
    return RunSpec(
        trainer="ddpm-pixel",
        free_settings=frozenset({"checkpoint_every", "keep_checkpoints", "out_dir"}),
        schedule_settings=frozenset({"steps"}),
        learning_rate=lambda config, step: learning_rate_at(step, TrainConfig(**config)),
        defaults={f.name: f.default for f in specs if f.default is not MISSING},
        flags={f.name: f.metadata["flags"][0] for f in specs})


def _footprint(model: UNet2DModel, config: TrainConfig) -> Footprint:
    """Bytes the run writes: the state holds the weights, their EMA and AdamW's two moments
    (4 copies, float32), the pipeline the EMA weights, each kept checkpoint half of them (float16)."""
    weights = tensor_bytes(model.state_dict())
    checkpoints = -(-config.steps // config.checkpoint_every) if config.keep_checkpoints else 0
    return Footprint(state_bytes=4 * weights, model_bytes=weights, checkpoint_bytes=weights // 2,
                     checkpoints=checkpoints)


def train(config: TrainConfig, progress: bool = True) -> Path:
    """Train (or resume) and write the pipeline folder ``config.out_dir``; returns it.

    The folder holds the EMA weights, ``recipe.json``, ``train_complete.json`` (written last)
    and ``train_state.pt`` (for resuming); with ``keep_checkpoints`` also ``checkpoints/step-N/``
    (raw weights in float16, for TracIn). A rerun continues a killed run, repairs a half-written
    pipeline from the state, and returns at once when the folder is complete. ``checkpoint_every``
    and ``keep_checkpoints`` may change when resuming; ``steps`` only while the learning rate of
    the steps already done stays the same (see :func:`dtrak_core.training_run.check_resume`).
    """
    config.validate()
    out_dir = Path(config.out_dir)
    data = load_training_data(config)
    x_all = data.to_tensor()
    scheduler = make_scheduler(config.prediction_type)
    model = UNET_PRESETS[config.preset].build(config.image_size, seed=config.seed).train()
    run = TrainingRun(out_dir, _run_spec(), asdict(config))
    with run.open(_footprint(model, config)):
        resume = run.begin()
        if resume.complete:
            return out_dir
        _train_steps(run, resume, config, data, x_all, model, scheduler, progress)
    return out_dir


def _train_steps(run: TrainingRun, resume: Resume, config: TrainConfig, data: ImageFolderDataset, x_all: torch.Tensor,
                 model: UNet2DModel, scheduler, progress: bool) -> None:
    """Steps ``resume.step`` .. ``config.steps`` (state saved every ``checkpoint_every`` steps and
    at the end), then the finished pipeline of the EMA weights."""
    task = UnconditionalPixelTask(model, scheduler)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.95, 0.999),
                                  weight_decay=config.weight_decay)
    step, wall_seconds, losses = 0, 0.0, []
    if resume.payload is not None:
        state = resume.payload
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, wall_seconds = resume.step, float(state["wall_seconds"])
        losses = state["losses"].tolist()

    n, T = len(data), task.num_train_timesteps
    bar = progress_bar(total=config.steps, initial=step, desc="train", disable=not progress, unit="step")
    started, loss_ema = time.time() - wall_seconds, (losses[-1] if losses else None)
    while step < config.steps:
        rows = batch_indices(step, n, config.batch_size, config.seed)
        g = generator(config.seed, "step", step)
        inputs = task.prepare(Batch(x_all[rows], rows.tolist()))
        timesteps = torch.randint(0, T, (len(rows),), generator=g)
        noise = torch.randn(inputs.x0.shape, generator=g)
        x_t = task.schedule.add_noise_as_trained(inputs.x0, noise, timesteps)
        target = task.training_target(inputs.x0, noise, timesteps)
        loss = (task.denoise(x_t, timesteps, inputs.condition) - target).pow(2).mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, config.ema_decay, step)
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        losses.append(loss_ema)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            wall_seconds = time.time() - started
            if config.keep_checkpoints:
                run.keep_checkpoint(step, lambda folder: _save_half(model, folder))
            # float64 losses: the recipe's final loss is then the same number after a resume.
            run.save_state({"model": model.state_dict(), "ema": ema.state_dict(),
                            "optimizer": optimizer.state_dict(), "step": torch.tensor(step),
                            "wall_seconds": torch.tensor(wall_seconds),
                            "losses": torch.tensor(losses, dtype=torch.float64)}, step)
    bar.close()
    # Also reached with no step taken: the state is complete and the pipeline was not (a repair).
    run.publish(UnconditionalPixelTask(ema, scheduler).save, _recipe(config, data, model, step, wall_seconds, losses),
                step)


def _save_half(model: UNet2DModel, folder: Path) -> None:
    """Save the raw (not EMA) weights in float16: TracIn needs their gradients, not exact bits,
    and half the size keeps the committed checkpoints of the demo model small."""
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(folder, safe_serialization=True)


@contextlib.contextmanager
def untrained_copy(model_dir: str | Path) -> Iterator[Path]:
    """A temporary pipeline folder with the same denoiser config, freshly initialised (seed 0)."""
    task = load_task(model_dir)
    torch.manual_seed(0)
    fresh = task.with_denoiser(type(task.denoiser).from_config(task.denoiser.config))
    with tempfile.TemporaryDirectory() as tmp:
        fresh.save(tmp)
        yield Path(tmp)


def held_out_loss(model_dir: str | Path, data: ImageFolderDataset, seed: int = 0,
                  num_timesteps: int = 100) -> float:
    """Mean diffusion loss (in epsilon space, whatever the model predicts) of a model on ``data``
    over ``num_timesteps`` uniform t of the model's own T, with fixed noise."""
    task = load_task(model_dir)
    T = task.num_train_timesteps
    if not 1 <= num_timesteps <= T:
        raise ValueError(f"num_timesteps {num_timesteps} must be between 1 and T={T} of {model_dir}")
    timesteps = list(range(0, T, T // num_timesteps))
    inputs = task.prepare(Batch(data.to_tensor(), list(range(len(data)))))
    return float(diffusion_loss(task, inputs, timesteps, seed).mean())


def select_training_rows(dataset: ImageFolderDataset,
                         config: TrainConfig | Mapping[str, object]) -> ImageFolderDataset:
    """The rows of ``dataset`` (one split, as loaded) that a training config selects.

    First ``filter_column`` / ``filter_values`` (rows whose column is one of the values), then
    ``subset`` (indices into the filtered rows, in that order). ``config`` is a
    :class:`TrainConfig` or the ``config`` dict of a ``recipe.json``; the split is the loader's
    job. Row i of the result is training image i (its noise id).
    """
    def setting(name: str):
        return config.get(name) if isinstance(config, Mapping) else getattr(config, name)

    column, subset = setting("filter_column"), setting("subset")
    if column:
        dataset = dataset.subset(dataset.where(str(column), list(setting("filter_values") or [])))
    if subset is not None:
        dataset = dataset.subset(list(subset))
    return dataset


def resolve_data_dir(recorded: str, model_dir: str | Path) -> Path:
    """The recipe's data folder, or where it most likely is now (the repository moved).

    A recipe records the folder the trainer read, often as an absolute path on the machine that
    trained. When that path does not exist here we try it relative to the repository root and
    to the model folder, then a folder of the same name in the cache (the embedded datasets
    live there). ``paths`` is read at call time so a changed cache folder is honoured.
    """
    model_dir = Path(model_dir)
    path = Path(recorded)
    candidates = [path] if path.is_absolute() else [paths.REPO_ROOT / path, model_dir / path]
    candidates.append(paths.cache_dir() / path.name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"the training data folder {recorded} recorded in {model_dir / RECIPE_FILE} does not "
                       f"exist (also looked for {', '.join(str(c) for c in candidates[1:])}); "
                       "register the model with its data folder")


def read_recipe(model_dir: str | Path) -> dict | None:
    """The model folder's ``recipe.json`` as a dict, or None when the folder has none."""
    path = Path(model_dir) / RECIPE_FILE
    if not path.exists():
        return None
    try:
        recipe = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("config"), dict):
        raise DatasetError(f"{path} has no 'config' object; expected the recipe our trainer writes")
    return recipe


def read_recipe_config(model_dir: str | Path) -> dict:
    """The model folder's ``recipe.json`` (see :func:`read_recipe`), or a clear error when it has
    none: retraining a model (LDS, counterfactual) needs the recipe it was trained with."""
    recipe = read_recipe(model_dir)
    if recipe is None:
        raise ValueError(f"{model_dir} has no {RECIPE_FILE}; retraining (LDS, counterfactual) needs the recipe the "
                         "model was trained with")
    return recipe
