"""The LDS table: ``docs/benchmarks/lds.md`` from a build's stored results (``results/lds.json``).

Besides the LDS of every grid entry per target kind it states what was measured (model,
targets, timesteps, features), the published numbers beside ours (:data:`PAPER_LDS`), the
paper's ordering as checked by paired differences, the build's hand-written notes and the
commands that regenerate it. Nothing is computed here: run ``lds score`` first.
"""

from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from dtrak_core.evaluation.lds.config import SCORES_DIR, TARGET_KINDS, TARGETS_DIR, read_build
from dtrak_core.evaluation.lds.scores import DEFAULT_GRID, REDO_SCORES, GridEntry, read_results
from dtrak_core.evaluation.lds.targets import SELECTION_GROUP, Targets
from dtrak_core.evaluation.markdown import notes_section, write_markdown
from dtrak_core.evaluation.subsets import SubsetPlan
from dtrak_core.evaluation.units import read_record
from dtrak_core.seeds import format_seeds

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
        settings = read_record(meta, REDO_SCORES).get("settings")
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


def report_lock_path(build_dir: str | Path) -> Path:
    """The lock the commands hold while writing a build's report (in its git-ignored ``scores/``)."""
    return Path(build_dir) / SCORES_DIR / "report.lock"


def write_report(build_dir: str | Path, out_path: str | Path, command: str,
                 entries: Sequence[GridEntry] = DEFAULT_GRID, lock: Path | None = None) -> Path:
    """Write the markdown LDS table from ``results/lds.json`` (run ``evaluate`` first); ``lock``:
    held while writing (:func:`report_lock_path`), when several commands may write it."""
    build_dir = Path(build_dir)
    results = read_results(build_dir)
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
    # Hand-written discussion (why ours differs from the paper), kept with the build it discusses.
    lines += notes_section(build_dir)
    lines += ["", "Paper numbers: Zheng et al. 2024, CIFAR-2 (5000 images, 32 px, 38M-parameter UNet, 64 subsets x 3 "
              "seeds, 1000 timesteps x 3 noise draws per output); ours is a 16 px, 0.7M-parameter model on "
              f"{SubsetPlan.load(build_dir).num_train} images, so compare orderings, not absolute values.", "",
              "Build (resumable: run it again after a kill and it continues with the next unfinished model), "
              "score every method, regenerate this file (as more subsets finish):", "", "```bash",
              build_command(build, build_dir), "python -m dtrak_core lds attribute --build " + str(build_dir),
              command, "```", ""]
    return write_markdown(out_path, lines, "lds.report", lock)
