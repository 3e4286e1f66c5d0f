"""Content hashes, each named by what it hashes.

- :func:`state_dict_hash`: a module's loaded tensors (names, dtypes, shapes, bytes);
- :func:`scheduler_config_hash`: a scheduler's class and config;
- :func:`betas_hash`: the betas of a noise schedule (what noising actually uses);
- :func:`float_tensor_hash`: a tensor's float32 values and shape (data that is no image folder);
- ``models.pipeline_files_hash``: the files of a pipeline folder;
- ``ImageFolderDataset.pixels_and_metadata_hash``: a dataset's decoded pixels and metadata.
"""

from __future__ import annotations

import hashlib
import json

import torch

from dtrak_core.io import sha256_json
from dtrak_core.schedule import NoiseSchedule


def state_dict_hash(module: torch.nn.Module) -> str:
    """sha256 over the state_dict: for each tensor in name order, its name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Through uint8 so bf16 tensors (no NumPy dtype) hash too.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def scheduler_config_hash(scheduler) -> str:
    """sha256 of the scheduler's class and config (the noise schedule changes x_t)."""
    config = {k: v for k, v in dict(getattr(scheduler, "config", {})).items() if not k.startswith("_")}
    return sha256_json({"class": type(scheduler).__name__, "config": json.loads(json.dumps(config, default=str))})


def float_tensor_hash(images: torch.Tensor) -> str:
    """sha256 of a tensor's shape and float32 bytes, for data that is not an ImageFolderDataset."""
    t = images.detach().cpu().contiguous().float()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()


def betas_hash(schedule: NoiseSchedule) -> str:
    """sha256 of the betas (float32 bytes): the noise schedule features were computed with."""
    return hashlib.sha256(schedule.betas.detach().cpu().float().numpy().tobytes()).hexdigest()
