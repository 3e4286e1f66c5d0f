"""Retraining a model with its own recipe: what the LDS build and the counterfactual check share.

Both retrain the full model's recipe (``recipe.json``, read by :func:`read_retrain_recipe`) with
one change:

- :func:`subset_train_config`: on a subset of its training images (an LDS subset, or the
  images a counterfactual removal keeps), with the **same-epochs rule**: a subset of n_S of the
  n images trains for round(steps * n_S / n) steps and warms up for round(warmup * n_S / n), so
  every image is seen as often as in the full run and the learning-rate schedule has the same
  shape per epoch (batch size and learning rate unchanged);
- :func:`full_data_train_config`: on all of them with another seed (the LDS ensemble).

:func:`retrain` trains such a config into its folder (resuming a checkpoint) and returns the
folder's files hash (``models.pipeline_files_hash``). Training is deterministic on CPU, so a
retrain reproduces its weights bit for bit.

**Which trainer.** The recipe's ``trainer`` names the command that trained the model, and
:data:`RETRAINERS` holds how each one is replayed (its config class, its training function, how
many images its selection holds, where its weights are):

- ``ddpm-pixel`` (also a recipe without ``trainer``: every DDPM recipe so far): ``training.train``
  on a ``TrainConfig``; the retrained model is a ``DDPMPipeline`` folder;
- ``sd-lora`` (``train-lora``): ``training_sd.train_lora`` on a ``LoraTrainConfig`` (it has the
  same ``subset``, ``seed``, ``steps``, ``warmup_steps`` and ``checkpoint_every`` fields); the
  retrained model is an adapter folder over the **same base pipeline**, whose files hash must
  still be the recipe's ``base_hash`` (:func:`read_retrain_recipe` refuses it otherwise: the
  retrains would adapt another model);
- ``sd`` (``train-sd``, a whole Stable Diffusion from scratch) is refused in one line: retraining
  its VAE, text encoder and UNet per subset is what LoRA fine-tunes make unnecessary.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

# The modules, not their functions: tests patch ``training.train`` (and ``training_sd.train_lora``)
# to watch what is retrained.
import dtrak_core.training as training
from dtrak_core.io import hold_lock
from dtrak_core.models import RECIPE_FILE, pipeline_files_hash
from dtrak_core.plugins import Registry
from dtrak_core.training import TrainConfig

#: "epochs": steps and warm-up scale with the subset size; "steps": the recipe's steps unchanged.
STEPS_RULES = ("epochs", "steps")
#: Checkpoint interval of retrains (at most their number of steps): a killed retrain loses less.
DEFAULT_CHECKPOINT_EVERY = 100
#: Disk a retrain takes, in copies of the model's weights file: the EMA pipeline, the training
#: state (weights, EMA weights, Adam's two moments) and one more while a file is being replaced.
RETRAIN_WEIGHT_COPIES = 6
#: The trainer of a recipe without a ``trainer`` field (every DDPM recipe written before it existed).
DEFAULT_TRAINER = "ddpm-pixel"
#: Trainers whose models are not retrained, with the reason (said in one line).
REFUSED_TRAINERS = {
    "sd": "it is a whole Stable Diffusion trained from scratch by train-sd, and retraining its VAE, text encoder "
          "and UNet for every subset is not supported; evaluate a LoRA of it (train-lora) instead",
}


@dataclass(frozen=True)
class Retrainer:
    """How the models of one trainer are retrained.

    Attributes:
        name: the recipe's ``trainer`` value.
        config_class: () -> the trainer's config dataclass (the recipe's ``config`` holds its
            fields); a function, so ``training_sd`` (the SD stack) is imported only when used.
        train: (config, progress) -> the finished model folder; resumes a checkpoint.
        selection_size: config -> images its selection holds without ``subset`` (the "epochs" rule's n).
        weights_file: model folder -> the file whose size bounds a retrain's disk use.
        check: (recipe, model folder) -> None, or a one-line ``ValueError`` when the recipe
            cannot be replayed here.
    """

    name: str
    config_class: Callable[[], type]
    train: Callable[[Any, bool], Path]
    selection_size: Callable[[Any], int]
    weights_file: Callable[[Path], Path]
    check: Callable[[dict, Path], None] = lambda recipe, model_dir: None

    def make_config(self, values: dict):
        """The config dataclass of the recipe's ``config`` dict."""
        return self.config_class()(**values)


#: recipe ``trainer`` -> :class:`Retrainer`.
RETRAINERS: Registry[Retrainer] = Registry("retrainable trainer")


def _register(retrainer: Retrainer) -> Retrainer:
    return RETRAINERS.register(retrainer.name)(retrainer)


_register(Retrainer(
    name=DEFAULT_TRAINER, config_class=lambda: TrainConfig,
    train=lambda config, progress: training.train(config, progress=progress),
    selection_size=lambda config: len(training.load_training_data(replace(config, subset=None))),
    weights_file=lambda model_dir: model_dir / "unet" / "diffusion_pytorch_model.safetensors"))


def _lora_config_class() -> type:
    from dtrak_core.training_sd import LoraTrainConfig

    return LoraTrainConfig


def _lora_train(config, progress: bool) -> Path:
    import dtrak_core.training_sd as training_sd

    return training_sd.train_lora(config, progress=progress)


def _lora_selection_size(config) -> int:
    """Rows of the config's split and filter (counted: images of any size are fine here)."""
    from dtrak_core.datasets import load_image_folder

    data = load_image_folder(config.data_dir, split=config.split, label_column=None)
    return len(training.select_training_rows(data, replace(config, subset=None)))


def _lora_weights_file(model_dir: Path) -> Path:
    from dtrak_core.lora import find_adapter

    return find_adapter(model_dir).weights


def check_lora_base(recipe: dict, model_dir: Path) -> None:
    """The recipe's base pipeline (``config.base_model``) must exist and have the files hash the
    recipe records (``base_hash``): retrains adapt that base, or their numbers mean nothing."""
    base = Path(recipe["config"]["base_model"])
    recorded = recipe.get("base_hash")
    where = Path(model_dir) / RECIPE_FILE
    if not (base / "model_index.json").is_file():
        raise ValueError(f"{where}: its base pipeline {base} is not a pipeline folder (no model_index.json); "
                         "retraining the LoRA needs the base it was trained on")
    if recorded is None:
        raise ValueError(f"{where} records no base_hash, so its base pipeline {base} cannot be checked; "
                         "train the LoRA again with train-lora to record it")
    now = pipeline_files_hash(base)
    if now != recorded:
        raise ValueError(f"{where}: the base pipeline {base} has changed since the LoRA was trained (files hash "
                         f"{now[:12]}, recipe base_hash {str(recorded)[:12]}); retrains would adapt another model")


_register(Retrainer(
    name="sd-lora", config_class=_lora_config_class, train=_lora_train, selection_size=_lora_selection_size,
    weights_file=_lora_weights_file, check=check_lora_base))


def recipe_trainer(recipe: dict) -> str:
    """The recipe's ``trainer`` (:data:`DEFAULT_TRAINER` for a recipe without one)."""
    return str(recipe.get("trainer") or DEFAULT_TRAINER)


def retrainer_for(recipe: dict, model_dir: str | Path = "the model") -> Retrainer:
    """The :class:`Retrainer` of the recipe's trainer; a one-line ``ValueError`` for a trainer that is
    refused (:data:`REFUSED_TRAINERS`) or unknown."""
    name = recipe_trainer(recipe)
    if name in REFUSED_TRAINERS:
        raise ValueError(f"{model_dir} cannot be retrained (LDS, counterfactual): {REFUSED_TRAINERS[name]}")
    if name not in RETRAINERS:
        raise ValueError(f"{Path(model_dir) / RECIPE_FILE} names trainer {name!r}, which cannot be retrained; "
                         f"retrainable: {', '.join(RETRAINERS.names())}")
    return RETRAINERS.get(name)


def read_retrain_recipe(model_dir: str | Path) -> dict:
    """The model's ``recipe.json`` once it can be replayed here: a known, retrainable trainer whose
    own check passes (a LoRA's base unchanged). One-line ``ValueError`` otherwise."""
    recipe = training.read_recipe_config(model_dir)
    retrainer_for(recipe, model_dir).check(recipe, Path(model_dir))
    return recipe


def check_steps_rule(steps_rule: str) -> str:
    """``steps_rule`` if it is one of :data:`STEPS_RULES`, else a ``ValueError``."""
    if steps_rule not in STEPS_RULES:
        raise ValueError(f"steps rule {steps_rule!r} is not one of {list(STEPS_RULES)}")
    return steps_rule


def subset_train_config(base: dict, indices: Sequence[int], seed: int, out_dir: str | Path,
                        steps_rule: str = "epochs", checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                        trainer: str | None = None):
    """The full model's config (``base``: its recipe's ``config``; ``trainer``: its recipe's
    ``trainer``, None for a DDPM) restricted to ``indices`` (into its training set, so they
    compose with a recipe that itself trained on a subset): a ``TrainConfig`` or a ``LoraTrainConfig``.

    steps_rule "epochs": steps = max(1, round(steps * n_S / n)), warm-up = round(warmup * n_S / n)
    (same number of passes over the data); "steps": the recipe's steps unchanged. Checkpoints
    every ``min(checkpoint_every, steps)`` steps, none kept.
    """
    retrainer = retrainer_for({"trainer": trainer})
    config = retrainer.make_config(base)
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
        n_full = n_full or retrainer.selection_size(config)
        ratio = len(subset) / n_full
        steps = max(1, int(round(config.steps * ratio)))
        warmup = int(round(config.warmup_steps * ratio))
    return replace(config, subset=subset, seed=int(seed), out_dir=str(out_dir), steps=steps,
                   warmup_steps=warmup, checkpoint_every=min(checkpoint_every, steps),
                   keep_checkpoints=False)


def full_data_train_config(base: dict, seed: int, out_dir: str | Path,
                           checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, trainer: str | None = None):
    """The full model's config (``base``, ``trainer``: as :func:`subset_train_config`) with another
    ``seed``, trained into ``out_dir``: an ensemble member (same data, steps and schedule;
    checkpoints every ``min(checkpoint_every, steps)`` steps, none kept)."""
    config = retrainer_for({"trainer": trainer}).make_config(base)
    return replace(config, seed=int(seed), out_dir=str(out_dir),
                   checkpoint_every=min(checkpoint_every, config.steps), keep_checkpoints=False)


def retrain_bytes(model_dir: str | Path) -> int:
    """Bytes a retrain of the model in ``model_dir`` writes at most: ``RETRAIN_WEIGHT_COPIES`` x
    its weights file (the up-front free-space check of the LDS build and the counterfactual check):
    the UNet of a DDPM, the adapter of a LoRA (whose state is the LoRA weights and their moments)."""
    recipe = training.read_recipe(model_dir)
    retrainer = retrainer_for(recipe or {}, model_dir)
    return RETRAIN_WEIGHT_COPIES * retrainer.weights_file(Path(model_dir)).stat().st_size


@dataclass(frozen=True)
class Retrained:
    """A finished retrain: its model folder (a pipeline or an adapter folder), the hash of its files
    (``models.pipeline_files_hash``) and the wall time of this call."""

    model_dir: Path
    files_hash: str
    seconds: float


def _retrainer_of(config) -> Retrainer:
    """The retrainer whose config class ``config`` is (the DDPM's first: its check imports nothing)."""
    for _, retrainer in RETRAINERS.items():
        if isinstance(config, retrainer.config_class()):
            return retrainer
    raise TypeError(f"no retrainer takes a {type(config).__name__}; expected one of {RETRAINERS.names()}")


def retrain(config, progress: bool = True, lock: Path | None = None) -> Retrained:
    """Train ``config`` (of :func:`subset_train_config` or :func:`full_data_train_config`) into
    ``config.out_dir`` with its trainer (resuming its checkpoint; a finished folder returns at
    once) and hash the folder's files.

    lock: a lock file held while training, for retrains several workers may ask for at once
    (the second waits, then finds the model trained); ``seconds`` includes that wait.
    """
    retrainer = _retrainer_of(config)
    started = time.time()
    with hold_lock(lock) if lock is not None else nullcontext():
        retrainer.train(config, progress)
    seconds = time.time() - started
    return Retrained(Path(config.out_dir), pipeline_files_hash(config.out_dir), seconds)
