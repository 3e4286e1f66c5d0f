"""LoRA adapters of a Stable Diffusion UNet: the formats people have, attached and checked.

Formats read (safetensors only; pickled weights are refused, nothing is downloaded):

- **diffusers**: a folder holding ``pytorch_lora_weights.safetensors`` (what
  ``StableDiffusionPipeline.save_lora_weights`` and our ``train-lora`` write), or a single
  ``.safetensors`` file with diffusers or kohya / A1111 keys (diffusers' ``lora_state_dict``
  converts them). UNet keys start with ``unet.``; ``text_encoder.`` keys load into the text
  encoder, where they change the condition only (gradients stay on the UNet's parameters).
- **peft**: a folder holding ``adapter_config.json`` + ``adapter_model.safetensors`` (what peft's
  ``PeftModel.save_pretrained`` writes for a wrapped UNet; keys ``base_model.model.<module>...``).

An adapter that does not fit the UNet (a module it names is missing, a shape differs, or some of
its tensors match nothing) is a :class:`LoraError`, one line.

**A model "with a LoRA" on disk** is an adapter folder that names its base pipeline folder in
``base_model.json``: ``{"base_model": "<folder, absolute or relative to the adapter folder>",
"base_hash": "<files hash of that folder, optional>"}``. ``train-lora`` writes it; for an
adapter from elsewhere, write it by hand. ``dtrak_core.tasks.load_task(adapter_folder)`` loads the
base and attaches the adapter, and refuses a base whose files changed since (``base_hash``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from dtrak_core.io import atomic_path, write_json_atomic
from dtrak_core.tasks.base import ModelError

#: The adapter name inside the UNet (peft's default): parameters are ``...lora_A.default.weight``.
ADAPTER_NAME = "default"
#: The file of an adapter folder that names its base pipeline folder.
BASE_FILE = "base_model.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
#: diffusers' safetensors metadata key for the LoRA config (``lora_base.LORA_ADAPTER_METADATA_KEY``).
METADATA_KEY = "lora_adapter_metadata"
#: The attention projections of a UNet2DConditionModel that LoRA fine-tunes adapt by default.
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


class LoraError(ModelError):
    """A LoRA adapter cannot be read or does not fit the model; the message says which and why."""


@dataclass(frozen=True)
class AdapterFiles:
    """Where an adapter's weights are: ``kind`` "diffusers" or "peft", the weights file, the
    peft config file (peft only)."""

    kind: str
    weights: Path
    config: Path | None = None


def find_adapter(path: str | Path) -> AdapterFiles:
    """The adapter in a folder or file (``LoraError`` naming what was looked for)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LoraError(f"LoRA file {path} is not a .safetensors file; pickled weights are not loaded")
        return AdapterFiles("diffusers", path)
    if not path.is_dir():
        raise LoraError(f"LoRA adapter {path} does not exist")
    if (path / PEFT_WEIGHTS).is_file() and (path / PEFT_CONFIG).is_file():
        return AdapterFiles("peft", path / PEFT_WEIGHTS, path / PEFT_CONFIG)
    if (path / DIFFUSERS_WEIGHTS).is_file():
        return AdapterFiles("diffusers", path / DIFFUSERS_WEIGHTS)
    raise LoraError(f"{path} holds no LoRA adapter; expected {DIFFUSERS_WEIGHTS} (diffusers) or "
                    f"{PEFT_CONFIG} + {PEFT_WEIGHTS} (peft)")


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torch's load errors span several), at most ``limit`` chars."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' own log lines while loading: a failure is reported once, by our error."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def lora_parameter_names(module: torch.nn.Module) -> list[str]:
    """The names of ``module``'s LoRA parameters (``"lora"`` in the name, the peft convention)."""
    return [n for n, _ in module.named_parameters() if "lora" in n.lower()]


def attach_adapter(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, path: str | Path,
                   base: str | Path = "the base pipeline") -> AdapterFiles:
    """Load the adapter at ``path`` into ``unet`` (and ``text_encoder`` if it has text-encoder
    weights) as adapter :data:`ADAPTER_NAME`; returns where it was read from.

    Every UNet tensor of the adapter must land on a module of the UNet with its shape, else
    :class:`LoraError` (``base`` names the pipeline in the message).
    """
    files = find_adapter(path)
    if getattr(unet, "peft_config", None):
        raise LoraError(f"the UNet of {base} already holds an adapter; load one LoRA at a time")
    try:
        with _quiet_diffusers():
            if files.kind == "peft":
                expected = _attach_peft(unet, files)
            else:
                expected = _attach_diffusers(unet, text_encoder, files)
    except LoraError:
        raise
    except Exception as error:  # peft / torch say why in their own words: keep them, on one line
        raise LoraError(f"the LoRA in {path} does not fit the UNet of {base}: {one_line(error)}") from None
    loaded = len(lora_parameter_names(unet))
    if expected == 0:
        raise LoraError(f"the LoRA in {path} holds no UNet weights; expected keys like "
                        "'unet.<module>.lora_A.weight'")
    if loaded != expected:
        raise LoraError(f"the LoRA in {path} does not fit the UNet of {base}: it holds {expected} UNet tensors "
                        f"but {loaded} LoRA parameters were made from them; they must match one to one")
    return files


