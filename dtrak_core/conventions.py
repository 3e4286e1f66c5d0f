"""Conventions every stage shares: pixel ranges, noise ids of targets, default settings.

One place for each, so a feature computed by the app, the CLI, the LDS build and the
counterfactual check means the same thing.
"""

from __future__ import annotations

import numpy as np
import torch

#: Targets draw their noise with ids offset by this (2^40), so a training image used as a target
#: gets fresh noise, not the noise of the training row with the same index.
TARGET_ID_OFFSET = 1 << 40

#: K, the number of timesteps a feature averages over (the paper's cheap setting).
DEFAULT_NUM_TIMESTEPS = 10
#: k, the projected feature dimension.
DEFAULT_PROJECTION_DIM = 2048
#: lambda, the ridge of the TRAK kernel, where no calibration for the model exists.
DEFAULT_LAMBDA = 100.0


def target_ids(count: int, first: int = 0) -> list[int]:
    """Noise ids of targets ``first .. first + count - 1``: ``TARGET_ID_OFFSET + i``."""
    return [TARGET_ID_OFFSET + first + i for i in range(count)]


def uint8_to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 images (n, H, W, C) -> float32 tensor (n, C, H, W) in [-1, 1]: x / 127.5 - 1.

    The models' input range; the exact operations (divide, then subtract) are part of the
    convention, because features are compared byte for byte.
    """
    array = np.ascontiguousarray(images)
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(f"images must be a uint8 array (n, H, W, C), got {array.dtype} {array.shape}")
    return torch.from_numpy(array.copy()).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def model_range_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> uint8 (n, H, W, C), rounding to the nearest level."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
