"""The models the app can attribute with: the embedded demo plus user-registered folders.

A registered model is a name, a diffusers pipeline folder and the folder of its training images
(for a model trained by us, ``recipe.json`` says which of those images were used; otherwise the
whole folder is the training set), and optionally the metadata column that names each image's
artist or other label (what the app's artist chart and the counterfactual page group by;
``artist`` when present, if none is chosen). Registrations live in ``<cache>/registry.json`` (written
atomically under a lock). Registration checks everything cheap before saving: the model folder
loads as a supported pipeline and its training set loads and fits the model; so the app only
ever reads files inside registered folders.

Confinement: both folders must lie, after following links, under one of the allowed roots
(:func:`allowed_roots`: the project's ``models/``, the cache folder, and the folders listed in
``DTRAK_MODEL_ROOTS``). Anyone who can reach the app can type a path into its form, so a folder
outside them is refused with one message that is the same whether it exists or not, before
anything in it is read. A name already registered is replaced only when asked (``replace``);
the names of the embedded and environment models cannot be registered (they would be hidden).

The environment may add one more entry (``DTRAK_MODEL_DIR`` and ``DTRAK_DATA_DIR``, named by
``DTRAK_MODEL_NAME``): tests and deployments point the app at a model this way.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from dtrak_core import paths
from dtrak_core.attribution.loading import load_model, load_training_set
from dtrak_core.io import hold_lock, write_json_atomic

REGISTRY_FILE = "registry.json"
DEMO_NAME = "emoji3-demo"
#: The small evaluation model: the LDS and counterfactual benchmarks' model, whose committed
#: results the Benchmark and Counterfactual pages show.
MINI_NAME = "emoji3-mini"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Extra folders (os.pathsep-separated) under which models and training images may be registered.
ROOTS_ENV = "DTRAK_MODEL_ROOTS"


class RegistryError(ValueError):
    """A registration is refused (outside the allowed roots, or a name taken); the message says why."""


#: The label column a training set is read with when none was chosen (used when present).
DEFAULT_LABEL_COLUMN = "artist"


@dataclass(frozen=True)
class ModelEntry:
    """``data_dir`` None: the recipe's data folder (embedded models). ``label_column`` None:
    :data:`DEFAULT_LABEL_COLUMN` when the metadata has it, else no labels."""

    name: str
    model_dir: str
    data_dir: str | None = None
    source: str = "registered"  # "embedded", "environment" or "registered"
    label_column: str | None = None

    @property
    def labels_from(self) -> str:
        """The metadata column to read labels from (the loader ignores it when absent)."""
        return self.label_column or DEFAULT_LABEL_COLUMN


def _cache_root() -> Path:
    return paths.cache_dir()


def registry_path(cache_root: str | Path | None = None) -> Path:
    return Path(cache_root or _cache_root()) / REGISTRY_FILE


def _read(path: Path) -> list[ModelEntry]:
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
        return [ModelEntry(**{**row, "source": "registered"}) for row in rows]
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path} is not a model registry ({error}); delete it to start afresh") from None


def allowed_roots(cache_root: str | Path | None = None) -> list[Path]:
    """The folders registrations may point into, resolved: ``models/``, the cache, ``DTRAK_MODEL_ROOTS``."""
    extra = [Path(p).expanduser() for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    roots = [paths.MODELS_DIR, Path(cache_root or _cache_root()), *extra]
    return list(dict.fromkeys(root.resolve() for root in roots))


def _confined(folder: str | Path, what: str, roots: list[Path]) -> Path:
    """``folder`` resolved (links followed) if it lies under one of ``roots``; else RegistryError.

    The message quotes the folder as typed and is the same whether it exists or not.
    """
    try:
        given = Path(folder).expanduser()
        resolved = given.resolve()
        # ".." is refused outright: resolving it after a link would tell links from folders outside.
        inside = ".." not in given.parts and any(resolved.is_relative_to(root) for root in roots)
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte, a name too long
        inside = False
    if not str(folder).strip() or not inside:
        raise RegistryError(f"{what} {str(folder)!r} is not under an allowed root ({paths.MODELS_DIR.name}/, "
                            f"the cache, or a folder listed in {ROOTS_ENV}); move or copy it there (a link out "
                            f"is followed), or add its parent to {ROOTS_ENV} where the app is started")
    return resolved


def list_models(cache_root: str | Path | None = None) -> list[ModelEntry]:
    """Environment entry first (if set), then the embedded demo and mini models (if present and
    not hidden by DTRAK_HIDE_DEMO), then registrations."""
    entries = []
    if os.environ.get("DTRAK_MODEL_DIR"):
        entries.append(ModelEntry(os.environ.get("DTRAK_MODEL_NAME", "custom"), os.environ["DTRAK_MODEL_DIR"],
                                  os.environ.get("DTRAK_DATA_DIR") or None, "environment"))
    if not os.environ.get("DTRAK_HIDE_DEMO"):
        entries += [ModelEntry(name, str(folder), None, "embedded")
                    for name, folder in ((DEMO_NAME, paths.DEMO_MODEL_DIR), (MINI_NAME, paths.MINI_MODEL_DIR))
                    if (folder / "model_index.json").exists()]
    taken = {e.name for e in entries}
    entries.extend(e for e in _read(registry_path(cache_root)) if e.name not in taken)
    return entries


def register_model(name: str, model_dir: str | Path, data_dir: str | Path,
                   cache_root: str | Path | None = None, replace: bool = False,
                   label_column: str | None = None) -> ModelEntry:
    """Check and save a registration.

    ``label_column``: the metadata column naming each training image's artist or label (None or
    blank: :data:`DEFAULT_LABEL_COLUMN` when present); a chosen column must exist.

    Raises RegistryError (outside the allowed roots; the name is taken and ``replace`` is False;
    an embedded or environment model's name; the label column is not in the metadata),
    ValueError (a malformed name), ModelError (not a supported pipeline) or DatasetError (the
    training images are missing, unreadable or do not fit), each with the reason. Folders are
    checked against the roots before anything is read.
    """
    if not _NAME.match(name or ""):
        raise ValueError(f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    reserved = {e.name: e for e in list_models(cache_root) if e.source != "registered"}
    if name in reserved:
        raise RegistryError(f"model name {name!r} belongs to the {reserved[name].source} model; choose another name")
    roots = allowed_roots(cache_root)
    model_dir = _confined(model_dir, "model folder", roots)
    data_dir = _confined(data_dir, "training image folder", roots)
    label_column = (label_column or "").strip() or None
    model = load_model(model_dir)  # ModelError: not a (supported) pipeline
    # DatasetError: missing, unreadable, wrong size, wrong count
    train = load_training_set(model, data_dir, label_column or DEFAULT_LABEL_COLUMN)
    if label_column is not None and train.label_column != label_column:  # the loader drops an absent column
        columns = ", ".join(map(str, train.metadata.columns))
        raise RegistryError(f"training image folder {str(data_dir)!r} has no metadata column {label_column!r} "
                            f"to read labels from; its metadata.csv columns: {columns}")
    entry = ModelEntry(name, str(model_dir), str(data_dir), label_column=label_column)
    path = registry_path(cache_root)
    with hold_lock(path.with_suffix(".lock")):
        entries = _read(path)
        taken = next((e for e in entries if e.name == name), None)
        if taken is not None and not replace:
            raise RegistryError(f"a model named {name!r} is already registered (pipeline folder {taken.model_dir}, "
                                f"training images {taken.data_dir}); choose another name or ask to replace it")
        entries = [e for e in entries if e.name != name] + [entry]
        write_json_atomic(path, [{k: v for k, v in asdict(e).items() if k != "source"} for e in entries])
    return entry