def _attach_diffusers(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, files: AdapterFiles) -> int:
    from dtrak_core.tasks.text_to_image import sd_pipeline_class

    StableDiffusionPipeline = sd_pipeline_class()

    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(files.weights.parent), weight_name=files.weights.name, local_files_only=True,
        use_safetensors=True, return_lora_metadata=True)
    if not all("lora" in k for k in state):
        odd = next(k for k in state if "lora" not in k)
        raise LoraError(f"{files.weights} is not a LoRA state dict (key {odd!r} names no lora tensor)")
    unet_keys = [k for k in state if k.startswith("unet.")]
    if unet_keys:
        unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, metadata=metadata,
                               adapter_name=ADAPTER_NAME, low_cpu_mem_usage=False)
    if text_encoder is not None and any(k.startswith("text_encoder.") for k in state):
        StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder, metadata=metadata,
                                                            adapter_name=ADAPTER_NAME, low_cpu_mem_usage=False)
    return len(unet_keys)


def _attach_peft(unet: torch.nn.Module, files: AdapterFiles) -> int:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    assert files.config is not None
    try:
        raw = json.loads(files.config.read_text())
    except json.JSONDecodeError as error:
        raise LoraError(f"{files.config} is not valid JSON ({error})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{files.config} describes a {raw.get('peft_type')} adapter; only LoRA is supported")
    known = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in raw.items() if k in known})
    prefix = "base_model.model."
    state = {k.removeprefix(prefix): v for k, v in load_file(files.weights).items()}
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = [k for k in result.unexpected_keys if "lora" in k]
    if unexpected:
        raise LoraError(f"the LoRA in {files.weights.parent} does not fit the UNet: its tensor "
                        f"{unexpected[0]!r} matches no module ({len(unexpected)} such tensors)")
    return len(state)


def adapter_config(unet: torch.nn.Module) -> dict | None:
    """The attached adapter's LoRA settings (rank, alpha, targets, ...) as JSON-able data, or None.

    They change the model's outputs (the scaling alpha / r) without being tensors, so content
    hashes include them.
    """
    configs = getattr(unet, "peft_config", None) or {}
    if ADAPTER_NAME not in configs:
        return None
    return json.loads(json.dumps(configs[ADAPTER_NAME].to_dict(), sort_keys=True, default=_jsonable))


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    return str(value)


def save_adapter(unet: torch.nn.Module, folder: str | Path) -> Path:
    """Write the UNet's adapter as diffusers' ``pytorch_lora_weights.safetensors`` into ``folder``
    (atomically): keys ``unet.<module>.lora_A.weight``, and the LoRA config as diffusers' JSON
    metadata (``lora_adapter_metadata``), so ``pipe.load_lora_weights(folder)`` restores alpha too.

    Written here rather than by ``save_lora_weights``, which adds a second metadata key: safetensors
    stores metadata in a hash map whose order changes from process to process, and the same
    adapter must always give the same bytes (a resumed run is compared file by file).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if adapter_config(unet) is None:
        raise LoraError("the UNet holds no adapter to save")
    state = {f"unet.{k}": v.detach().contiguous()
             for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}
    metadata = {f"unet.{k}": sorted(v) if isinstance(v, (set, frozenset)) else v
                for k, v in unet.peft_config[ADAPTER_NAME].to_dict().items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / DIFFUSERS_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    return folder / DIFFUSERS_WEIGHTS


def write_base(adapter_dir: str | Path, base_dir: str | Path, base_hash: str | None) -> None:
    """Name the adapter's base pipeline folder in ``base_model.json`` (absolute path)."""
    write_json_atomic(Path(adapter_dir) / BASE_FILE, {"base_model": str(Path(base_dir).resolve()),
                                                      "base_hash": base_hash})


def read_base(adapter_dir: str | Path) -> tuple[Path, str | None] | None:
    """(base folder, its recorded files hash or None) of an adapter folder, or None if it names none."""
    path = Path(adapter_dir) / BASE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        base = Path(data["base_model"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise LoraError(f"{path} must be JSON with a 'base_model' folder ({type(error).__name__}: {error})") from None
    if not base.is_absolute():
        base = Path(adapter_dir) / base
    return base, data.get("base_hash")
