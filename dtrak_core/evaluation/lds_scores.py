"""Score matrices of attribution methods for the LDS targets, their LDS, and the results table.

A *grid entry* is one row of the table: a method of :mod:`dtrak_core.attribution.methods` with
its settings (K timesteps, output function, which models). :func:`compute_scores` writes each
entry's scores for every lambda of a sweep as ``<build>/scores/<entry>.npz`` (``lambdas`` (L,),
``scores`` (L, T, n) float32; methods without lambda have L = 1 and lambda NaN). Training
features come from (and go to) the feature store, so entries sharing settings share them.

:func:`evaluate` picks each entry's lambda on the **tuning** subsets (best mean LDS, separately
for validation and generated targets) and reports the LDS on the **reported** subsets only,
with a 95% bootstrap CI over those subsets. :func:`write_report` turns the stored results into
``docs/benchmarks/lds.md``.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dtrak_core.evaluation.lds import (RESULTS_DIR, SCORES_DIR, SELECTION_GROUP, TARGET_KINDS, TARGETS_DIR,
                                       MeasuredOutputs, Targets, build_progress, ensemble_model_dir, load_outputs, output_path,
                                       read_build)
from dtrak_core.evaluation.metrics import (common_factor_share, lds_per_target, lds_summary, paired_lds_difference,
                                          subset_predictions)
from dtrak_core.evaluation.subsets import SubsetPlan
from dtrak_core.io import atomic_path, write_json_atomic
from dtrak_core.seeds import format_seeds

#: Lambda sweep: half-decades 1e-2 .. 1e7 (the reference tuned 1e1..5e3 for DDPMs; our
#: features have another scale, so the sweep is wide; every lambda costs one matrix product).
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(float(10 ** (e / 2)) for e in range(-4, 15))
RESULTS_FILE = "lds.json"
PREDICTIONS_FILE = "predictions.npz"
NOTES_FILE = "notes.md"


@dataclass(frozen=True)
class GridEntry:
    """One row of the LDS table.

    models: "full" (the model itself), "checkpoints" (its kept training checkpoints, TracIn) or
    "ensemble" (the full model plus the build's full-data retrains with other seeds).
    """

    name: str
    label: str
    method: str
    num_timesteps: int | None = 10
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

#: Published LDS (%) beside ours: CIFAR-2 (the paper's small DDPM), k = 32768 for TRAK/D-TRAK,
#: its ablation (k = 4096, validation only) for the output functions; None = not published.
PAPER_LDS: dict[str, tuple[str | None, str | None]] = {
    "trak-K10": ("11.4", "5.8"), "trak-K100": ("23.6", "15.9"),
    "dtrak-K10": ("26.8", "18.8"), "dtrak-K100": ("33.7", "25.7"),
    "avg-K10": ("24.9", None), "l1-K10": ("23.4", None), "l2-K10": ("24.7", None),
    "linf-K10": ("5.2", None), "elbo-K10": ("8.5", None),
    "cosine-K10": (None, None), "tracin-K10": ("~6", None), "relative-K10": ("11.2", None),
    "renormalized-K10": (None, None), "pixel": ("~8", None), "random": ("~0", "~0"),
    "ensemble-K10": ("D-TRAK +1.5..4", "D-TRAK +1.5..4"),
}


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
                    num_bootstrap: int = 1000,
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


def _checkpoint_models(model_dir: Path, scheduler):
    """The kept raw-weight checkpoints (``checkpoints/step-N``) as loaded models, float32."""
    from diffusers import UNet2DModel

    from dtrak_core.attribution.feature_store import model_weights_hash, scheduler_hash
    from dtrak_core.attribution.pipeline import LoadedModel

    folders = sorted((model_dir / "checkpoints").glob("step-*"))
    if not folders:
        raise ValueError(f"{model_dir} has no checkpoints/step-* folders; TracIn needs a model trained "
                         "with --keep-checkpoints")
    models = []
    for folder in folders:
        unet = UNet2DModel.from_pretrained(folder, use_safetensors=True, low_cpu_mem_usage=False).float().eval()
        models.append(LoadedModel(folder, unet, scheduler, model_weights_hash(unet), scheduler_hash(scheduler)))
    return models


def entry_models(entry: GridEntry, build_dir: Path) -> list:
    """The loaded models an entry scores with (empty for an ensemble whose retrains are missing)."""
    from dtrak_core.attribution.pipeline import load_model

    build = read_build(build_dir)
    full = load_model(build["model_dir"])
    if entry.models == "full":
        return [full]
    if entry.models == "checkpoints":
        return _checkpoint_models(Path(build["model_dir"]), full.scheduler)
    if entry.models == "ensemble":
        from dtrak_core.evaluation.lds import LdsBuildConfig

        config = LdsBuildConfig(model_dir=build["model_dir"], out_dir=str(build_dir),
                                work_dir=build.get("work_dir"))
        done = [ensemble_model_dir(config, s) for s in build.get("ensemble_seeds", [])
                if output_path(build_dir, f"ensemble-s{s}").exists()]
        return [full] + [load_model(d) for d in done] if done else []
    raise ValueError(f"grid entry models {entry.models!r} is not 'full', 'checkpoints' or 'ensemble'")


def compute_scores(build_dir: str | Path, entries: Sequence[GridEntry] = DEFAULT_GRID,
                   lambdas: Sequence[float] = DEFAULT_LAMBDAS, projection_dim: int = 2048,
                   feature_root: str | Path | None = None, batch_size: int = 16,
                   progress: bool = True, force: bool = False) -> dict[str, str]:
    """Write ``scores/<entry>.npz`` for each entry; returns {entry: "written" | "cached" | why skipped}.

    An entry is recomputed only when its stored file was made with other models or settings.
    """
    from dtrak_core.attribution.featurizer import FeatureSettings
    from dtrak_core.attribution.methods import get_method, score_targets
    from dtrak_core.attribution.pipeline import load_model, load_training_set

    build_dir = Path(build_dir)
    build = read_build(build_dir)
    targets = Targets.load(build_dir / TARGETS_DIR)
    train = load_training_set(load_model(build["model_dir"]))
    status: dict[str, str] = {}
    for entry in entries:
        method = get_method(entry.method)
        models = entry_models(entry, build_dir)
        if not models:
            status[entry.name] = "skipped: no finished ensemble retrains yet"
            continue
        settings = None
        if method.needs_features:
            settings = method.feature_settings(
                FeatureSettings(num_timesteps=entry.num_timesteps or 10, projection_dim=projection_dim,
                                batch_size=batch_size), entry.output_fn)
        identity = {"entry": asdict(entry), "models": [m.weights_hash for m in models],
                    "settings": settings.key_fields() if settings else None,
                    "lambdas": [float(x) for x in lambdas] if method.uses_lambda else None,
                    "targets": int(len(targets.images)), "train": train.content_hash}
        path = build_dir / SCORES_DIR / f"{entry.name}.npz"
        meta_path = path.with_suffix(".json")
        if not force and path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == identity:
            status[entry.name] = "cached"
            continue
        matrices = score_targets(method, models, train, targets.images, settings, lambdas, feature_root,
                                 progress, seed=0)
        keys = list(matrices)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, lambdas=np.array(keys, dtype=np.float64),
                         scores=np.stack([matrices[k] for k in keys]).astype(np.float32))
        write_json_atomic(meta_path, identity)
        status[entry.name] = "written"
    return status


def load_scores(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(lambdas (L,), scores (L, T, n)) from an ``.npz`` of :func:`compute_scores` or a plain
    ``.npy`` score matrix (T, n) (then lambdas = [NaN])."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"score file {path} does not exist")
    if path.suffix == ".npy":
        scores = np.load(path)
        if scores.ndim != 2:
            raise ValueError(f"{path} holds an array of shape {scores.shape}; expected a score matrix (targets, train)")
        return np.array([np.nan]), scores[None]
    with np.load(path) as data:
        if "scores" not in data or "lambdas" not in data:
            raise ValueError(f"{path} has no 'scores' and 'lambdas' arrays; expected a file of 'lds attribute'")
        return np.asarray(data["lambdas"]), np.asarray(data["scores"])


def evaluate_matrix(build_dir: str | Path, lambdas: np.ndarray, scores: np.ndarray,
                    num_bootstrap: int = 1000) -> tuple[dict, dict[str, np.ndarray]]:
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


def evaluate(build_dir: str | Path, entries: Sequence[GridEntry] = DEFAULT_GRID, num_bootstrap: int = 1000) -> dict:
    """LDS of every entry with stored scores; writes ``results/lds.json`` and ``results/predictions.npz``."""
    build_dir = Path(build_dir)
    results: dict = {"entries": {}, "progress": build_progress(build_dir)}
    arrays: dict[str, np.ndarray] = {}
    report = load_outputs(build_dir, "report")
    results["report_subsets"] = report.subset_names
    for entry in entries:
        path = build_dir / SCORES_DIR / f"{entry.name}.npz"
        if not path.exists():
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
    write_json_atomic(out / RESULTS_FILE, results)
    with atomic_path(out / PREDICTIONS_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return results


def results_match_targets(results: dict, targets: Targets) -> bool:
    """Whether stored results were scored on the build's present targets (targets can be added
    to a build later; until ``lds attribute`` and ``lds score`` run again the results are stale)."""
    for entry in results.get("entries", {}).values():
        for kind, record in entry.get("kinds", {}).items():
            if record.get("num_targets") != len(targets.indices(kind)):
                return False
    return True


def _cell(record: dict | None) -> str:
    if not record or record.get("status") != "measured":
        return "pending"
    return f"{100 * record['mean']:.1f} [{100 * record['ci_low']:.1f}, {100 * record['ci_high']:.1f}]"


def _difference_cell(check: dict) -> str:
    if "difference" not in check:
        return check["verdict"]
    return (f"{100 * check['difference']:+.1f} [{100 * check['ci_low']:+.1f}, {100 * check['ci_high']:+.1f}]: "
            f"{check['verdict']}")


def _lambda_cell(entry_results: dict) -> str:
    kinds = entry_results.get("kinds", {})
    values = [kinds.get(k, {}).get("lambda") for k in TARGET_KINDS]
    if all(v is None for v in values):
        return "-"
    return " / ".join("-" if v is None else f"{v:g}" for v in values)


def _feature_summary(build_dir: Path) -> str:
    """Projection settings of the stored score files, e.g. "sjlt projection, k = 2048"."""
    seen = set()
    for meta in sorted((build_dir / SCORES_DIR).glob("*.json")):
        settings = json.loads(meta.read_text()).get("settings")
        if settings:
            seen.add(f"{settings['projector']} projection, k = {settings['projection_dim']}")
    return "; ".join(sorted(seen)) or "no gradient features yet"


def build_command(build: dict, build_dir: Path) -> str:
    """The ``lds build`` command line that makes (or resumes) the build recorded in ``lds.json``."""
    identity = build["identity"]
    seeds = build["generated_seeds"] if "generated_seeds" in build else identity["generated_seeds"]
    generated = format_seeds(seeds)
    parts = ["python -m dtrak_core lds build", f"--model {build['model_dir']}", f"--out {build_dir}",
             f"--subsets {build['num_subsets']}", f"--tuning-subsets {build['num_tuning_subsets']}",
             f"--seeds {','.join(map(str, build['seeds']))}", f"--alpha {identity['alpha']:g}",
             f"--subset-seed {identity['subset_seed']}", f"--steps-rule {identity['steps_rule']}",
             f"--measure-timesteps {identity['measure_timesteps']}", f"--measure-noise {identity['measure_noise']}",
             f"--generated-seeds {generated}"]
    if build.get("ensemble_seeds"):
        parts.append(f"--ensemble-seeds {','.join(map(str, build['ensemble_seeds']))}")
    if identity.get("max_validation") is not None:
        parts.append(f"--max-validation {identity['max_validation']}")
    parts += [f"--extra-validation {shlex.quote(spec)}" for spec in build.get("extra_validation", [])]
    if build.get("work_dir"):
        parts.append(f"--work-dir {build['work_dir']}")
    return " ".join(parts)


def _validation_description(targets: Targets, max_validation: int | None) -> str:
    counts = Counter(targets.groups[i] for i in targets.indices("validation"))
    own = counts.pop(SELECTION_GROUP, 0)
    which = f"the first {own}" if max_validation is not None else f"all {own}"
    if not counts:
        return f"{own} validation images ({which} held-out images of the model's selection)"
    parts = [f"{which} held-out images of the model's selection"]
    parts += [f"{n} held-out images where {group}" for group, n in counts.items()]
    return f"{len(targets.indices('validation'))} validation images ({' + '.join(parts)})"


def _group_table(results: dict, entries: Sequence[GridEntry], targets: Targets) -> list[str]:
    """LDS on each group of validation targets (only when there is more than one group)."""
    groups = list(dict.fromkeys(targets.groups[i] for i in targets.indices("validation")))
    if len(groups) < 2:
        return []
    names = {SELECTION_GROUP: "the model's selection"}
    lines = ["", "### Validation targets by group", "",
             "The validation column above, split by where the held-out images come from (same lambda, same "
             "subsets).", "",
             "| method | " + " | ".join(f"{names.get(g, g)} ({int(np.sum(np.array(targets.groups) == g))})"
                                       for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for entry in entries:
        by_group = results["entries"].get(entry.name, {}).get("kinds", {}).get("validation", {}).get("groups", {})
        if by_group:
            cells = [_cell({**by_group[g], "status": "measured"}) if g in by_group else "pending" for g in groups]
            lines.append(f"| {entry.label} | " + " | ".join(cells) + " |")
    return lines


def write_report(build_dir: str | Path, out_path: str | Path, command: str,
                 entries: Sequence[GridEntry] = DEFAULT_GRID) -> Path:
    """Write the markdown LDS table from ``results/lds.json`` (run ``evaluate`` first)."""
    build_dir = Path(build_dir)
    results_path = build_dir / RESULTS_DIR / RESULTS_FILE
    if not results_path.exists():
        raise FileNotFoundError(f"{results_path} does not exist; run 'lds score --build {build_dir}' first")
    results = json.loads(results_path.read_text())
    build = read_build(build_dir)
    progress = results["progress"]
    targets = Targets.load(build_dir / TARGETS_DIR)
    rep, tune = progress["report"], progress["tune"]
    complete = rep["models_done"] == rep["models_total"] and tune["models_done"] == tune["models_total"]
    status = "complete" if complete else "PARTIAL"
    lines = [
        "# LDS benchmark (mini model)", "",
        f"**Status: {status}.** Reported subsets measured: {rep['subsets_with_any_seed']} of {rep['subsets']} "
        f"({rep['subsets_with_all_seeds']} with all {len(build['seeds'])} seeds; {rep['models_done']} of "
        f"{rep['models_total']} models). Tuning subsets: {tune['subsets_with_any_seed']} of {tune['subsets']} "
        f"({tune['models_done']} of {tune['models_total']} models). Ensemble retrains done: "
        f"{len(progress['ensemble_done'])} of {len(build.get('ensemble_seeds', []))}.", "",
        "LDS (%) = mean over targets of the Spearman correlation, over the reported subsets, between "
        "sum_{j in S} tau_j and the negated diffusion loss of the subset model; [95% bootstrap CI over "
        "subsets]. lambda chosen per method and target kind on the separate tuning subsets. \"pending\": "
        "fewer than 2 reported subsets (or, for methods with a lambda, 2 tuning subsets) measured so far, or "
        "no score matrix yet. Numbers from few subsets have wide CIs: read them with the CI.", "",
        f"- model: `{build['model_dir']}` (hash {build['model_hash'][:12]}), {targets.images.shape[1]} px, "
        f"{SubsetPlan.load(build_dir).num_train} training images; alpha = {build['identity']['alpha']}, "
        f"stratified by {build['identity']['stratify_column']}, steps rule "
        f"'{build['identity']['steps_rule']}' (same epochs: half the steps and warm-up on half the data)",
        f"- targets: {_validation_description(targets, build['identity'].get('max_validation'))}, "
        f"{len(targets.indices('generated'))} generated images (DDIM {build['identity']['sampler_steps']} steps)",
        f"- model output: diffusion loss over {build['identity']['measure_timesteps']} timesteps x "
        f"{build['identity']['measure_noise']} noise draw(s), identical for every model, averaged over seeds",
        f"- features: {_feature_summary(build_dir)} (paper: k = 32768; its output-function ablation k = 4096)",
    ]
    if progress.get("median_train_seconds") is not None:
        lines.append(f"- one subset retrain took {progress['median_train_seconds']:.0f} s (median; trainer's wall "
                     f"clock, one thread) + {progress['median_measure_seconds']:.0f} s measuring, on a CPU "
                     "shared with other jobs")
    shares = results.get("common_factor_share", {})
    if shares:
        lines.append("- shared variation: the first principal component of the reported subsets' losses carries "
                     + " and ".join(f"{100 * v:.0f}% ({k})" for k, v in shares.items())
                     + " of their variance across subsets: every target's loss rising or falling together with "
                     "the subset model, which per-target scores cannot predict; the larger it is, the wider the CIs")
    lines += ["", "| method | ours: validation | ours: generated | lambda (val / gen) | paper val (CIFAR-2) "
              "| paper gen (CIFAR-2) |", "|---|---|---|---|---|---|"]
    for entry in entries:
        record = results["entries"].get(entry.name, {})
        kinds = record.get("kinds", {})
        paper_val, paper_gen = PAPER_LDS.get(entry.name, (None, None))
        lines.append(f"| {entry.label} | {_cell(kinds.get('validation'))} | {_cell(kinds.get('generated'))} | "
                     f"{_lambda_cell(record)} | {paper_val or '-'} | {paper_gen or '-'} |")
    lines += _group_table(results, entries, targets)
    if results.get("ordering"):
        lines += ["", "## The paper's ordering, checked", "",
                  "Paired difference LDS(higher) - LDS(lower) in points, on the same targets and reported subsets, "
                  "with a 95% paired bootstrap CI over subsets (both methods scored on each resample). "
                  "\"holds\": the CI is above 0.", "",
                  "| claim | validation | generated |", "|---|---|---|"]
        for row in results["ordering"]:
            lines.append(f"| {row['claim']} | {_difference_cell(row['validation'])} | "
                         f"{_difference_cell(row['generated'])} |")
    notes = build_dir / NOTES_FILE
    if notes.exists():
        # Hand-written discussion (why ours differs from the paper), kept with the build it discusses.
        lines += ["", notes.read_text().strip()]
    lines += ["", "Paper numbers: Zheng et al. 2024, CIFAR-2 (5000 images, 32 px, 38M-parameter UNet, 64 subsets x 3 "
              "seeds, 1000 timesteps x 3 noise draws per output); ours is a 16 px, 0.7M-parameter model on "
              f"{SubsetPlan.load(build_dir).num_train} images, so compare orderings, not absolute values.", "",
              "Build (resumable: run it again after a kill and it continues with the next unfinished model), "
              "score every method, regenerate this file (as more subsets finish):", "", "```bash",
              build_command(build, build_dir), "python -m dtrak_core lds attribute --build " + str(build_dir),
              command, "```", ""]
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        tmp.write_text("\n".join(lines))
    return out_path
