"""Stage 2 of an LDS build: the model output on every target, identical (t, eps) for every model.

A text-to-image model is measured with each target's own caption as its condition (the
targets' ``captions``). The output is the diffusion loss mean_{t, eps} |eps_theta(x_t, t) - eps|^2 over
``measure_timesteps`` uniform timesteps of the model's T (offset by half a stride, so they are
not the attribution's T_K) and ``measure_noise`` noise draws; the noise of (target i, t, draw d)
comes from ``generator(measure_seed + d, TARGET_ID_OFFSET + i, t)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dtrak_core.conventions import target_ids, uint8_to_model_range
from dtrak_core.diffusion import diffusion_loss
from dtrak_core.evaluation.lds.config import LdsBuildConfig
from dtrak_core.evaluation.lds.targets import Targets
from dtrak_core.tasks import Batch, load_task

#: Targets per forward batch of the loss (a memory bound; the result does not depend on it).
MEASURE_BATCH_SIZE = 512


def measure_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """``count`` uniform timesteps of T = ``num_train_timesteps`` offset by half a stride:
    t_i = min(T - 1, floor(T / count * (i + 0.5))); 100 of 1000 -> 5, 15, ..., 995."""
    if not 1 <= count <= num_train_timesteps:
        raise ValueError(f"measure timesteps {count} must be between 1 and T={num_train_timesteps}")
    stride = num_train_timesteps / count
    return sorted({min(num_train_timesteps - 1, int(stride * (i + 0.5))) for i in range(count)})


@torch.no_grad()
def measure_losses(model_dir: str | Path, images: np.ndarray, timesteps: Sequence[int], seed: int,
                   noise_draws: int = 1, batch_size: int = MEASURE_BATCH_SIZE, first_target: int = 0,
                   captions: Sequence[str] | None = None) -> np.ndarray:
    """Diffusion loss of the model in ``model_dir`` on each target image, float64 (T,).

    images: uint8 (T, H, W, 3), the targets ``first_target`` .. ``first_target + T - 1`` of the
    build; captions: one per image for a text-to-image model (each target is measured with its
    own condition), None for an unconditional one. Draw d uses noise seed ``seed + d``; target i
    has noise id ``TARGET_ID_OFFSET + i``; the result is the mean over timesteps and draws.
    """
    task = load_task(model_dir)
    captions = None if captions is None else [str(c) for c in captions]
    inputs = task.prepare(Batch(uint8_to_model_range(images), target_ids(len(images), first_target),
                                captions=captions))
    total = torch.zeros(len(images), dtype=torch.float64)
    for d in range(noise_draws):
        total += diffusion_loss(task, inputs, list(timesteps), seed + d, batch_size).double()
    return (total / noise_draws).numpy()


def measure_new_targets(model_dir: Path, weights_hash: str, previous: dict | None, targets: Targets,
                        timesteps: Sequence[int], config: LdsBuildConfig) -> tuple[np.ndarray, dict]:
    """Losses (T,) of the model on every target, measuring only what ``previous`` lacks.

    previous: the model's output record from before targets were added (None: measure all).
    Its losses are kept only if the model was reproduced bit for bit (same weights hash); else
    every target is measured on this model. Returns (losses, a note of what was done).
    """
    known = 0 if previous is None else len(previous["losses"])
    if known > len(targets):
        raise ValueError(f"the stored output has {known} losses but the build has {len(targets)} targets: targets "
                         "were added by another worker after this one started; run it again")
    reproduced = previous is not None and previous.get("model_hash") == weights_hash
    start = known if reproduced else 0
    captions = None if targets.captions is None else targets.captions[start:]
    fresh = measure_losses(model_dir, targets.images[start:], timesteps, config.measure_seed, config.measure_noise,
                           first_target=start, captions=captions)
    if previous is None:
        return fresh, {}
    note: dict = {"targets_before": known, "targets_after": len(targets), "reproduced": reproduced}
    if reproduced:
        return np.concatenate([np.asarray(previous["losses"], dtype=np.float64), fresh]), note
    if known:
        note["old_targets_max_abs_change"] = float(np.max(np.abs(fresh[:known] - np.asarray(previous["losses"]))))
    return fresh, note
