"""Stage 4 of an LDS build: the measured outputs, one file per model, and reading them back.

``outputs/<job>.json`` (``job``: "report-003-s1", "tune-000-s0", "ensemble-s2", "full") holds the
model's losses (T,) on the targets, its weights hash and its timings; it is the per-model done
marker, written atomically with its checksum (:mod:`dtrak_core.evaluation.units`) by the worker
holding the model's lock. A file that fails its checksum counts as not done for the build (which
measures that model again) and is an error for every reader (never averaged into an LDS).
:func:`load_outputs` averages a role's subsets over their finished seeds for the LDS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtrak_core.evaluation.lds.config import OUTPUTS_DIR, TARGETS_DIR, read_build
from dtrak_core.evaluation.lds.targets import stored_target_count
from dtrak_core.evaluation.subsets import SubsetPlan
from dtrak_core.evaluation.units import CorruptUnitError, read_record, write_record

#: Fault point of an output file's write (``DTRAK_FAULT=lds.outputs@N``: the N-th file this run writes).
OUTPUT_POINT = "lds.outputs"
#: What a user does about a bad output file.
REDO_OUTPUT = "run 'lds build' again to measure that model again"


def output_path(out_dir: str | Path, job_name: str) -> Path:
    """``<out_dir>/outputs/<job_name>.json``."""
    return Path(out_dir) / OUTPUTS_DIR / f"{job_name}.json"


def read_output(out_dir: str | Path, job_name: str) -> dict | None:
    """The model's verified output record, None before its first measurement; a
    :class:`~dtrak_core.evaluation.units.CorruptUnitError` when the file fails its checksum."""
    return read_record(output_path(out_dir, job_name), REDO_OUTPUT)


def write_output(out_dir: str | Path, job_name: str, record: dict) -> dict:
    """Write the model's output record (atomic, checksummed; the caller holds the model's lock)."""
    return write_record(output_path(out_dir, job_name), record, OUTPUT_POINT)


def output_is_complete(out_dir: str | Path, job_name: str, num_targets: int) -> bool:
    """The model has a sound output file holding a loss for each of the ``num_targets`` targets
    (a file failing its checksum is not: the build measures the model again)."""
    try:
        record = read_output(out_dir, job_name)
    except CorruptUnitError:
        return False
    return record is not None and len(record["losses"]) == num_targets


def previous_output(out_dir: str | Path, job_name: str) -> dict | None:
    """The model's stored output record, None before its first measurement (raises
    :class:`~dtrak_core.evaluation.units.CorruptUnitError` for a file failing its checksum)."""
    return read_output(out_dir, job_name)


def with_timings(record: dict, previous: dict | None, extension: dict, timings: dict) -> dict:
    """The output record with its timings: a model's first measurement keeps them at the top
    level (the build's cost); each later addition of targets is a note under ``extensions``."""
    if previous is None:
        return {**record, **timings}
    first = {k: previous[k] for k in ("train_seconds", "measure_seconds") if k in previous}
    return {**record, **first, "extensions": previous.get("extensions", []) + [{**extension, **timings}]}


@dataclass
class MeasuredOutputs:
    """Measured losses of one role's subsets, averaged over the finished training seeds.

    masks: (M, n) bool; losses: (M, T); subset_names: (M,); seeds_done: (M,) seeds averaged.
    Subsets with no finished model are left out.
    """

    masks: np.ndarray
    losses: np.ndarray
    subset_names: list[str]
    seeds_done: list[int]

    @property
    def num_subsets(self) -> int:
        return len(self.subset_names)


def _complete_outputs(out_dir: Path) -> dict[str, dict]:
    """Every output record with a loss for each target, by job name (each file read once and
    verified: a file failing its checksum is an error, never averaged in)."""
    count = stored_target_count(out_dir / TARGETS_DIR)
    records = {path.stem: read_record(path, REDO_OUTPUT) for path in sorted((out_dir / OUTPUTS_DIR).glob("*.json"))}
    return {name: record for name, record in records.items() if len(record["losses"]) == count}


def load_outputs(out_dir: str | Path, role: str, plan: SubsetPlan | None = None) -> MeasuredOutputs:
    """The finished subset models' outputs of one role (``tune`` or ``report``).

    A model counts once it has a loss for every target (while targets are being added, the
    models not yet extended are left out). losses[m] = mean over the subset's finished seeds.
    """
    out = Path(out_dir)
    plan = plan or SubsetPlan.load(out)
    build = read_build(out)
    count = stored_target_count(out / TARGETS_DIR)
    complete = _complete_outputs(out)
    masks, losses, names, counts = [], [], [], []
    for subset in plan.by_role(role):
        per_seed = [complete[f"{subset.name}-s{seed}"]["losses"]
                    for seed in build["seeds"] if f"{subset.name}-s{seed}" in complete]
        if not per_seed:
            continue
        masks.append(subset.mask(plan.num_train))
        losses.append(np.mean(np.asarray(per_seed, dtype=np.float64), axis=0))
        names.append(subset.name)
        counts.append(len(per_seed))
    return MeasuredOutputs(np.array(masks, dtype=bool).reshape(len(masks), plan.num_train),
                           np.array(losses, dtype=np.float64).reshape(len(losses), count), names, counts)


def _median(values: list[float | None]) -> float | None:
    """Median of the known values; None when there is no record at all (NaN if none is known)."""
    return float(np.median([v for v in values if v is not None])) if values else None


def build_progress(out_dir: str | Path) -> dict:
    """How far a build is: models done per role, timings (median seconds per retrain)."""
    out = Path(out_dir)
    build = read_build(out)
    plan = SubsetPlan.load(out)
    summary: dict = {"seeds": build["seeds"]}
    complete = _complete_outputs(out)

    def done(name: str) -> bool:
        return name in complete

    train_times, measure_times = [], []
    for role in ("tune", "report"):
        names = [s.name for s in plan.by_role(role)]
        models = sum(done(f"{n}-s{s}") for n in names for s in build["seeds"])
        subsets_any = sum(any(done(f"{n}-s{s}") for s in build["seeds"]) for n in names)
        subsets_all = sum(all(done(f"{n}-s{s}") for s in build["seeds"]) for n in names)
        summary[role] = {"subsets": len(names), "models_done": models, "models_total": len(names) * len(build["seeds"]),
                         "subsets_with_any_seed": subsets_any, "subsets_with_all_seeds": subsets_all}
    for record in complete.values():
        if record.get("subset"):
            train_times.append(record.get("train_seconds"))
            measure_times.append(record.get("measure_seconds"))
    summary["ensemble_done"] = [s for s in build["ensemble_seeds"] if done(f"ensemble-s{s}")]
    summary["median_train_seconds"] = _median(train_times)
    summary["median_measure_seconds"] = _median(measure_times)
    return summary
