"""The models the app can attribute with: the embedded demo plus user-registered folders.

A registered model is a name, a diffusers pipeline folder and the folder of its training images
(for a model trained by us, ``recipe.json`` says which of those images were used; otherwise the
whole folder is the training set). Registrations live in ``<cache>/registry.json`` (written
atomically under a lock). Registration checks everything cheap before saving: the model folder
loads as a supported pipeline and its training set loads and fits the model; so the app only
ever reads files inside registered folders.

The environment may add one more entry (``DTRAK_MODEL_DIR`` and ``DTRAK_DATA_DIR``, named by
``DTRAK_MODEL_NAME``): tests and deployments point the app at a model this way.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from dtrak_core import paths
from dtrak_core.attribution.loading import load_model, load_training_set
from dtrak_core.io import write_json_atomic

REGISTRY_FILE = "registry.json"
DEMO_NAME = "emoji3-demo"
#: The small evaluation model: the LDS and counterfactual benchmarks' model, whose committed
#: results the Benchmark and Counterfactual pages show.
MINI_NAME = "emoji3-mini"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelEntry:
    """``data_dir`` None: the recipe's data folder (embedded models)."""

    name: str
    model_dir: str
    data_dir: str | None = None
    source: str = "registered"  # "embedded", "environment" or "registered"


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
                   cache_root: str | Path | None = None) -> ModelEntry:
    """Check and save a registration; raises ModelError / DatasetError / ValueError with the reason."""
    if not _NAME.match(name or ""):
        raise ValueError(f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    model_dir, data_dir = Path(model_dir).expanduser().resolve(), Path(data_dir).expanduser().resolve()
    model = load_model(model_dir)  # ModelError: not a (supported) pipeline
    load_training_set(model, data_dir)  # DatasetError: missing, unreadable, wrong size, wrong count
    entry = ModelEntry(name, str(model_dir), str(data_dir))
    path = registry_path(cache_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = [e for e in _read(path) if e.name != name] + [entry]
        write_json_atomic(path, [{k: v for k, v in asdict(e).items() if k != "source"} for e in entries])
    return entry
