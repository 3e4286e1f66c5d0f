"""Model families (diffusion tasks), looked up by the pipeline class of a model folder.

``load_task(model_dir)`` reads ``model_index.json``'s ``_class_name`` and asks the task
registered for it to load the folder. A new family: subclass ``DiffusionTask`` and decorate it
with ``@TASKS.register("<PipelineClassName>")``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dtrak_core.plugins import Registry
from dtrak_core.tasks.base import Batch, DiffusionInputs, DiffusionTask, ModelError
from dtrak_core.tasks.prediction import PREDICTION_TYPES
from dtrak_core.tasks.text_to_image import TextToImageTask
from dtrak_core.tasks.unconditional import UnconditionalPixelTask

TASKS: Registry[type[DiffusionTask]] = Registry("model family (pipeline class)")
TASKS.register(UnconditionalPixelTask.pipeline_class)(UnconditionalPixelTask)
TASKS.register(TextToImageTask.pipeline_class)(TextToImageTask)


def pipeline_class_name(model_dir: str | Path) -> str:
    """The ``_class_name`` of a pipeline folder's ``model_index.json`` (``ModelError`` if unreadable)."""
    model_dir = Path(model_dir)
    index = model_dir / "model_index.json"
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist")
    from dtrak_core.lora import read_base  # an adapter folder: the class of the base it names

    base = read_base(model_dir) if not index.exists() else None
    if base is not None:
        return pipeline_class_name(base[0])
    if not index.exists():
        raise ModelError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ModelError(f"{index} is not a valid model_index.json ({error})") from None
    return str(name)


def task_class_for(model_dir: str | Path) -> type[DiffusionTask]:
    """The registered task for a folder's pipeline class, or ``ModelError`` naming the supported ones."""
    name = pipeline_class_name(model_dir)
    if name not in TASKS:
        raise ModelError(f"{model_dir} holds a {name}; supported pipelines: {', '.join(TASKS.names())}")
    return TASKS.get(name)


def load_task(model_dir: str | Path) -> DiffusionTask:
    """Load a pipeline folder as its task (``ModelError`` with the reason if it cannot be)."""
    return task_class_for(model_dir).load(Path(model_dir))


__all__ = ["Batch", "DiffusionInputs", "DiffusionTask", "ModelError", "TASKS", "PREDICTION_TYPES",
           "UnconditionalPixelTask", "TextToImageTask", "load_task", "task_class_for", "pipeline_class_name"]
