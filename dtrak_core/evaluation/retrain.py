"""Retraining a model with its own recipe: what the LDS build and the counterfactual check share.

Both retrain the full model's recipe (``recipe.json``, read by
:func:`dtrak_core.training.read_recipe_config`) with one change:

- :func:`subset_train_config`: on a subset of its training images (an LDS subset, or the
  images a counterfactual removal keeps), with the **same-epochs rule**: a subset of n_S of the
  n images trains for round(steps * n_S / n) steps and warms up for round(warmup * n_S / n), so
  every image is seen as often as in the full run and the learning-rate schedule has the same
  shape per epoch (batch size and learning rate unchanged);
- :func:`full_data_train_config`: on all of them with another seed (the LDS ensemble).

:func:`retrain` trains such a config into its folder (resuming a checkpoint) and returns the
weights hash. Training is deterministic on CPU, so a retrain reproduces its weights bit for bit.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

# The module, not its functions: tests patch ``training.train`` to watch what is retrained.
import dtrak_core.training as training
from dtrak_core.io import hold_lock
from dtrak_core.models import pipeline_files_hash
from dtrak_core.training import TrainConfig

#: "epochs": steps and warm-up scale with the subset size; "steps": the recipe's steps unchanged.
STEPS_RULES = ("epochs", "steps")
#: Checkpoint interval of retrains (at most their number of steps): a killed retrain loses less.
DEFAULT_CHECKPOINT_EVERY = 100
#: Disk a retrain takes, in copies of the model's weights file: the EMA pipeline, the training
#: state (weights, EMA weights, Adam's two moments) and one more while a file is being replaced.
RETRAIN_WEIGHT_COPIES = 6


def check_steps_rule(steps_rule: str) -> str:
    """``steps_rule`` if it is one of :data:`STEPS_RULES`, else a ``ValueError``."""
    if steps_rule not in STEPS_RULES:
        raise ValueError(f"steps rule {steps_rule!r} is not one of {list(STEPS_RULES)}")
    return steps_rule


def subset_train_config(base: dict, indices: Sequence[int], seed: int, out_dir: str | Path,
                        steps_rule: str = "epochs",
                        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> TrainConfig:
    """The full model's ``TrainConfig`` (``base``: its recipe's config) restricted to ``indices``
    (into its training set, so they compose with a recipe that itself trained on a subset).

    steps_rule "epochs": steps = max(1, round(steps * n_S / n)), warm-up = round(warmup * n_S / n)
    (same number of passes over the data); "steps": the recipe's steps unchanged. Checkpoints
    every ``min(checkpoint_every, steps)`` steps, none kept.
    """
    config = TrainConfig(**base)
    check_steps_rule(steps_rule)
    n_full = None
    if config.subset is not None:
        n_full = len(config.subset)
        subset = [int(config.subset[i]) for i in indices]
    else:
        subset = [int(i) for i in indices]
    if not subset:
        raise ValueError("a training subset must hold at least one image")
    steps, warmup = config.steps, config.warmup_steps
    if steps_rule == "epochs":
        n_full = n_full or len(training.load_training_data(replace(config, subset=None)))
        ratio = len(subset) / n_full
        steps = max(1, int(round(config.steps * ratio)))
        warmup = int(round(config.warmup_steps * ratio))
    return replace(config, subset=subset, seed=int(seed), out_dir=str(out_dir), steps=steps,
                   warmup_steps=warmup, checkpoint_every=min(checkpoint_every, steps),
                   keep_checkpoints=False)


def full_data_train_config(base: dict, seed: int, out_dir: str | Path,
                           checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY) -> TrainConfig:
    """The full model's ``TrainConfig`` with another ``seed``, trained into ``out_dir``: an
    ensemble member (same data, steps and schedule; checkpoints every
    ``min(checkpoint_every, steps)`` steps, none kept)."""
    config = TrainConfig(**base)
    return replace(config, seed=int(seed), out_dir=str(out_dir),
                   checkpoint_every=min(checkpoint_every, config.steps), keep_checkpoints=False)


def retrain_bytes(model_dir: str | Path) -> int:
    """Bytes a retrain of the model in ``model_dir`` writes at most: ``RETRAIN_WEIGHT_COPIES`` x
    its weights file (the up-front free-space check of the LDS build and the counterfactual check)."""
    return RETRAIN_WEIGHT_COPIES * (Path(model_dir) / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size


@dataclass(frozen=True)
class Retrained:
    """A finished retrain: its pipeline folder, the hash of its files and the wall time of this call."""

    model_dir: Path
    files_hash: str
    seconds: float


def retrain(config: TrainConfig, progress: bool = True, lock: Path | None = None) -> Retrained:
    """Train ``config`` into ``config.out_dir`` (resuming its checkpoint; a finished folder
    returns at once) and hash the weights.

    lock: a lock file held while training, for retrains several workers may ask for at once
    (the second waits, then finds the model trained); ``seconds`` includes that wait.
    """
    started = time.time()
    with hold_lock(lock) if lock is not None else nullcontext():
        training.train(config, progress=progress)
    seconds = time.time() - started
    return Retrained(Path(config.out_dir), pipeline_files_hash(config.out_dir), seconds)
