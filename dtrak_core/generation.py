"""Sampling with fixed seeds: the same (model, seed, sampler) always gives the same image.

The initial noise of seed s is drawn on the CPU from ``torch.Generator().manual_seed(s)`` with
shape (1, *input_shape) of the model's task; DDPM's per-step noise comes from that same per-seed generator. Batching
seeds together therefore changes nothing.
"""

from __future__ import annotations

import io
import json
import re
import sys
from abc import ABC, abstractmethod
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
from dtrak_core.tasks import DiffusionTask, ModelError, TextToImageTask, load_task, task_class_for
from dtrak_core.tasks.text_to_image import TARGET_JSON, TARGET_TENSORS, GuidanceSettings, generate_targets

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


def default_samples_dir(files_hash: str, sampler: SamplerConfig, guidance_scale: float | None = None) -> Path:
    """The cache's folder for the samples of the model with ``files_hash`` (``pipeline_files_hash``)
    made with ``sampler`` (and, for text-to-image models, ``guidance_scale``: ``...-cfg3``)."""
    tag = sampler.tag if guidance_scale is None else f"{sampler.tag}-cfg{guidance_scale:g}"
    return paths.cache_dir() / "samples" / files_hash[:16] / tag


def prompt_folder(prompt: str) -> str:
    """The subfolder of a prompt's samples: its words (lowercase letters and digits joined by
    dashes, at most 40 characters) and the first 12 hex digits of its sha256, so it is readable,
    safe as a file name whatever the prompt holds, and never shared by two prompts:
    ``"grinning face, openmoji style"`` -> ``grinning-face-openmoji-style-<12 hex>``."""
    digest = sha256_bytes(prompt.encode())[:12]
    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:40].strip("-")
    return f"{slug}-{digest}" if slug else digest


def text_sample_key(prompt: str, seed: int) -> str:
    """Where (prompt, seed) is in a text-to-image samples folder: ``<key>.png`` and the target
    record ``<key>/`` (``TextToImageTarget.load``), with key ``<prompt folder>/<seed>``."""
    return f"{prompt_folder(prompt)}/{int(seed)}"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_index(out: Path, info: dict) -> dict:
    """The folder's ``samples.json`` (a fresh one when missing or unreadable); refuses a folder
    of another model or other sampler settings (every key of ``info`` but the model's path)."""
    try:
        index = json.loads((out / SAMPLES_FILE).read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict):
        return {**info, "seeds": [], "sha256": {}}
    if any(index.get(k) != v for k, v in info.items() if k != "model"):
        raise ValueError(f"{out} holds samples of another model or sampler; choose another --out")
    if not isinstance(index.get("sha256"), dict):  # written before checksums: every image is unproven
        index["sha256"] = {}
    return index


def _verified(out: Path, index: dict, key: str, files: Sequence[str]) -> bool:
    """Whether an item's files exist and hash to what the index records: the PNG (``files[0]``)
    in ``sha256[key]``, any others in ``records[key][path]``."""
    png, *others = files
    recorded = index["sha256"].get(key)
    if recorded is None or not (out / png).is_file() or sha256_file(out / png) != recorded:
        return False
    records = index.get("records", {}).get(key, {})
    return all(rel in records and (out / rel).is_file() and sha256_file(out / rel) == records[rel] for rel in others)


class _SampleKind(ABC):
    """What a samples folder holds per item (a key of ``samples.json``): its files, how the
    missing ones are batched and made, what the index says about them beside the checksums."""

    #: Globs (relative to the folder) of the temporaries a killed writer of this kind leaves.
    temporaries: tuple[str, ...] = ()

    @abstractmethod
    def load(self) -> None:
        """Load the model, and refuse what it cannot sample, before anything is written."""

    @abstractmethod
    def files(self, key: str) -> list[str]:
        """The item's files, relative to the folder, the PNG first."""

    @abstractmethod
    def batches(self, todo: list[str]) -> list[list[str]]:
        """The missing items, grouped into what is sampled together."""

    @abstractmethod
    def make(self, batch: list[str]) -> list[list[tuple[str, bytes]]]:
        """For each item of ``batch``, its files as (relative path, bytes), in :meth:`files`' order."""

    @abstractmethod
    def summarise(self, index: dict) -> None:
        """Update the index's readable summary (seeds, prompts) from its recorded items."""


