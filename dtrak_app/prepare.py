"""Prepare the app's first view: ``python -m dtrak_app.prepare`` (``make run`` calls it after ``data``).

The Attribute page opens on the default model (the first the registry lists: ``emoji3-demo``
on a fresh clone), the default method and settings (D-TRAK, K, k: ``common.DEFAULTS``) and the
gallery of generated samples. Everything that view needs beyond a few seconds of work is
computed here, deterministically and through the stores the app reads, so the first page load
shows real D-TRAK results instead of a wait:

1. the training features of the default model at the default settings (the feature store,
   keyed by the hashes of weights, scheduler, training images and settings; resumes a killed run);
2. the gallery samples (``GALLERY_SEEDS``, DDIM from fixed seeds; the samples folder, keyed by
   the model's files hash, every image checked against its recorded sha256);
3. the model's default lambda for the default method (``dtrak_core.evaluation.calibration``,
   cached beside the features' key);
4. the default target's scores (gallery seed 0) at that lambda, in the app's score cache (keyed
   by the hashes of model, data, method, feature settings and lambda).

Each step is a no-op when its output is already stored and intact (a second run loads the model,
verifies the stores and prints the same summary). Progress bars are tqdm's; the last line is a
one-line summary. Nothing here starts a background job.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import streamlit.logger

# The app's modules declare Streamlit caches, which warn "No runtime found" outside a served app:
# expected here (nothing is cached in this process), so not worth a line of `make run`'s output.
streamlit.logger.set_log_level("error")

from dtrak_app.common import (DEFAULTS, GALLERY_SEEDS, SAMPLER, Context, Target,  # noqa: E402
                              feature_settings, method_cache, samples, scores_for)
from dtrak_core import paths, registry
from dtrak_core.attribution.dataset_features import feature_status
from dtrak_core.attribution.loading import load_model, load_training_set
from dtrak_core.attribution.methods import METHODS, train_features
from dtrak_core.datasets import DatasetError
from dtrak_core.evaluation.calibration import Calibration, calibrate
from dtrak_core.generation import SAMPLES_FILE, default_samples_dir, generate_to_folder
from dtrak_core.models import ModelError, pipeline_files_hash


class PrepareError(ValueError):
    """The default model cannot be prepared; the message says why and what to do."""


@dataclass(frozen=True)
class Prepared:
    """What the first view will find, and what this run had to compute.

    Attributes:
        model: the registry name of the prepared model.
        images: training images featurized; features_computed: rows this run computed (0: cached).
        samples: gallery images ready; samples_computed: whether any had to be sampled.
        calibration: the default lambda and its source.
        seconds: wall time of the run.
    """

    model: str
    images: int
    features_computed: int
    samples: int
    samples_computed: bool
    calibration: Calibration
    seconds: float

    def summary(self) -> str:
        method = METHODS[DEFAULTS["method"]].label
        features = (f"computed {self.features_computed} of {self.images}" if self.features_computed
                    else f"{self.images} cached")
        samples = "sampled" if self.samples_computed else "cached"
        return (f"prepared {self.model}: {method} training features (K={DEFAULTS['K']}, k={DEFAULTS['k']}) "
                f"{features}; {self.samples} gallery samples {samples}; default lambda {self.calibration.lam:.3g} "
                f"({self.calibration.source}); {self.seconds:.0f} s")


def default_entry(name: str | None = None) -> registry.ModelEntry:
    """The model the app opens on (the registry's first entry), or the one called ``name``."""
    entries = registry.list_models(paths.cache_dir())
    if not entries:
        raise PrepareError("no model to prepare: models/emoji3-demo is missing and none is registered "
                           "(train it with `make demo-model`)")
    if name is None:
        return entries[0]
    for entry in entries:
        if entry.name == name:
            return entry
    raise PrepareError(f"--model {name!r} is not a registered model; expected one of "
                       f"{', '.join(e.name for e in entries)}")


def _recorded_seeds(index: Path) -> set[int]:
    """The seeds a samples folder's index lists (empty when it has none yet)."""
    try:
        return {int(s) for s in json.loads(index.read_text()).get("seeds", [])}
    except (OSError, ValueError, TypeError):
        return set()


def prepare(name: str | None = None, progress: bool = True) -> Prepared:
    """Compute (or find) the first view's training features, gallery samples, calibration and scores."""
    start = time.perf_counter()
    entry = default_entry(name)
    try:
        model = load_model(entry.model_dir)
        train = load_training_set(model, entry.data_dir)
    except (ModelError, DatasetError) as error:
        raise PrepareError(f"model {entry.name}: {error}") from None
    method = METHODS[DEFAULTS["method"]]
    settings = feature_settings(method, DEFAULTS["K"], DEFAULTS["k"])
    root = paths.features_dir()
    before = feature_status(model, train, settings, root)
    todo = 0 if before.state == "complete" else before.rows - before.rows_done
    features = train_features(model, train, settings, root, progress=progress)
    files_hash = pipeline_files_hash(entry.model_dir)
    # The samples folder skips every seed whose image is there and matches its recorded sha256.
    folder = default_samples_dir(files_hash, SAMPLER)
    recorded = _recorded_seeds(folder / SAMPLES_FILE)
    generate_to_folder(entry.model_dir, GALLERY_SEEDS, SAMPLER, folder, progress=progress)
    samples_computed = not set(GALLERY_SEEDS) <= recorded
    kernel = method_cache().kernel(features)  # one decomposition for the calibration and the scores
    calibration = calibrate(features, method.name, files_hash, settings_are_lds_defaults=True, kernel=kernel)
    # The default target's scores at the calibrated lambda (and at the app's fixed default, where it
    # still has one), in the app's score cache: the first view then needs neither the featurizer
    # nor the kernel (a link with another lambda scores as usual).
    seed = int(DEFAULTS["seed"])
    target = Target(samples(entry.model_dir, files_hash, (seed,))[0], f"seed {seed}", seed)
    for lam in dict.fromkeys(x for x in (calibration.lam, DEFAULTS.get("lambda")) if x is not None):
        scores_for(Context(entry, model, train, files_hash), target, method.name, DEFAULTS["K"], DEFAULTS["k"],
                   float(lam))
    return Prepared(entry.name, len(train), todo, len(GALLERY_SEEDS), samples_computed, calibration,
                    time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrak_app.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a registered model name (default: the one the app opens on)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    try:
        prepared = prepare(args.model, progress=not args.no_progress)
    except (PrepareError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(prepared.summary(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
