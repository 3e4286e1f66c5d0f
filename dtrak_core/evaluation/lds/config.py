"""Stage 0 of an LDS build: its settings, the layout of its folder and its build file ``lds.json``.

Layout of a build folder ``out_dir`` (small, commit-able; ``runs/`` and ``scores/`` are
git-ignored by a ``.gitignore`` written there):

    lds.json               build settings (model hash, recipe, targets, measurement)
    subsets.json           the subsets (indices into the training set)
    targets/images.npy     uint8 (T, H, W, 3) target images; targets/targets.json names and kinds
    outputs/*.json         measured losses (T,) of each finished model, with timings
    runs/                  models being trained (deleted after measuring), ensemble models
    scores/*.npz           score matrices of attribution methods (``lds attribute``)
    results/               LDS results (``lds score``)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from dtrak_core.evaluation.retrain import DEFAULT_CHECKPOINT_EVERY, check_steps_rule
from dtrak_core.evaluation.units import RECORD_CHECKSUM, read_record, write_record
from dtrak_core.tasks.text_to_image import GuidanceSettings

BUILD_FILE = "lds.json"
TARGETS_DIR = "targets"
OUTPUTS_DIR = "outputs"
RUNS_DIR = "runs"
SCORES_DIR = "scores"
RESULTS_DIR = "results"
#: The two kinds of targets; every LDS is reported per kind.
TARGET_KINDS = ("validation", "generated")
#: Fault point of the build file's write.
BUILD_FILE_POINT = "lds.build_file"
#: What a user does about a build file that fails its checksum: it says what the numbers mean,
#: so it is never guessed again from a command line.
REDO_BUILD_FILE = "restore it (it is committed with the build) or start another --out"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class LdsBuildConfig:
    """Settings of an LDS build.

    The fields in :meth:`identity_fields` fix what the measured numbers mean; a resumed build
    must keep them. ``num_subsets``, ``num_tuning_subsets``, ``seeds``, ``ensemble_seeds`` and
    ``extra_validation`` may grow between runs (new subsets do not change old ones).
    """

    model_dir: str = field(metadata=_help("pipeline folder with recipe.json"))
    out_dir: str = field(metadata=_help("build folder (commit-able results)"))
    num_subsets: int = field(default=64, metadata=_help("reported subsets M"))
    num_tuning_subsets: int = field(default=16, metadata=_help("separate subsets for choosing lambda"))
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata=_help(
        "training seeds per subset: a count S (seeds 0..S-1) or a list '0,3' (default 2)"))
    alpha: float = field(default=0.5, metadata=_help("subset fraction"))
    subset_seed: int = field(default=0, metadata=_help("seed of the subset draw"))
    stratify_column: str = field(default="artist", metadata=_help("metadata column the subsets are stratified by"))
    steps_rule: str = field(default="epochs", metadata=_help(
        "epochs: same passes over the data (half the steps on half the data); steps: the recipe's"))
    measure_timesteps: int = field(default=100, metadata=_help(
        "timesteps of the measured loss (uniform, offset by half a stride; at most the model's T)"))
    measure_noise: int = field(default=1, metadata=_help("noise draws per (target, t)"))
    measure_seed: int = 7919
    validation_split: str = "validation"
    max_validation: int | None = field(default=None, metadata=_help(
        "use only the first N validation images of the model's selection (default: all)"))
    generated_seeds: list[int] = field(default_factory=lambda: list(range(100)), metadata=_help(
        "seeds of the generated targets (default 0-99)"))
    sampler_steps: int = 50
    #: Classifier-free guidance of the generated targets of a text-to-image model; None: the
    #: default of ``GuidanceSettings`` (resolved by the build, so ``lds.json`` records the number).
    #: Not a setting of an unconditional model (its build files do not mention it).
    guidance_scale: float | None = field(default=None, metadata=_help(
        "classifier-free guidance scale of the generated targets of a text-to-image model (default "
        f"{GuidanceSettings.guidance_scale})"))
    ensemble_seeds: list[int] = field(default_factory=list, metadata=_help(
        "also retrain the full model with these seeds (for the D-TRAK ensemble)"))
    #: "column=value" filters: held-out images (split ``validation_split``) of other selections of
    #: the model's dataset, added as validation targets. May grow between runs.
    extra_validation: list[str] = field(default_factory=list, metadata=_help(
        "also use the held-out images where COLUMN == VALUE (another selection of the same dataset) as "
        "validation targets; may be added to a finished build (repeatable)"))
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    keep_models: bool = field(default=False, metadata=_help("keep subset models after measuring"))
    work_dir: str | None = field(default=None, metadata=_help("where models train (default OUT/runs)"))

    def validate(self, num_train_timesteps: int) -> None:
        """One-sentence ``ValueError`` for the first bad setting; ``num_train_timesteps`` is the
        model's T (its scheduler's ``num_train_timesteps``), the most timesteps there are to measure."""
        if self.num_subsets < 2:
            raise ValueError(f"--subsets {self.num_subsets} must be at least 2 (a correlation needs 2 points)")
        if self.num_tuning_subsets < 0:
            raise ValueError(f"--tuning-subsets {self.num_tuning_subsets} must be >= 0")
        if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"training seeds {self.seeds} must be distinct non-negative integers (at least one)")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha {self.alpha} must be strictly between 0 and 1")
        check_steps_rule(self.steps_rule)
        if not 1 <= self.measure_timesteps <= num_train_timesteps:
            raise ValueError(f"measure timesteps {self.measure_timesteps} must be between 1 and "
                             f"T={num_train_timesteps}")
        if self.measure_noise < 1:
            raise ValueError(f"measure noise draws {self.measure_noise} must be at least 1")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every {self.checkpoint_every} must be at least 1")
        for spec in self.extra_validation:
            parse_filter(spec)

    def identity_fields(self) -> dict:
        fields = {k: getattr(self, k) for k in ("alpha", "subset_seed", "stratify_column", "steps_rule",
                                                "measure_timesteps", "measure_noise", "measure_seed",
                                                "validation_split", "max_validation", "generated_seeds",
                                                "sampler_steps")}
        if self.guidance_scale is not None:  # text-to-image builds only: older builds keep their identity
            fields["guidance_scale"] = self.guidance_scale
        return fields

    def guidance(self, steps: int) -> GuidanceSettings:
        """How the generated targets of a text-to-image model are sampled (``steps`` DDIM steps)."""
        if self.guidance_scale is None:
            return GuidanceSettings(steps=steps)
        return GuidanceSettings(guidance_scale=float(self.guidance_scale), steps=steps)

    def for_model(self, captioned: bool, model_dir: str | Path) -> "LdsBuildConfig":
        """The settings resolved for the model: a text-to-image model's guidance scale set (default
        ``GuidanceSettings``'); a guidance scale for an unconditional model is a ``ValueError``."""
        if not captioned:
            if self.guidance_scale is not None:
                raise ValueError(f"--guidance {self.guidance_scale} is for text-to-image models; {model_dir} is "
                                 "an unconditional model (its generated targets take no prompt)")
            return self
        return replace(self, guidance_scale=float(self.guidance(self.sampler_steps).guidance_scale))

    @property
    def work(self) -> Path:
        """Where models train: ``work_dir``, default ``<out_dir>/runs``."""
        return Path(self.work_dir) if self.work_dir else Path(self.out_dir) / RUNS_DIR


