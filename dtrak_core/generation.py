"""Sampling with fixed seeds: the same (model, seed, sampler) always gives the same image.

The initial noise of seed s is drawn on the CPU from ``torch.Generator().manual_seed(s)`` with
shape (1, *input_shape) of the model's task; DDPM's per-step noise comes from that same per-seed generator. Batching
seeds together therefore changes nothing.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

from dtrak_core import paths
from dtrak_core.conventions import model_range_to_uint8
from dtrak_core.io import (ensure_writable, fault_point, hold_lock, sha256_bytes, sha256_file, write_bytes_atomic,
                           write_json_atomic)
from dtrak_core.models import pipeline_files_hash
from dtrak_core.progress import progress_bar
from dtrak_core.tasks import DiffusionTask, load_task

SAMPLES_FILE = "samples.json"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class SamplerConfig:
    """``kind`` 'ddim' (deterministic with eta = 0) or 'ddpm' (ancestral, all T steps)."""

    kind: str = "ddim"
    steps: int = 50
    eta: float = 0.0

    def validate(self) -> None:
        if self.kind not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.kind!r}")
        if self.steps <= 0:
            raise ValueError(f"sampler steps must be positive, got {self.steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    @property
    def tag(self) -> str:
        return f"{self.kind}-{self.steps}-eta{self.eta:g}" if self.kind == "ddim" else "ddpm-1000"


@torch.no_grad()
def sample(task: DiffusionTask, seeds: Sequence[int], sampler: SamplerConfig = SamplerConfig(),
           condition: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """Images (len(seeds), 3, H, W) in [-1, 1], one per seed.

    The scheduler steps on the task's raw prediction (diffusers' schedulers convert epsilon, v
    and sample predictions themselves); ``task.to_images`` turns the final x0 into pixels
    (identity for pixel models). ``condition``: (len(seeds), ...) or None.
    """
    return task.to_images(sample_latents(task, seeds, sampler, condition, progress)).clamp(-1, 1).cpu()


@torch.no_grad()
def sample_latents(task: DiffusionTask, seeds: Sequence[int], sampler: SamplerConfig = SamplerConfig(),
                   condition: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """The final x0 (len(seeds), *input_shape) of :func:`sample`, before ``to_images`` (latents
    for latent models: a generated target keeps them rather than re-encoding its image)."""
    sampler.validate()
    device = task.device
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.cat([torch.randn((1, *task.input_shape), generator=g) for g in generators]).to(device)
    if sampler.kind == "ddim":
        steps_scheduler = DDIMScheduler.from_config(task.scheduler.config)
        steps_scheduler.set_timesteps(sampler.steps)
    else:
        steps_scheduler = DDPMScheduler.from_config(task.scheduler.config)
        steps_scheduler.set_timesteps(task.num_train_timesteps)
    for t in progress_bar(steps_scheduler.timesteps, desc="sample", disable=not progress, leave=False):
        prediction = task.denoise(x, t.to(device), condition)
        if sampler.kind == "ddim":
            x = steps_scheduler.step(prediction, t, x, eta=sampler.eta, generator=generators).prev_sample
        else:
            x = steps_scheduler.step(prediction, t, x, generator=generators).prev_sample
    return x


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(n, 3, H, W) in [-1, 1] -> RGB images."""
    return [Image.fromarray(a) for a in model_range_to_uint8(images)]


def default_samples_dir(files_hash: str, sampler: SamplerConfig) -> Path:
    """The cache's folder for the samples of the model with ``files_hash`` (``pipeline_files_hash``)."""
    return paths.cache_dir() / "samples" / files_hash[:16] / sampler.tag


def _read_index(out: Path, info: dict) -> dict:
    """The folder's ``samples.json`` (a fresh one when missing or unreadable); refuses another
    model's or sampler's folder."""
    try:
        index = json.loads((out / SAMPLES_FILE).read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        return {**info, "seeds": [], "sha256": {}}
    if index.get("model_hash") != info["model_hash"] or index.get("sampler") != info["sampler"]:
        raise ValueError(f"{out} holds samples of another model or sampler; choose another --out")
    if not isinstance(index.get("sha256"), dict):  # written before checksums: every image is unproven
        index["sha256"] = {}
    return index


def _verified(out: Path, index: dict, seed: int) -> bool:
    """Whether ``<seed>.png`` exists and hashes to what the index records for it."""
    recorded = index["sha256"].get(str(seed))
    path = out / f"{seed}.png"
    return recorded is not None and path.is_file() and sha256_file(path) == recorded


def generate_to_folder(model_dir: str | Path, seeds: Sequence[int], sampler: SamplerConfig,
                       out_dir: str | Path | None = None, batch_size: int = 64,
                       progress: bool = True) -> Path:
    """Write ``<seed>.png`` for each seed plus ``samples.json`` (model hash, sampler, ``seeds`` and
    ``sha256``: seed -> sha256 of its PNG).

    Seeds whose image is in the folder and matches its recorded sha256 are not sampled again
    (nor is the model loaded): a torn, foreign or unrecorded image is sampled again, never
    served. One writer per folder (an exclusive ``flock`` on ``<out>/.lock``; a second waits,
    saying so on stderr); each image goes through a temporary file and a rename, and
    ``samples.json`` records a batch's images after they are on disk.
    """
    sampler.validate()
    files_hash = pipeline_files_hash(model_dir)
    out = Path(out_dir) if out_dir is not None else default_samples_dir(files_hash, sampler)
    info = {"model": str(model_dir), "model_hash": files_hash, "sampler": asdict(sampler)}
    wanted = list(dict.fromkeys(int(s) for s in seeds))
    index = _read_index(out, info)
    if all(_verified(out, index, s) for s in wanted):
        return out  # everything is there and intact: no lock, no writes
    ensure_writable(out, 0, "samples")
    with hold_lock(out / LOCK_FILE, on_wait=lambda: print(
            f"waiting for another process writing samples in {out}; they will be reused", file=sys.stderr,
            flush=True)):
        for pattern in (".*.png.*.tmp", f".{SAMPLES_FILE}.*.tmp"):  # left by a killed writer (we hold the lock)
            for stray in out.glob(pattern):
                stray.unlink(missing_ok=True)
        index = _read_index(out, info)  # another writer may have finished while we waited
        todo = [s for s in wanted if not _verified(out, index, s)]
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        task = load_task(model_dir) if batches else None
        for batch in progress_bar(batches, desc="generate", disable=not progress or not batches, unit="batch"):
            for seed, image in zip(batch, to_pil(sample(task, batch, sampler))):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                write_bytes_atomic(out / f"{seed}.png", buffer.getvalue())
                index["sha256"][str(seed)] = sha256_bytes(buffer.getvalue())
                fault_point("samples.image")
            # The index records the batch only now that its images are on disk.
            index["seeds"] = sorted(int(s) for s in index["sha256"])
            write_json_atomic(out / SAMPLES_FILE, index)
    return out


def image_grid(images: Sequence[Image.Image], columns: int = 8, scale: int = 1) -> Image.Image:
    """Tile equal-size images into one picture (upscaled with nearest neighbour, no blur)."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


