"""The mechanics of a training run in its output folder, shared by every trainer.

A trainer (``training.train``; the Stable Diffusion trainers use the same rules) owns its model,
optimiser and steps; a :class:`TrainingRun` owns what happens on disk:

- **one writer**: the folder is locked (``.train.lock``) for as long as a run writes it;
- **up-front check**: before any step, the folder must be writable and have the bytes the run
  will need (:class:`Footprint`), else one line naming the folder and the numbers;
- **resume**: ``train_state.pt`` holds the trainer's state with the run's config, its step and
  a digest of its contents; a rerun continues from it once :func:`check_resume` agrees that the
  new settings describe the same run (a run that continues must end as if it had never stopped);
- **atomic final write**: the finished model is written into a staging folder, moved into place
  part by part, and ``train_complete.json`` (steps done, config, sha256 of every file) is
  written last. The marker is removed before the first part moves, so a folder that holds a
  state and no marker is always a run being written or interrupted; readers refuse it
  (:func:`refuse_unfinished`) and a rerun repairs it from the state;
- **checkpoints**: ``checkpoints/step-N/`` appears by one rename, whole or not at all.

A run's folder::

    train_config.json          the run's settings, for people (the state holds the copy that counts)
    train_state.pt             everything needed to continue: the trainer's tensors, step, config, digest
    checkpoints/step-0000500/  kept intermediate weights (optional)
    model_index.json, unet/... the finished model (what the trainer's ``write`` puts there)
    recipe.json                how the model was made (data, settings, steps, wall time, machine)
    train_complete.json        written last: steps done, config, sha256 of the files above

Fault points (``DTRAK_FAULT``, see :func:`dtrak_core.io.fault_point`): ``train.state`` (a state
written, not yet renamed), ``train.checkpoint`` (a checkpoint written, not yet renamed),
``train.pipeline`` (before each part of the finished model moves in), ``train.marker`` (every
part in place, no marker yet).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtrak_core.io import (atomic_path, ensure_writable, fault_point, sha256_file, try_lock,
                           write_json_atomic)

STATE_FILE = "train_state.pt"
CONFIG_FILE = "train_config.json"
MARKER_FILE = "train_complete.json"
RECIPE_FILE = "recipe.json"
CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".pipeline.tmp"
LOCK_FILE = ".train.lock"
#: Version of the marker's and the state's bookkeeping (not of the trainer's tensors).
RUN_FORMAT = 1
#: Files a reader checks against their sha256 in the marker: the weights a recipe certifies.
#: Configs may be edited on purpose (a test shortens T); they must only still exist.
VERIFIED_ON_READ = (".safetensors", ".bin")
_CHECKPOINT = re.compile(r"^step-(\d+)$")
#: Room for the small files (configs, recipe, marker) beside the weights.
_SMALL_FILES_BYTES = 1 << 20


class RunError(ValueError):
    """A training folder cannot be used as asked; one line naming the folder and what to do."""


@dataclass(frozen=True)
class RunSpec:
    """What a trainer tells the run mechanics about itself.

    trainer: its name, recorded in the state and the marker (a folder of another trainer is refused).
    free_settings: settings that never change the weights (checkpointing); they may change on resume.
    schedule_settings: settings that may change on resume only if the learning rate of every step
        already done stays the same (``learning_rate(config, step)``), so that the result is
        bit for bit the uninterrupted run of the new settings (and the recipe tells the truth).
    steps_setting: the config key of the number of steps.
    total_steps: the step the run's counter ends at, when that is not ``config[steps_setting]``
        (train-sd counts its VAE steps first: ``vae_steps + steps``); None: the steps setting.
    defaults: values of settings an older config may lack (compared as if present).
    flags: the command-line flag of a setting, for messages.
    """

    trainer: str
    free_settings: frozenset[str] = frozenset()
    schedule_settings: frozenset[str] = frozenset({"steps"})
    learning_rate: Callable[[Mapping[str, Any], int], float] | None = None
    steps_setting: str = "steps"
    total_steps: Callable[[Mapping[str, Any]], int] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    flags: Mapping[str, str] = field(default_factory=dict)

    def flag(self, name: str) -> str:
        return self.flags.get(name, name)

    def steps_of(self, config: Mapping[str, Any]) -> int:
        """The step a run of ``config`` ends at (what its marker's ``steps_done`` will say)."""
        return int(config[self.steps_setting]) if self.total_steps is None else int(self.total_steps(config))


@dataclass(frozen=True)
class Footprint:
    """Sizes in bytes of what a run writes: its state, its finished model, one kept checkpoint
    (and how many it will keep). :meth:`need_bytes` is the peak the folder grows by."""

    state_bytes: int
    model_bytes: int
    checkpoint_bytes: int = 0
    checkpoints: int = 0

    def need_bytes(self, resuming: bool, finished: bool = False) -> int:
        """state x 2 on a fresh run (the second save writes beside the first) or x 1 when a
        state exists (the new one is written beside it, then replaces it), + the model (staged
        beside any previous one), + the kept checkpoints, + 1 MiB of small files. A folder whose
        marker says it is finished needs at most a repair: the model and the small files."""
        if finished:
            return self.model_bytes + _SMALL_FILES_BYTES
        return (self.state_bytes * (1 if resuming else 2) + self.model_bytes
                + self.checkpoint_bytes * self.checkpoints + _SMALL_FILES_BYTES)


@dataclass
class Resume:
    """Where a run starts: ``step`` steps done, the trainer's saved tensors (``payload``, None on
    a fresh start), and ``complete`` when the folder already holds the finished model."""

    step: int = 0
    payload: dict | None = None
    complete: bool = False


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors (what ``save_pretrained`` or ``torch.save`` writes, roughly)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def machine_info(device: str = "cpu") -> dict:
    """What a recipe records about the machine that trained."""
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": device}


def _one_line(error: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------- digests

def state_digest(obj: Any) -> str:
    """sha256 over a nested state (dicts in key order, lists, tensors' dtype, shape and bytes,
    plain values by ``repr``): what the saved state must still hash to when it is read back."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}|".encode())
        for key in sorted(obj, key=repr):
            h.update(f"{key!r}=".encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}|".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"V{obj!r}|".encode())


def files_checksums(root: Path, under: Path | None = None) -> dict[str, str]:
    """sha256 of every file below ``under`` (default ``root``), keyed by its path relative to ``root``."""
    base = under if under is not None else root
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(base.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- readers

def refuse_unfinished(folder: str | Path) -> None:
    """Readers, first: a folder with ``train_state.pt`` and no ``train_complete.json`` is a run
    that is being written or was interrupted; it must not be loaded. Folders of other tools
    (no state, no marker) pass untouched."""
    folder = Path(folder)
    if (folder / STATE_FILE).exists() and not (folder / MARKER_FILE).exists():
        raise RunError(f"{folder} is an unfinished training run ({STATE_FILE} but no {MARKER_FILE}): it is being "
                       "trained or was interrupted; rerun its train command to finish it")


def check_finished(folder: str | Path) -> None:
    """Readers, then: a folder with ``train_complete.json`` must still hold every file the marker
    lists, and its weights must match their sha256 (a changed or half-copied model is not the
    one its recipe describes). Kept checkpoints are left to the trainer's own check."""
    folder = Path(folder)
    marker_path = folder / MARKER_FILE
    if not marker_path.exists():
        return
    marker = _read_marker(marker_path)
    repair = (f"rerun its train command to repair it from {STATE_FILE}" if (folder / STATE_FILE).exists()
              else f"its {STATE_FILE} is gone, so train it again")
    if marker is None:
        raise RunError(f"{marker_path} is damaged; {repair}")
    for rel, digest in marker["files"].items():
        path = folder / rel
        if not path.is_file():
            raise RunError(f"{path} is missing (listed in {MARKER_FILE}); {repair}")
        if rel.endswith(VERIFIED_ON_READ) and sha256_file(path) != digest:
            raise RunError(f"{path} does not match its sha256 in {MARKER_FILE} (changed or damaged after "
                           f"training); {repair}")


def _read_marker(path: Path) -> dict | None:
    """The marker as a dict, or None when it is not one we wrote (damaged)."""
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = (isinstance(marker, dict) and isinstance(marker.get("files"), dict)
          and isinstance(marker.get("config"), dict) and isinstance(marker.get("steps_done"), int))
    return marker if ok else None


# ---------------------------------------------------------------------------- resume rule

def check_resume(saved: Mapping[str, Any], new: Mapping[str, Any], steps_done: int, spec: RunSpec,
                 out_dir: Path) -> None:
    """Refuse (:class:`RunError`) to continue a run of config ``saved`` with ``steps_done`` steps
    done under config ``new`` unless the result is exactly the uninterrupted run of ``new``.

    Free settings may change; schedule settings (``steps``) only if the learning rate of every
    step done is unchanged (cosine decay over ``steps``: in practice, a run stopped within its
    warm-up may be lengthened); anything else must be equal. Why refuse rather than record a
    second segment in the recipe: LDS and counterfactual retrains replay ``recipe.json``'s
    config as one run, so a segmented history would be silently retrained as something else.
    """
    saved = {**spec.defaults, **saved}
    new = {**spec.defaults, **new}
    changed = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    fixed = [k for k in changed if k not in spec.free_settings | spec.schedule_settings]
    if fixed:
        details = ", ".join(f"{k} {_short(saved.get(k))} -> {_short(new.get(k))}" for k in fixed)
        raise RunError(f"{out_dir} holds a run with other settings ({details}); use another --out or delete it")
    key = spec.steps_setting
    total = spec.steps_of(new)
    if steps_done > total:
        limit = (f"{key}={new[key]}" if total == int(new[key])
                 else f"the {total} of {key}={new[key]} and the other stages")
        raise RunError(f"{out_dir} has done {steps_done} steps already, more than {limit}: rerun with "
                       f"{spec.flag(key)} {saved[key]}, or train into another --out")
    schedule = [k for k in changed if k in spec.schedule_settings]
    if not schedule or steps_done == 0:
        return
    first = 0 if spec.learning_rate is None else next(
        (s for s in range(steps_done) if spec.learning_rate(saved, s) != spec.learning_rate(new, s)), None)
    if first is not None:
        name = schedule[0]
        raise RunError(f"{out_dir}: {spec.flag(name)} {new[name]} (recorded: {saved[name]}) would change the "
                       f"learning rate of the {steps_done} steps already done (from step {first}), so no single run "
                       f"would give these weights; rerun with {spec.flag(name)} {saved[name]} to finish this run, or "
                       f"train into another --out")


# ---------------------------------------------------------------------------- the writer

class TrainingRun:
    """One run's folder, written by one process at a time (see the module docstring).

    Usage::

        run = TrainingRun(out_dir, SPEC, asdict(config))
        with run.open(footprint):
            resume = run.begin()
            if resume.complete:
                return
            ... load resume.payload, train; every N steps:
                run.keep_checkpoint(step, lambda folder: ...)     # optional
                run.save_state({...tensors...}, step)
            run.publish(lambda staging: pipeline.save(staging), recipe, step)
    """

    def __init__(self, out_dir: str | Path, spec: RunSpec, config: Mapping[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.spec = spec
        self.config = dict(config)

    @property
    def steps(self) -> int:
        """The step this run ends at (``RunSpec.steps_of``)."""
        return self.spec.steps_of(self.config)

    # -- opening -------------------------------------------------------------------------
    @contextlib.contextmanager
    def open(self, footprint: Footprint) -> Iterator["TrainingRun"]:
        """Check the folder (writable, enough space), lock it, tidy what a killed run left."""
        marker_path = self.out_dir / MARKER_FILE
        marker = _read_marker(marker_path) if marker_path.exists() else None
        finished = marker is not None and marker["steps_done"] == self.steps
        need = footprint.need_bytes((self.out_dir / STATE_FILE).exists(), finished)
        ensure_writable(self.out_dir, need, "model")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with try_lock(self.out_dir / LOCK_FILE) as mine:
            if not mine:
                raise RunError(f"another process is training into {self.out_dir} (it holds {LOCK_FILE}); wait for "
                               "it to finish or use another --out")
            self._remove_leftovers()
            yield self

    def _remove_leftovers(self) -> None:
        """Temporary files and folders of a killed writer: the staging folder, ``.<name>.*.tmp``
        files, half-renamed checkpoints. Nothing else of the folder is touched."""
        for folder in (self.out_dir, self.out_dir / CHECKPOINTS_DIR):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith(".") and path.name.endswith((".tmp", ".old")):
                    _remove(path)

    # -- resuming ------------------------------------------------------------------------
    def begin(self) -> Resume:
        """Decide where the run starts (see :class:`Resume`); refuse what cannot be continued
        honestly. Writes ``train_config.json`` and removes checkpoints past the state's step
        (written by a run killed before it saved that step)."""
        marker_path = self.out_dir / MARKER_FILE
        marker = _read_marker(marker_path) if marker_path.exists() else None
        problem = None
        if marker is not None:
            self._check_trainer(marker.get("trainer"), marker_path)
            problem = self.verify(marker)
            if problem is None and marker["steps_done"] == self.steps:
                check_resume(marker["config"], self.config, marker["steps_done"], self.spec, self.out_dir)
                return Resume(step=self.steps, complete=True)
        if not (self.out_dir / STATE_FILE).exists():
            if marker is not None:
                if problem is not None:
                    raise RunError(f"{problem}, and {STATE_FILE} is gone, so it cannot be repaired: train into "
                                   "another --out")
                check_resume(marker["config"], self.config, marker["steps_done"], self.spec, self.out_dir)
                raise RunError(f"{self.out_dir} finished {marker['steps_done']} steps and its {STATE_FILE} is gone, "
                               f"so it cannot go on to {self.steps}: train into another --out")
            self._check_only_ours(marker_path.exists())
            self._remove_checkpoints_after(0)
            write_json_atomic(self.out_dir / CONFIG_FILE, self.config)
            return Resume()
        step, config, payload = self._load_state()
        check_resume(config, self.config, step, self.spec, self.out_dir)
        self._remove_checkpoints_after(step)
        write_json_atomic(self.out_dir / CONFIG_FILE, self.config)
        return Resume(step=step, payload=payload)

    def _check_trainer(self, trainer: object, where: Path) -> None:
        if trainer != self.spec.trainer:
            raise RunError(f"{where} was written by the {trainer} trainer, not {self.spec.trainer}; use another --out")

    def _check_only_ours(self, damaged_marker: bool) -> None:
        if damaged_marker:
            raise RunError(f"{self.out_dir / MARKER_FILE} is damaged and {STATE_FILE} is gone, so the run cannot be "
                           "checked or repaired: train into another --out")
        ours = {CONFIG_FILE, LOCK_FILE, CHECKPOINTS_DIR}
        other = sorted(p.name for p in self.out_dir.iterdir() if p.name not in ours)
        if other:
            listed = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
            raise RunError(f"{self.out_dir} holds files of no run this trainer can resume or check ({listed}; no "
                           f"{STATE_FILE}): train into an empty or new --out")

    def _load_state(self) -> tuple[int, dict, dict]:
        """(step, config, payload) of ``train_state.pt``, its digest checked."""
        path = self.out_dir / STATE_FILE
        fix = f"delete it to train {self.out_dir} again from step 0"
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as error:  # whatever torch.load raises on a damaged file
            raise RunError(f"{path} cannot be read ({_one_line(error)}); {fix}") from None
        if not isinstance(state, dict):
            raise RunError(f"{path} is not a training state; {fix}")
        run = state.pop("run", None)
        digest = state.pop("digest", None)
        if run is None:  # a state of the trainer before run bookkeeping: its config is the config file
            if "step" not in state:
                raise RunError(f"{path} is not a training state (no step); {fix}")
            config_file = self.out_dir / CONFIG_FILE
            config = json.loads(config_file.read_text()) if config_file.exists() else dict(self.config)
            return int(state["step"]), config, state
        if digest != state_digest({**state, "run": run}):
            raise RunError(f"{path} does not match its digest (damaged); {fix}")
        self._check_trainer(run.get("trainer"), path)
        return int(run["step"]), json.loads(run["config"]), state

    def _remove_checkpoints_after(self, step: int) -> None:
        folder = self.out_dir / CHECKPOINTS_DIR
        if folder.is_dir():
            for path in folder.iterdir():
                match = _CHECKPOINT.match(path.name)
                if match and int(match.group(1)) > step:
                    _remove(path)

    # -- writing -------------------------------------------------------------------------
    def save_state(self, payload: Mapping[str, Any], step: int) -> None:
        """Write ``train_state.pt``: the trainer's ``payload`` (tensors, numbers; keys other than
        ``run`` and ``digest``) with the run's step and config and a digest of it all."""
        state = {**payload, "run": {"format": RUN_FORMAT, "trainer": self.spec.trainer, "step": int(step),
                                    "config": json.dumps(self.config, sort_keys=True)}}
        state["digest"] = state_digest(state)
        with atomic_path(self.out_dir / STATE_FILE) as tmp:
            torch.save(state, tmp)
            fault_point("train.state")

    def keep_checkpoint(self, step: int, write: Callable[[Path], None]) -> Path:
        """``checkpoints/step-N/``: ``write(folder)`` fills a temporary folder that is then renamed."""
        folder = self.out_dir / CHECKPOINTS_DIR / f"step-{step:07d}"
        staging = folder.with_name(f".{folder.name}.tmp")
        _remove(staging)
        write(staging)
        fault_point("train.checkpoint")
        _replace(staging, folder)
        return folder

    def publish(self, write: Callable[[Path], None], recipe: Mapping[str, Any], step: int) -> None:
        """Write the finished model: ``write(staging)`` fills the staging folder, ``recipe.json``
        joins it, the marker goes, each part moves into place, and the marker comes back last with
        the sha256 of every file (the model's and the kept checkpoints'). Save the state first:
        a kill from here on is repaired from it."""
        staging = self.out_dir / STAGING_DIR
        _remove(staging)
        staging.mkdir()
        write(staging)
        write_json_atomic(staging / RECIPE_FILE, {**recipe, "steps_done": int(step)})
        files = files_checksums(staging)
        (self.out_dir / MARKER_FILE).unlink(missing_ok=True)
        for part in sorted(staging.iterdir()):
            fault_point("train.pipeline")
            target = self.out_dir / part.name
            _remove(target)
            part.rename(target)
        staging.rmdir()
        checkpoints = self.out_dir / CHECKPOINTS_DIR
        kept = files_checksums(self.out_dir, checkpoints) if checkpoints.is_dir() else {}
        marker = {"format": RUN_FORMAT, "trainer": self.spec.trainer, "steps_done": int(step),
                  "config": self.config, "files": files,
                  "checkpoints": {k: v for k, v in kept.items() if not Path(k).parts[1].startswith(".")}}
        fault_point("train.marker")
        write_json_atomic(self.out_dir / MARKER_FILE, marker)

    def verify(self, marker: Mapping[str, Any]) -> str | None:
        """The first file the marker lists (model and checkpoints) that is missing or differs, as
        a phrase; None when all match."""
        for rel, digest in {**marker["files"], **marker.get("checkpoints", {})}.items():
            path = self.out_dir / rel
            if not path.is_file():
                return f"{path} is missing"
            if sha256_file(path) != digest:
                return f"{path} does not match its sha256 in {MARKER_FILE}"
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(source: Path, target: Path) -> None:
    """Rename folder ``source`` onto ``target``; an existing ``target`` is moved aside first and
    then deleted (a kill in between leaves ``.<name>.old``, removed by the next run)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        _remove(old)
        target.rename(old)
        source.rename(target)
        _remove(old)
    else:
        source.rename(target)