def ensemble_model_dir(config: LdsBuildConfig, seed: int) -> Path:
    """The folder of the full-data retrain with ``seed`` (kept: the ensemble scores with it)."""
    return config.work / f"ensemble-s{seed}"


def parse_filter(spec: str) -> tuple[str, str]:
    """``"category=People & Body"`` -> ("category", "People & Body")."""
    column, sep, value = spec.partition("=")
    if not sep or not column.strip() or not value.strip():
        raise ValueError(f"extra validation filter {spec!r} must be COLUMN=VALUE, e.g. 'category=People & Body'")
    return column.strip(), value.strip()


def read_build(out_dir: str | Path) -> dict:
    """The build settings ``lds.json`` of an LDS build folder, verified against its checksum."""
    record = read_record(Path(out_dir) / BUILD_FILE, REDO_BUILD_FILE)
    if record is None:
        raise FileNotFoundError(f"{out_dir} is not an LDS build folder (no {BUILD_FILE}); run 'lds build' first")
    return record


def write_build_record(out_dir: str | Path, record: dict) -> None:
    """Write ``lds.json`` (under the build lock) unless it already says the same: a build from
    before checksums keeps its committed bytes until something in it changes."""
    saved = read_record(Path(out_dir) / BUILD_FILE, REDO_BUILD_FILE)
    if saved is not None and {k: v for k, v in saved.items() if k != RECORD_CHECKSUM} == record:
        return
    write_record(Path(out_dir) / BUILD_FILE, record, BUILD_FILE_POINT)


def merged_build_record(config: LdsBuildConfig, model_hash: str, recipe: dict, timesteps: list[int]) -> dict:
    """The build file's new content: the saved one (which must agree on what the numbers mean)
    with the counts, seeds and extra targets asked for now added.

    timesteps: the measured timesteps (recorded as ``measure_timesteps_list``).
    """
    path = Path(config.out_dir) / BUILD_FILE
    record = {"model_dir": config.model_dir, "model_hash": model_hash, "recipe_config": recipe["config"],
              "identity": config.identity_fields(),
              "num_subsets": config.num_subsets, "num_tuning_subsets": config.num_tuning_subsets,
              "seeds": config.seeds, "ensemble_seeds": config.ensemble_seeds, "work_dir": config.work_dir,
              "extra_validation": config.extra_validation,
              "measure_timesteps_list": list(timesteps)}
    saved = read_record(path, REDO_BUILD_FILE)
    if saved is not None:
        if saved.get("model_hash") != model_hash:
            raise ValueError(f"{config.out_dir} holds an LDS build of another model (hash "
                             f"{str(saved.get('model_hash'))[:12]}); use another --out")
        changed = sorted(k for k, v in config.identity_fields().items() if saved.get("identity", {}).get(k) != v)
        if changed:
            raise ValueError(f"{config.out_dir} holds an LDS build with other settings ({', '.join(changed)}); "
                             "use the same settings to resume or another --out")
        # Counts may only grow: keep the larger of what was asked before and now.
        record["num_subsets"] = max(config.num_subsets, saved.get("num_subsets", 0))
        record["num_tuning_subsets"] = max(config.num_tuning_subsets, saved.get("num_tuning_subsets", 0))
        record["seeds"] = saved.get("seeds", []) + [s for s in config.seeds if s not in saved.get("seeds", [])]
        record["ensemble_seeds"] = saved.get("ensemble_seeds", []) + [
            s for s in config.ensemble_seeds if s not in saved.get("ensemble_seeds", [])]
        record["extra_validation"] = saved.get("extra_validation", []) + [
            s for s in config.extra_validation if s not in saved.get("extra_validation", [])]
    return record

