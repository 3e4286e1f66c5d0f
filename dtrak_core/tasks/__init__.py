"""Model families (diffusion tasks), looked up by the pipeline class of a model folder.

``load_task(model_dir)`` reads ``model_index.json``'s ``_class_name`` and asks the task
registered for it to load the folder. A new family: subclass ``DiffusionTask`` and decorate it
with ``@TASKS.register("<PipelineClassName>")``.

Every reader (featurize, score, generate, the held-out loss, LDS, counterfactual, the app's
registration) loads through here, so what is not supported is refused here, at load, in one
line: a folder our trainer has not finished, an unknown pipeline class, and (in the task's
``load``/``__init__``) an unknown prediction type, a scheduler whose noise process we do not
reproduce, a denoiser of another kind.
"""

from __future__ import annotations

import json
from pathlib import Path

from dtrak_core.plugins import Registry
from dtrak_core.tasks.base import Batch, DiffusionInputs, DiffusionTask, ModelError
from dtrak_core.tasks.prediction import PREDICTION_TYPES
from dtrak_core.tasks.text_to_image import TextToImageTask
from dtrak_core.tasks.unconditional import UnconditionalPixelTask
from dtrak_core.training_run import RunError, check_finished, refuse_unfinished

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


def check_model_folder(model_dir: str | Path) -> type[DiffusionTask]:
    """What every reader checks before loading weights; returns the folder's task class.

    A folder our trainer is writing or was killed writing (``train_state.pt``, no
    ``train_complete.json``) is refused before anything else; then the pipeline class; then, for
    a folder the trainer finished, that the files its marker lists are there and its weights
    match their sha256. Folders of other tools (and the embedded models) have neither file and
    are not affected. ``ModelError`` with the reason.
    """
    try:
        refuse_unfinished(model_dir)
        task_class = task_class_for(model_dir)
        check_finished(model_dir)
    except RunError as error:
        raise ModelError(str(error)) from None
    return task_class


def load_task(model_dir: str | Path) -> DiffusionTask:
    """Load a pipeline folder as its task (``ModelError`` with the reason if it cannot be)."""
    return check_model_folder(model_dir).load(Path(model_dir))


__all__ = ["Batch", "DiffusionInputs", "DiffusionTask", "ModelError", "TASKS", "PREDICTION_TYPES",
           "UnconditionalPixelTask", "TextToImageTask", "check_model_folder", "load_task", "task_class_for",
           "pipeline_class_name"]
