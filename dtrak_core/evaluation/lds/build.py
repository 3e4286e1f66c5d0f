"""Stage 3 of an LDS build: the work queue of retrains and :func:`build_lds`, which runs it.

For every (subset, training seed) :func:`build_lds` retrains the full model's recipe on the
subset (:func:`dtrak_core.evaluation.retrain.subset_train_config`, same-epochs rule), measures
the targets (:mod:`.measure`), writes the output file (:mod:`.outputs`) and deletes the subset
model's weights. Ensemble models (full data, other seeds) are kept.

Killed at any point, running it again skips every model with a sound output file and resumes
the interrupted training from its last checkpoint (``checkpoint_every`` steps). Several workers
may share one build: each model is trained by whichever locks it first. The build file, the
targets and the subsets are written by one worker at a time (the build lock), each model's output
by the worker holding that model's lock; every file is atomic and checksummed
(:mod:`dtrak_core.evaluation.units`), a kill's temporary files are cleared by the next holder of
the lock, and an output file that fails its checksum is measured again (its model retrained).

Fault points (``DTRAK_FAULT``, see :func:`dtrak_core.io.fault_point`), in the order a first build
meets them: ``lds.targets.images``, ``lds.targets``, ``lds.build_file``, ``lds.subsets``,
``lds.outputs`` (the full model's, then each model's), ``lds.retrain.model`` (a model trained, not
yet measured), ``lds.retrain.cleanup`` (its output written, its weights not yet deleted).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from dtrak_core.attribution.loading import load_model, load_training_set
from dtrak_core.evaluation.lds.config import (BUILD_FILE, OUTPUTS_DIR, RUNS_DIR, SCORES_DIR, TARGETS_DIR,
                                              LdsBuildConfig, ensemble_model_dir, merged_build_record,
                                              write_build_record)
from dtrak_core.evaluation.lds.measure import measure_new_targets, measure_timesteps
from dtrak_core.evaluation.lds.outputs import (output_is_complete, output_path, previous_output, with_timings,
                                               write_output)
from dtrak_core.evaluation.lds.targets import TargetSource, Targets, ensure_targets, stored_target_count
from dtrak_core.evaluation.retrain import (full_data_train_config, read_retrain_recipe, recipe_trainer, retrain,
                                           retrain_bytes, subset_train_config)
from dtrak_core.evaluation.subsets import SUBSETS_FILE, SubsetPlan, make_plan
from dtrak_core.evaluation.units import CorruptUnitError, clear_stale_temps, write_atomic
from dtrak_core.io import ensure_writable, fault_point, hold_lock, try_lock
from dtrak_core.models import RECIPE_FILE, pipeline_files_hash
from dtrak_core.progress import progress_bar

#: Disk an output file takes per target (one float as JSON text) and besides its losses.
OUTPUT_BYTES_PER_TARGET, OUTPUT_BYTES_FIXED = 32, 4096
#: What the build writes into its folder: models and score matrices are big and re-computable;
#: outputs and subsets are the record.
GITIGNORE_TEXT = f"{RUNS_DIR}/\n{SCORES_DIR}/\n"


class TargetsChangedError(RuntimeError):
    """Another worker added targets to the build while this one was running it (run it again)."""


@dataclass(frozen=True)
class ModelJob:
    """One model of the build: a subset retrain or a full-data ensemble retrain."""

    name: str                # "report-003-s1", "ensemble-s2"
    subset: str | None       # subset name, None for an ensemble model
    seed: int


def job_queue(config: LdsBuildConfig, plan: SubsetPlan) -> list[ModelJob]:
    """Models in the order they are trained.

    Seed-major (all subsets with the first seed, then the next seed) so an interrupted build has
    as many distinct subsets as possible. Within a seed, the first two tuning subsets alternate
    with the first reported ones (two of each is the least that gives a tuned LDS), then tuning
    and reported subsets are interleaved in proportion to their numbers. The ensemble models come
    after the first seed pass.
    """
    tune, report = plan.by_role("tune"), plan.by_role("report")

    def interleaved():
        def tune_key(i: int) -> float:
            # The first two at the reported subsets' pace, the rest spread over the pass.
            return (i + 0.5) / max(len(report), 1) if i < 2 else (i + 0.5) / len(tune)

        keyed = [(tune_key(i), 0, s) for i, s in enumerate(tune)]
        keyed += [((i + 0.5) / len(report), 1, s) for i, s in enumerate(report)]
        return [s for _, _, s in sorted(keyed, key=lambda x: (x[0], x[1]))]

    jobs: list[ModelJob] = []
    for position, seed in enumerate(config.seeds):
        jobs += [ModelJob(f"{s.name}-s{seed}", s.name, seed) for s in interleaved()]
        if position == 0:
            jobs += [ModelJob(f"ensemble-s{e}", None, e) for e in config.ensemble_seeds]
    return jobs


def _run_dir(config: LdsBuildConfig, job: ModelJob) -> Path:
    return ensemble_model_dir(config, job.seed) if job.subset is None else config.work / job.name


def _lock_path(config: LdsBuildConfig, job: ModelJob) -> Path:
    return config.work / f"{job.name}.lock"


def _remove_finished_model(config: LdsBuildConfig, job: ModelJob) -> None:
    """Delete a measured subset model's weights (a kill between measuring and deleting leaves them)
    and its lock file. Called under the model's lock; a worker still waiting on the old file finds
    the output complete and skips."""
    run_dir = _run_dir(config, job)
    if job.subset is not None and not config.keep_models and run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    _lock_path(config, job).unlink(missing_ok=True)


def _train_config(config: LdsBuildConfig, job: ModelJob, plan: SubsetPlan, recipe: dict):
    """The job's config for the recipe's trainer (a ``TrainConfig``, a ``LoraTrainConfig``): the
    recipe on its subset (same-epochs rule), or on all data with its seed for an ensemble model."""
    run_dir = _run_dir(config, job)
    trainer = recipe_trainer(recipe)
    if job.subset is None:
        return full_data_train_config(recipe["config"], job.seed, run_dir, config.checkpoint_every, trainer)
    return subset_train_config(recipe["config"], plan.get(job.subset).indices, job.seed, run_dir,
                               config.steps_rule, config.checkpoint_every, trainer)


def _train_and_measure(config: LdsBuildConfig, job: ModelJob, plan: SubsetPlan, recipe: dict, targets: Targets,
                       timesteps: Sequence[int], progress: bool, bar) -> None:
    """Train one model of the queue (resuming its checkpoint), measure the targets, write its output file."""
    train_config = _train_config(config, job, plan, recipe)
    model = retrain(train_config, progress=progress)
    fault_point("lds.retrain.model")
    started = time.time()
    previous = _previous_output(config, job.name, bar.write)
    losses, extension = measure_new_targets(model.model_dir, model.files_hash, previous, targets, timesteps, config)
    measure_seconds = time.time() - started
    recipe_out = json.loads((model.model_dir / RECIPE_FILE).read_text())
    record = {
        "job": job.name, "subset": job.subset, "seed": job.seed, "steps": train_config.steps,
        "num_train_images": recipe_out["num_train_images"], "model_hash": model.files_hash,
        "final_loss_ema": recipe_out.get("final_loss_ema"), "losses": losses.tolist()}
    # The trainer's own clock covers all sessions of a resumed run; ours only this one.
    timings = {"train_seconds": recipe_out.get("wall_seconds", round(model.seconds, 1)),
               "measure_seconds": round(measure_seconds, 2)}
    write_output(config.out_dir, job.name, with_timings(record, previous, extension, timings))
    fault_point("lds.retrain.cleanup")
    _remove_finished_model(config, job)
    bar.update(1)
    bar.write(f"{job.name}: trained {train_config.steps} steps in {recipe_out.get('wall_seconds')} s, "
              f"measured in {measure_seconds:.1f} s, mean target loss {losses.mean():.4f}")


def _previous_output(config: LdsBuildConfig, job_name: str, say) -> dict | None:
    """The model's stored output record before this measurement; None for one that fails its
    checksum (said with ``say``): then every target is measured again."""
    try:
        return previous_output(config.out_dir, job_name)
    except CorruptUnitError:
        say(f"{output_path(config.out_dir, job_name)} fails its checksum: measuring {job_name} again")
        return None


def _measure_full_model(config: LdsBuildConfig, full_hash: str, seed: int, targets: Targets,
                        timesteps: Sequence[int], say) -> None:
    """The full model's outputs (``outputs/full.json``), extended like any model's when targets grow."""
    started = time.time()
    previous = _previous_output(config, "full", say)
    losses, extension = measure_new_targets(Path(config.model_dir), full_hash, previous, targets, timesteps, config)
    record = {"job": "full", "subset": None, "seed": seed, "model_hash": full_hash, "losses": losses.tolist()}
    write_output(config.out_dir, "full",
                 with_timings(record, previous, extension, {"measure_seconds": round(time.time() - started, 2)}))
    say(f"full: measured in {time.time() - started:.1f} s, mean target loss {losses.mean():.4f}")


def _save_plan(out: Path, plan: SubsetPlan) -> None:
    """Write ``subsets.json`` (under the build lock) unless it already holds ``plan``: an unchanged
    plan keeps its bytes (a committed build from before checksums too); a bad file is rewritten."""
    clear_stale_temps(out / SUBSETS_FILE)
    try:
        stored = SubsetPlan.load(out) if (out / SUBSETS_FILE).exists() else None
    except CorruptUnitError:
        stored = None
    if stored is None or stored.to_dict() != plan.to_dict():
        plan.save(out)


def _check_space(config: LdsBuildConfig, num_targets: int, pending: Sequence[ModelJob]) -> None:
    """Before any training: room for the output files of ``pending`` and for the models they
    train at once (subset models are deleted after measuring unless ``keep_models``)."""
    ensure_writable(Path(config.out_dir) / OUTPUTS_DIR,
                    len(pending) * (num_targets * OUTPUT_BYTES_PER_TARGET + OUTPUT_BYTES_FIXED), "LDS outputs")
    kept = sum(job.subset is None or config.keep_models for job in pending)
    at_once = kept + (kept < len(pending))
    ensure_writable(config.work, at_once * retrain_bytes(config.model_dir), "LDS retrained models")


def build_lds(config: LdsBuildConfig, progress: bool = True, max_models: int | None = None) -> dict:
    """Run (or resume) an LDS build; returns {"done": models finished, "total": models planned}.

    ``max_models`` stops after training that many models in this call (for tests and for
    measuring one retrain); run again to continue.
    """
    full_model = load_model(config.model_dir)  # a clear error for a folder that is not a pipeline
    # The model's own T (its scheduler's num_train_timesteps) bounds the measured timesteps.
    num_train_timesteps = full_model.task.num_train_timesteps
    config.validate(num_train_timesteps)
    timesteps = measure_timesteps(config.measure_timesteps, num_train_timesteps)
    recipe = read_retrain_recipe(config.model_dir)  # a trainer we can replay (a LoRA: on its unchanged base)
    train_set = load_training_set(full_model, label_column=config.stratify_column)
    labels = train_set.labels or ["all"] * len(train_set)
    source = TargetSource.of(full_model, train_set)
    config = config.for_model(source.captioned, config.model_dir)  # a text-to-image model's guidance scale
    out = Path(config.out_dir)
    ensure_writable(out, 0, "LDS build")
    ensure_writable(config.work, 0, "LDS retrained models")
    full_hash = pipeline_files_hash(config.model_dir)
    # One worker at a time reads, grows and writes the build file, the targets and the subsets.
    with hold_lock(config.work / "build.lock"):
        out.mkdir(parents=True, exist_ok=True)
        gitignore = out / ".gitignore"
        if not gitignore.exists():
            clear_stale_temps(gitignore)
            write_atomic(gitignore, lambda tmp: tmp.write_text(GITIGNORE_TEXT), "lds.gitignore")
        record = merged_build_record(config, full_hash, recipe, timesteps)
        config = replace(config, num_subsets=record["num_subsets"], num_tuning_subsets=record["num_tuning_subsets"],
                         seeds=record["seeds"], ensemble_seeds=record["ensemble_seeds"],
                         extra_validation=record["extra_validation"])
        # Targets first: a filter that selects nothing must not enter the build file.
        targets = ensure_targets(config, recipe, source, out / TARGETS_DIR, progress)
        clear_stale_temps(out / BUILD_FILE)
        write_build_record(out, record)
        plan = make_plan(labels, config.num_subsets, config.num_tuning_subsets, config.alpha, config.subset_seed,
                         config.stratify_column if train_set.labels else None)
        _save_plan(out, plan)

    if not output_is_complete(out, "full", len(targets)):
        with hold_lock(config.work / "full.lock"):
            if not output_is_complete(out, "full", len(targets)):
                clear_stale_temps(output_path(out, "full"))
                _measure_full_model(config, full_hash, recipe["config"]["seed"], targets, timesteps, print)

    jobs = job_queue(config, plan)

    def complete(job: ModelJob) -> bool:
        return output_is_complete(out, job.name, len(targets))

    pending = [job for job in jobs if not complete(job)]
    _check_space(config, len(targets), pending if max_models is None else pending[:max_models])
    bar = progress_bar(total=len(jobs), initial=len(jobs) - len(pending), desc="lds models", unit="model",
                       disable=not progress)
    trained = 0
    for job in jobs:
        now = stored_target_count(out / TARGETS_DIR)
        if now != len(targets):
            # Another worker added targets: this one's view of "finished" is out of date.
            raise TargetsChangedError(f"{out / TARGETS_DIR / 'targets.json'} now has {now} targets; this "
                               f"worker started with {len(targets)}: run it again to go on with the new targets")
        if max_models is not None and trained >= max_models and not complete(job):
            break
        # Several workers may share one build (one per core): each model is trained by whichever
        # worker locks it first; the others move on to the next unfinished model. Finished models
        # are tidied only under their lock, never while another worker is retraining them.
        with try_lock(_lock_path(config, job)) as mine:
            if not mine:
                continue
            if complete(job):
                _remove_finished_model(config, job)
                continue
            clear_stale_temps(output_path(out, job.name))  # a killed writer's, never a live one's: we hold the lock
            _train_and_measure(config, job, plan, recipe, targets, timesteps, progress, bar)
        trained += 1
    bar.close()
    return {"done": sum(map(complete, jobs)), "total": len(jobs)}
