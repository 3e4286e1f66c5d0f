"""Stage 5 of the LDS benchmark: score matrices of attribution methods for the targets, and their LDS.

A *grid entry* is one row of the table: a method of :mod:`dtrak_core.attribution.methods` with
its settings (K timesteps, output function, which models). :func:`compute_scores` writes each
entry's scores for every lambda of a sweep as ``<build>/scores/<entry>.npz`` (``lambdas`` (L,),
``scores`` (L, T, n) float32; methods without lambda have L = 1 and lambda NaN). Training
features come from (and go to) the feature store, so entries sharing settings share them.

:func:`evaluate` picks each entry's lambda on the **tuning** subsets (best mean LDS, separately
for validation and generated targets) and reports the LDS on the **reported** subsets only,
with a 95% bootstrap CI over those subsets, in ``results/lds.json`` (the table is
:mod:`.report`'s).

Both follow the units' rules (:mod:`dtrak_core.evaluation.units`): an entry's ``.npz`` is written
by the worker holding its lock (``scores/<entry>.lock``), then its ``.json`` marker (identity and
the matrix file's sha256); a stored matrix is served only when both agree, else computed again.
``results/predictions.npz`` is written before ``results/lds.json``, which holds its checksum.
Fault points: ``lds.scores`` (a matrix file), ``lds.scores.marker``, ``lds.results.predictions``,
``lds.results``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


from dtrak_core.tasks import DiffusionTask
from dtrak_core.hashing import scheduler_config_hash, state_dict_hash
from dtrak_core.attribution.featurizer import FeatureSettings
from dtrak_core.attribution.methods import get_method, score_targets
from dtrak_core.attribution.loading import LoadedModel, load_model, load_training_set
from dtrak_core.conventions import DEFAULT_NUM_TIMESTEPS, DEFAULT_PROJECTION_DIM
from dtrak_core.evaluation.lds.config import (RESULTS_DIR, SCORES_DIR, TARGET_KINDS, TARGETS_DIR, LdsBuildConfig,
                                              ensemble_model_dir, read_build)
from dtrak_core.evaluation.lds.outputs import MeasuredOutputs, build_progress, load_outputs, output_is_complete
from dtrak_core.evaluation.lds.targets import Targets, stored_target_count
from dtrak_core.evaluation.metrics import (DEFAULT_NUM_BOOTSTRAP, common_factor_share, lds_per_target, lds_summary,
                                          paired_lds_difference, subset_predictions)
from dtrak_core.evaluation.subsets import SubsetPlan
from dtrak_core.evaluation.units import (RECORD_CHECKSUM, CorruptUnitError, check_file, clear_stale_temps,
                                         read_record, write_file, write_record)
from dtrak_core.io import ensure_writable, hold_lock, sha256_file, try_lock

#: Lambda sweep: half-decades 1e-2 .. 1e7 (the reference tuned 1e1..5e3 for DDPMs; our
#: features have another scale, so the sweep is wide; every lambda costs one matrix product).
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(float(10 ** (e / 2)) for e in range(-4, 15))
RESULTS_FILE = "lds.json"
PREDICTIONS_FILE = "predictions.npz"
#: Training images per featurizer batch of ``lds attribute`` (memory, not results).
DEFAULT_BATCH_SIZE = FeatureSettings.batch_size
#: The field of a score matrix's marker (and of ``results/lds.json``) holding its data file's sha256.
FILE_CHECKSUM = "file_sha256"
REDO_SCORES = "run 'lds attribute' again to compute it again"
REDO_RESULTS = "run 'lds score' again to write them again"
#: Disk ``results/lds.json`` takes at most (per-target LDS of every entry), besides the predictions.
RESULTS_BYTES = 1 << 20


@dataclass(frozen=True)
class GridEntry:
    """One row of the LDS table.

    models: "full" (the model itself), "checkpoints" (its kept training checkpoints, TracIn) or
    "ensemble" (the full model plus the build's full-data retrains with other seeds).
    """

    name: str
    label: str
    method: str
    num_timesteps: int | None = DEFAULT_NUM_TIMESTEPS
    output_fn: str | None = None
    models: str = "full"


DEFAULT_GRID: tuple[GridEntry, ...] = (
    GridEntry("trak-K10", "TRAK (loss), K=10", "trak", 10),
    GridEntry("trak-K100", "TRAK (loss), K=100", "trak", 100),
    GridEntry("dtrak-K10", "D-TRAK (square), K=10", "dtrak", 10),
    GridEntry("dtrak-K100", "D-TRAK (square), K=100", "dtrak", 100),
    GridEntry("avg-K10", "D-TRAK avg, K=10", "dtrak", 10, "avg"),
    GridEntry("l1-K10", "D-TRAK l1, K=10", "dtrak", 10, "l1"),
    GridEntry("l2-K10", "D-TRAK l2, K=10", "dtrak", 10, "l2"),
    GridEntry("linf-K10", "D-TRAK linf, K=10", "dtrak", 10, "linf"),
    GridEntry("elbo-K10", "D-TRAK elbo, K=10", "dtrak", 10, "elbo"),
    GridEntry("cosine-K10", "gradient cosine (square), K=10", "cosine", 10),
    GridEntry("tracin-K10", "TracIn (loss, checkpoints), K=10", "tracin", 10, None, "checkpoints"),
    GridEntry("relative-K10", "relative influence (square), K=10", "relative", 10),
    GridEntry("renormalized-K10", "renormalized influence (square), K=10", "renormalized", 10),
    GridEntry("pixel", "raw pixel cosine", "pixel", None),
    GridEntry("random", "random", "random", None),
    GridEntry("ensemble-K10", "D-TRAK ensemble, K=10", "dtrak", 10, None, "ensemble"),
)

#: The paper's ordering, as (claim, higher entry, lower entry): what the report checks ours against.
ORDERING_CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("square above loss (D-TRAK vs TRAK), K=10", "dtrak-K10", "trak-K10"),
    ("avg above loss, K=10", "avg-K10", "trak-K10"),
    ("l1 above loss, K=10", "l1-K10", "trak-K10"),
    ("l2 above loss, K=10", "l2-K10", "trak-K10"),
    ("linf below square, K=10", "dtrak-K10", "linf-K10"),
    ("elbo below square, K=10", "dtrak-K10", "elbo-K10"),
    ("K=100 above K=10, TRAK", "trak-K100", "trak-K10"),
    ("K=100 above K=10, D-TRAK", "dtrak-K100", "dtrak-K10"),
    ("square above loss, K=100", "dtrak-K100", "trak-K100"),
    ("ensemble above one model, D-TRAK K=10", "ensemble-K10", "dtrak-K10"),
    ("D-TRAK above TracIn, K=10", "dtrak-K10", "tracin-K10"),
    ("D-TRAK above raw pixel, K=10", "dtrak-K10", "pixel"),
    ("D-TRAK above random, K=10", "dtrak-K10", "random"),
)


def ordering_verdict(low: float, high: float, difference: float) -> str:
    """Words for a paired difference (higher - lower) and its CI."""
    if not np.isfinite(difference):
        return "undefined"
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return "holds by the mean, CI includes 0" if difference > 0 else "not shown, CI includes 0"


def ordering_checks(report: MeasuredOutputs, targets: Targets, predictions: dict[str, np.ndarray],
                    num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP,
                    claims: Sequence[tuple[str, str, str]] = ORDERING_CLAIMS) -> list[dict]:
    """Each claim of :data:`ORDERING_CLAIMS` per target kind: paired LDS difference (fractions), CI, verdict.

    predictions: ``"<entry>/<kind>"`` -> (T_kind, M) predictions on the reported subsets (what
    :func:`evaluate` computes); report: the reported subsets' measured outputs; a claim whose
    entries have none yet is "pending".
    """
    checks = []
    for claim, higher, lower in claims:
        row: dict = {"claim": claim, "higher": higher, "lower": lower}
        for kind in TARGET_KINDS:
            a, b = predictions.get(f"{higher}/{kind}"), predictions.get(f"{lower}/{kind}")
            if a is None or b is None:
                row[kind] = {"verdict": "pending"}
                continue
            losses = report.losses[:, targets.indices(kind)]
            difference, low, high = paired_lds_difference(a, b, losses, num_bootstrap)
            row[kind] = {"difference": difference, "ci_low": low, "ci_high": high,
                         "verdict": ordering_verdict(low, high, difference)}
        checks.append(row)
    return checks


def get_entry(name: str, grid: Sequence[GridEntry] = DEFAULT_GRID) -> GridEntry:
    for entry in grid:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown LDS grid entry {name!r}; expected one of {[e.name for e in grid]}")


def _checkpoint_models(model_dir: Path, task: DiffusionTask) -> list[LoadedModel]:
    """The kept checkpoints (``checkpoints/step-N``) of the model of ``task``, loaded as models of
    the same family, float32: raw denoiser weights (``train``), or adapter folders naming their base
    (``train-lora``), each loaded as a model."""
    from dtrak_core.lora import read_base

    folders = sorted((model_dir / "checkpoints").glob("step-*"))
    if not folders:
        raise ValueError(f"{model_dir} has no checkpoints/step-* folders; TracIn needs a model trained "
                         "with --keep-checkpoints")
    models = []
    for folder in folders:
        if read_base(folder) is not None:
            models.append(load_model(folder))
            continue
        denoiser = type(task.denoiser).from_pretrained(folder, use_safetensors=True,
                                                       low_cpu_mem_usage=False).float().eval()
        models.append(LoadedModel(folder, task.with_denoiser(denoiser), state_dict_hash(denoiser),
                                  scheduler_config_hash(task.scheduler)))
    return models


def entry_models(entry: GridEntry, build_dir: Path) -> list[LoadedModel]:
    """The loaded models an entry scores with (empty for an ensemble whose retrains are missing)."""
    build = read_build(build_dir)
    full = load_model(build["model_dir"])
    if entry.models == "full":
        return [full]
    if entry.models == "checkpoints":
        return _checkpoint_models(Path(build["model_dir"]), full.task)
    if entry.models == "ensemble":
        config = LdsBuildConfig(model_dir=build["model_dir"], out_dir=str(build_dir),
                                work_dir=build.get("work_dir"))
        count = stored_target_count(build_dir / TARGETS_DIR)
        done = [ensemble_model_dir(config, s) for s in build.get("ensemble_seeds", [])
                if output_is_complete(build_dir, f"ensemble-s{s}", count)]
        return [full] + [load_model(d) for d in done] if done else []
    raise ValueError(f"grid entry models {entry.models!r} is not 'full', 'checkpoints' or 'ensemble'")


def _stored_scores_match(path: Path, identity: dict) -> bool:
    """The entry's matrix file and its marker are sound and were made with ``identity`` (a marker
    from before checksums has no file checksum to check)."""
    try:
        marker = read_record(path.with_suffix(".json"), REDO_SCORES)
    except CorruptUnitError:
        return False
    if marker is None or not path.is_file():
        return False
    if {k: v for k, v in marker.items() if k not in (FILE_CHECKSUM, RECORD_CHECKSUM)} != identity:
        return False
    return FILE_CHECKSUM not in marker or sha256_file(path) == marker[FILE_CHECKSUM]


def _write_scores(path: Path, matrices: dict[float, np.ndarray], identity: dict) -> None:
    """The matrix file, then its marker (identity + the file's sha256), each atomic."""
    keys = list(matrices)

    def write_matrix(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, lambdas=np.array(keys, dtype=np.float64),
                     scores=np.stack([matrices[k] for k in keys]).astype(np.float32))

    digest = write_file(path, write_matrix, "lds.scores")
    write_record(path.with_suffix(".json"), {**identity, FILE_CHECKSUM: digest}, "lds.scores.marker")


def compute_scores(build_dir: str | Path, entries: Sequence[GridEntry] = DEFAULT_GRID,
                   lambdas: Sequence[float] = DEFAULT_LAMBDAS, projection_dim: int = DEFAULT_PROJECTION_DIM,
                   feature_root: str | Path | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: bool = True, force: bool = False) -> dict[str, str]:
    """Write ``scores/<entry>.npz`` for each entry; returns {entry: "written" | "cached" | why skipped}.

    An entry is recomputed only when its stored file was made with other models or settings, or
    fails its checksum. Several workers may run at once: each entry is computed by the worker that
    locks it; another goes on to the next entry and, at the end, waits for the ones still locked.
    """
    build_dir = Path(build_dir)
    build = read_build(build_dir)
    targets = Targets.load(build_dir / TARGETS_DIR)
    train = load_training_set(load_model(build["model_dir"]))
    num_lambdas = len(lambdas) if any(get_method(e.method).uses_lambda for e in entries) else 1
    ensure_writable(build_dir / SCORES_DIR, len(entries) * num_lambdas * len(targets) * len(train) * 4,
                    "LDS score matrices")
    status: dict[str, str] = {}

    def run(entry: GridEntry, recompute: bool) -> None:
        method = get_method(entry.method)
        models = entry_models(entry, build_dir)
        if not models:
            status[entry.name] = "skipped: no finished ensemble retrains yet"
            return
        settings = None
        if method.needs_features:
            settings = method.feature_settings(
                FeatureSettings(num_timesteps=entry.num_timesteps or DEFAULT_NUM_TIMESTEPS,
                                projection_dim=projection_dim, batch_size=batch_size), entry.output_fn)
        identity = {"entry": asdict(entry), "models": [m.state_dict_hash for m in models],
                    "settings": settings.key_fields() if settings else None,
                    "lambdas": [float(x) for x in lambdas] if method.uses_lambda else None,
                    "targets": int(len(targets.images)), "train": train.pixels_and_metadata_hash}
        path = build_dir / SCORES_DIR / f"{entry.name}.npz"
        if not recompute and _stored_scores_match(path, identity):
            status[entry.name] = "cached"
            return
        clear_stale_temps(path, path.with_suffix(".json"))  # a killed writer's: we hold the entry's lock
        matrices = score_targets(method, models, train, targets.images, settings, lambdas, feature_root,
                                 progress, seed=0, captions=targets.captions)
        _write_scores(path, matrices, identity)
        status[entry.name] = "written"

    waiting = []
    for entry in entries:
        with try_lock(build_dir / SCORES_DIR / f"{entry.name}.lock") as mine:
            if mine:
                run(entry, force)
            else:
                waiting.append(entry)
    for entry in waiting:
        # Another worker had it: wait for it, then use what it wrote (even when forced).
        with hold_lock(build_dir / SCORES_DIR / f"{entry.name}.lock"):
            run(entry, False)
    return {entry.name: status[entry.name] for entry in entries}


def load_scores(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(lambdas (L,), scores (L, T, n)) from an ``.npz`` of :func:`compute_scores` or a plain
    ``.npy`` score matrix (T, n) (then lambdas = [NaN]).

    A matrix of ``compute_scores`` (a ``.json`` marker beside it) must match the checksum in its
    marker (:class:`~dtrak_core.evaluation.units.CorruptUnitError` otherwise).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"score file {path} does not exist")
    if path.suffix == ".npy":
        scores = np.load(path)
        if scores.ndim != 2:
            raise ValueError(f"{path} holds an array of shape {scores.shape}; expected a score matrix (targets, train)")
        return np.array([np.nan]), scores[None]
    marker = read_record(path.with_suffix(".json"), REDO_SCORES)
    if marker is not None:
        check_file(path, marker.get(FILE_CHECKSUM), REDO_SCORES)
    with np.load(path) as data:
        if "scores" not in data or "lambdas" not in data:
            raise ValueError(f"{path} has no 'scores' and 'lambdas' arrays; expected a file of 'lds attribute'")
        return np.asarray(data["lambdas"]), np.asarray(data["scores"])


def evaluate_matrix(build_dir: str | Path, lambdas: np.ndarray, scores: np.ndarray,
                    num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP) -> tuple[dict, dict[str, np.ndarray]]:
    """LDS of one entry per target kind: lambda chosen on tuning subsets, reported on the rest.

    scores: (L, T, n). Returns (results per kind, predictions per kind (T_kind, M_report)).
    """
    build_dir = Path(build_dir)
    plan = SubsetPlan.load(build_dir)
    targets = Targets.load(build_dir / TARGETS_DIR)
    if scores.ndim != 3 or scores.shape[1] != len(targets.kinds) or scores.shape[2] != plan.num_train:
        raise ValueError(f"scores of shape {scores.shape[1:]} do not match the build's {len(targets.kinds)} targets x "
                         f"{plan.num_train} training images")
    tune, report = load_outputs(build_dir, "tune", plan), load_outputs(build_dir, "report", plan)
    results: dict = {}
    predictions: dict[str, np.ndarray] = {}
    for kind in TARGET_KINDS:
        rows = targets.indices(kind)
        if len(rows) == 0:
            continue
        record: dict = {"num_targets": int(len(rows)), "tune_subsets": tune.num_subsets,
                        "report_subsets": report.num_subsets}
        choice = 0
        if len(lambdas) > 1:
            if tune.num_subsets < 2:
                results[kind] = {**record, "status": "pending: fewer than 2 tuning subsets measured"}
                continue
            tuned: list[float | None] = []
            for i in range(len(lambdas)):
                values = lds_per_target(scores[i][rows], tune.masks, tune.losses[:, rows])
                tuned.append(float(np.nanmean(values)) if np.isfinite(values).any() else None)
            if all(t is None for t in tuned):
                results[kind] = {**record, "status": "undefined: no lambda gives a defined LDS on the tuning subsets"}
                continue
            choice = int(np.argmax([-np.inf if t is None else t for t in tuned]))
            record["tune_lds_by_lambda"] = {f"{lam:g}": t for lam, t in zip(lambdas.tolist(), tuned)}
        record["lambda"] = None if np.isnan(lambdas[choice]) else float(lambdas[choice])
        if report.num_subsets < 2:
            results[kind] = {**record, "status": "pending: fewer than 2 reported subsets measured"}
            continue
        chosen = scores[choice][rows]
        summary = lds_summary(chosen, report.masks, report.losses[:, rows], num_bootstrap=num_bootstrap)
        per_target = lds_per_target(chosen, report.masks, report.losses[:, rows])
        record.update(summary.to_dict(), status="measured",
                      per_target=[None if np.isnan(v) else float(v) for v in per_target])
        groups = [targets.groups[i] for i in rows]
        if len(set(groups)) > 1:
            # Same lambda and subsets; only the targets averaged differ.
            record["groups"] = {}
            for group in dict.fromkeys(groups):
                mine = np.array([g == group for g in groups])
                record["groups"][group] = lds_summary(chosen[mine], report.masks, report.losses[:, rows[mine]],
                                                      num_bootstrap=num_bootstrap).to_dict()
        predictions[kind] = subset_predictions(chosen, report.masks).astype(np.float32)
        results[kind] = record
    return results, predictions


def evaluate(build_dir: str | Path, entries: Sequence[GridEntry] = DEFAULT_GRID,
             num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP) -> dict:
    """LDS of every entry with stored scores; writes ``results/lds.json`` and ``results/predictions.npz``."""
    build_dir = Path(build_dir)
    results: dict = {"entries": {}, "progress": build_progress(build_dir)}
    arrays: dict[str, np.ndarray] = {}
    report = load_outputs(build_dir, "report")
    num_targets = stored_target_count(build_dir / TARGETS_DIR)
    ensure_writable(build_dir / RESULTS_DIR, RESULTS_BYTES + len(entries) * num_targets * report.num_subsets * 4,
                    "LDS results")
    results["report_subsets"] = report.subset_names
    for entry in entries:
        path = build_dir / SCORES_DIR / f"{entry.name}.npz"
        if not path.exists() or not path.with_suffix(".json").exists():  # no marker: not finished
            results["entries"][entry.name] = {"label": entry.label, "status": "pending: no scores yet"}
            continue
        lambdas, scores = load_scores(path)
        per_kind, predictions = evaluate_matrix(build_dir, lambdas, scores, num_bootstrap)
        results["entries"][entry.name] = {"label": entry.label, "kinds": per_kind}
        for kind, matrix in predictions.items():
            arrays[f"{entry.name}/{kind}"] = matrix
    if report.num_subsets >= 2:
        targets = Targets.load(build_dir / TARGETS_DIR)
        results["ordering"] = ordering_checks(report, targets, arrays, num_bootstrap)
        results["common_factor_share"] = {
            kind: common_factor_share(report.losses[:, targets.indices(kind)])
            for kind in TARGET_KINDS if len(targets.indices(kind)) >= 2}
    out = build_dir / RESULTS_DIR

    def write_predictions(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    # One writer at a time (the lock lives in the git-ignored scores/); the predictions first, then
    # the results that hold their checksum (the marker).
    with hold_lock(build_dir / SCORES_DIR / "results.lock"):
        clear_stale_temps(out / PREDICTIONS_FILE, out / RESULTS_FILE)
        results[FILE_CHECKSUM] = write_file(out / PREDICTIONS_FILE, write_predictions, "lds.results.predictions")
        results = write_record(out / RESULTS_FILE, results, "lds.results")
    return results


def read_results(build_dir: str | Path) -> dict:
    """``results/lds.json``, verified, with ``results/predictions.npz`` checked against it."""
    out = Path(build_dir) / RESULTS_DIR
    results = read_record(out / RESULTS_FILE, REDO_RESULTS)
    if results is None:
        raise FileNotFoundError(f"{out / RESULTS_FILE} does not exist; run 'lds score --build {build_dir}' first")
    check_file(out / PREDICTIONS_FILE, results.get(FILE_CHECKSUM), REDO_RESULTS)
    return results


def results_match_targets(results: dict, targets: Targets) -> bool:
    """Whether stored results were scored on the build's present targets (targets can be added
    to a build later; until ``lds attribute`` and ``lds score`` run again the results are stale)."""
    for entry in results.get("entries", {}).values():
        for kind, record in entry.get("kinds", {}).items():
            if record.get("num_targets") != len(targets.indices(kind)):
                return False
    return True