def _fill_folder(out: Path, info: dict, wanted: Sequence[str], kind: _SampleKind, progress: bool) -> None:
    """Make the items of ``wanted`` that are not in ``out`` with matching checksums.

    One writer per folder (an exclusive ``flock`` on ``<out>/.lock``; a second waits, saying so
    on stderr); each file goes through a temporary file and a rename; ``samples.json`` records a
    batch's items after all their files are on disk. Nothing is written (nor is the model
    loaded) when every item is there and intact; a torn, foreign or unrecorded file is made
    again, never served.
    """
    index = _read_index(out, info)
    if all(_verified(out, index, key, kind.files(key)) for key in wanted):
        return  # everything is there and intact: no lock, no writes
    kind.load()
    ensure_writable(out, 0, "samples")
    with hold_lock(out / LOCK_FILE, on_wait=lambda: print(
            f"waiting for another process writing samples in {out}; they will be reused", file=sys.stderr,
            flush=True)):
        for pattern in (*kind.temporaries, f".{SAMPLES_FILE}.*.tmp"):  # a killed writer's (we hold the lock)
            for stray in out.glob(pattern):
                stray.unlink(missing_ok=True)
        index = _read_index(out, info)  # another writer may have finished while we waited
        todo = [key for key in wanted if not _verified(out, index, key, kind.files(key))]
        batches = kind.batches(todo)
        for batch in progress_bar(batches, desc="generate", disable=not progress or not batches, unit="batch"):
            for key, files in zip(batch, kind.make(batch)):
                for rel, data in files:
                    write_bytes_atomic(out / rel, data)
                (png, png_bytes), *others = files
                index["sha256"][key] = sha256_bytes(png_bytes)
                if others:
                    index.setdefault("records", {})[key] = {rel: sha256_bytes(data) for rel, data in others}
                fault_point("samples.image")
            # The index records the batch only now that its files are on disk.
            kind.summarise(index)
            write_json_atomic(out / SAMPLES_FILE, index)


class _SeedSamples(_SampleKind):
    """An unconditional model's samples: ``<seed>.png``; the index lists the seeds."""

    temporaries = (".*.png.*.tmp",)

    def __init__(self, model_dir: str | Path, sampler: SamplerConfig, batch_size: int) -> None:
        self.model_dir, self.sampler, self.batch_size = model_dir, sampler, batch_size
        self.task: DiffusionTask | None = None

    def load(self) -> None:
        self.task = load_task(self.model_dir)

    def files(self, key: str) -> list[str]:
        return [f"{key}.png"]

    def batches(self, todo: list[str]) -> list[list[str]]:
        return [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]

    def make(self, batch: list[str]) -> list[list[tuple[str, bytes]]]:
        assert self.task is not None, "load() first"
        images = to_pil(sample(self.task, [int(key) for key in batch], self.sampler))
        return [[(f"{key}.png", _png_bytes(image))] for key, image in zip(batch, images)]

    def summarise(self, index: dict) -> None:
        index["seeds"] = sorted(int(s) for s in index["sha256"])


def generate_to_folder(model_dir: str | Path, seeds: Sequence[int], sampler: SamplerConfig,
                       out_dir: str | Path | None = None, batch_size: int = 64,
                       progress: bool = True) -> Path:
    """Write ``<seed>.png`` for each seed plus ``samples.json`` (model hash, sampler, ``seeds`` and
    ``sha256``: seed -> sha256 of its PNG), under the rules of :func:`_fill_folder` (one writer,
    atomic files, checksums; intact seeds are not sampled again). For an unconditional model;
    a text-to-image model is refused (:func:`generate_text_to_image` takes its prompts)."""
    sampler.validate()
    _check_family(model_dir, text=False)
    files_hash = pipeline_files_hash(model_dir)
    out = Path(out_dir) if out_dir is not None else default_samples_dir(files_hash, sampler)
    info = {"model": str(model_dir), "model_hash": files_hash, "sampler": asdict(sampler)}
    wanted = [str(s) for s in dict.fromkeys(int(s) for s in seeds)]
    _fill_folder(out, info, wanted, _SeedSamples(model_dir, sampler, batch_size), progress)
    return out


class _PromptSamples(_SampleKind):
    """A text-to-image model's samples: per (prompt, seed) ``<prompt folder>/<seed>.png`` and the
    target record ``<prompt folder>/<seed>/`` (latents and prompt embedding, ``TextToImageTarget``);
    the index maps each prompt folder to its prompt and its seeds."""

    temporaries = ("*/.*.png.*.tmp", "*/*/.target.*.tmp")

    def __init__(self, model_dir: str | Path, prompts: Sequence[str], settings: GuidanceSettings,
                 batch_size: int) -> None:
        self.model_dir, self.settings, self.batch_size = model_dir, settings, batch_size
        self.prompts = {prompt_folder(p): p for p in prompts}
        self.task: TextToImageTask | None = None

    def load(self) -> None:
        task = load_task(self.model_dir)
        assert isinstance(task, TextToImageTask)
        task.token_ids(list(self.prompts.values()))  # PromptError for a prompt that does not fit
        self.task = task

    def files(self, key: str) -> list[str]:
        return [f"{key}.png", f"{key}/{TARGET_TENSORS}", f"{key}/{TARGET_JSON}"]

    def batches(self, todo: list[str]) -> list[list[str]]:
        by_prompt: dict[str, list[str]] = {}
        for key in todo:
            by_prompt.setdefault(key.rsplit("/", 1)[0], []).append(key)
        size = self.batch_size
        return [keys[i:i + size] for keys in by_prompt.values() for i in range(0, len(keys), size)]

    def make(self, batch: list[str]) -> list[list[tuple[str, bytes]]]:
        assert self.task is not None, "load() first"
        folder = batch[0].rsplit("/", 1)[0]
        targets = generate_targets(self.task, self.prompts[folder], [int(k.rsplit("/", 1)[1]) for k in batch],
                                   self.settings)
        return [[(f"{key}.png", _png_bytes(Image.fromarray(target.image))),
                 *((f"{key}/{name}", data) for name, data in target.files())] for key, target in zip(batch, targets)]

    def summarise(self, index: dict) -> None:
        prompts, seeds = index.setdefault("prompts", {}), {}
        for key in index["sha256"]:
            folder, seed = key.rsplit("/", 1)
            seeds.setdefault(folder, []).append(int(seed))
            if folder in self.prompts:
                prompts[folder] = self.prompts[folder]
        index["seeds"] = {folder: sorted(s) for folder, s in sorted(seeds.items())}


def generate_text_to_image(model_dir: str | Path, prompts: Sequence[str], seeds: Sequence[int],
                           settings: GuidanceSettings | None = None, out_dir: str | Path | None = None,
                           batch_size: int = 64, progress: bool = True) -> Path:
    """Generate every prompt with every seed (``tasks.text_to_image.generate_targets``: DDIM,
    eta 0, classifier-free guidance ``settings.guidance_scale``, ``settings.steps``) into
    ``out_dir`` (default: the cache's ``samples/<files hash>/ddim-<steps>-eta0-cfg<g>/``).

    Per (prompt, seed), at :func:`text_sample_key`: the PNG and the target record (latents and
    prompt embedding: attributed without re-encoding). ``samples.json`` holds the model's files
    hash, the sampler, the guidance scale (a folder of other settings is refused), the prompt of
    each prompt folder, its seeds, and the sha256 of every file; the prompt is part of each
    item's path. The rules of :func:`_fill_folder` hold (one writer, atomic files, checksums).
    A prompt longer than the tokenizer allows is refused before anything is written.
    """
    settings = settings if settings is not None else GuidanceSettings()
    sampler = SamplerConfig("ddim", settings.steps, 0.0)
    sampler.validate()
    if not prompts:
        raise ValueError("no prompt to generate; give at least one")
    _check_family(model_dir, text=True)
    files_hash = pipeline_files_hash(model_dir)
    out = (Path(out_dir) if out_dir is not None
           else default_samples_dir(files_hash, sampler, float(settings.guidance_scale)))
    info = {"model": str(model_dir), "model_hash": files_hash, "sampler": asdict(sampler),
            "guidance_scale": float(settings.guidance_scale)}
    prompts = list(dict.fromkeys(prompts))
    wanted = [text_sample_key(p, s) for p in prompts for s in dict.fromkeys(int(s) for s in seeds)]
    _fill_folder(out, info, wanted, _PromptSamples(model_dir, prompts, settings, batch_size), progress)
    return out


def _check_family(model_dir: str | Path, text: bool) -> None:
    """Refuse (``ModelError``, one line) a model of the other kind than the caller samples."""
    task_class = task_class_for(model_dir)
    if issubclass(task_class, TextToImageTask) and not text:
        raise ModelError(f"{model_dir} is a text-to-image model ({task_class.pipeline_class}); give --prompt or "
                         "--prompts-file")
    if text and not issubclass(task_class, TextToImageTask):
        raise ModelError(f"{model_dir} holds a {task_class.pipeline_class}, which takes no prompt; generate without "
                         "--prompt / --prompts-file")


def image_grid(images: Sequence[Image.Image], columns: int = 8, scale: int = 1) -> Image.Image:
    """Tile equal-size images into one picture (upscaled with nearest neighbour, no blur)."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


