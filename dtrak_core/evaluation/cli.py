"""Command-line subcommands ``lds build|attribute|score|report`` and ``counterfactual``.

``add_subcommands(subparsers)`` registers them; bad input ends with one sentence on stderr and
exit code 2, checked before any training starts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dtrak_core.attribution.feature_store import StaleFeaturesError
from dtrak_core.cli_options import add_field_option, field_default
from dtrak_core.conventions import DEFAULT_PROJECTION_DIM
from dtrak_core.datasets.imagefolder import DatasetError
from dtrak_core.evaluation.counterfactual import (RESULT_BYTES, CounterfactualConfig, counterfactual_experiment,
                                                  models_root, report_lock_path, resolve_k, stored_result)
from dtrak_core.evaluation.counterfactual import write_report as write_counterfactual_report
from dtrak_core.evaluation.embeddings import load_embedder
from dtrak_core.evaluation.lds.build import TargetsChangedError, build_lds
from dtrak_core.evaluation.lds.config import RESULTS_DIR, LdsBuildConfig
from dtrak_core.evaluation.lds.report import report_lock_path as lds_report_lock_path
from dtrak_core.evaluation.lds.report import write_report as write_lds_report
from dtrak_core.evaluation.lds.scores import (DEFAULT_BATCH_SIZE, DEFAULT_GRID, DEFAULT_LAMBDAS, compute_scores,
                                              evaluate, evaluate_matrix, get_entry, load_scores)
from dtrak_core.evaluation.metrics import DEFAULT_NUM_BOOTSTRAP
from dtrak_core.evaluation.retrain import STEPS_RULES, read_retrain_recipe, retrain_bytes
from dtrak_core.io import ensure_writable
from dtrak_core.models import ModelError, pipeline_files_hash
from dtrak_core.paths import MINI_MODEL_DIR, REPO_ROOT
from dtrak_core.progress import progress_bar
from dtrak_core.seeds import format_seeds, parse_seeds
from dtrak_core.tasks import task_class_for
from dtrak_core.tasks.text_to_image import TextToImageTask

DEFAULT_LDS_OUT = REPO_ROOT / "benchmarks" / "lds" / "emoji3-mini"
DEFAULT_LDS_REPORT = REPO_ROOT / "docs" / "benchmarks" / "lds.md"
DEFAULT_CF_REPORT = REPO_ROOT / "docs" / "benchmarks" / "counterfactual.md"


def _repo_relative(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it (commands in committed docs)."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT)
    except ValueError:
        return Path(path)


def _training_seeds(text: str) -> list[int]:
    """'2' -> seeds [0, 1]; '0,5' or '3-4' -> exactly those seeds."""
    text = text.strip()
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"--seeds {text} must be at least 1")
        return list(range(int(text)))
    return parse_seeds(text)


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``lds`` (with build, attribute, score, report) and ``counterfactual``.

    Defaults and help of options that set a config field come from the field
    (:func:`dtrak_core.cli_options.add_field_option`).
    """
    lds = subparsers.add_parser("lds", help="Linear Datamodeling Score benchmark (subset retrains)",
                                description="LDS: retrain on random half subsets, measure, correlate with "
                                "attribution scores.")
    sub = lds.add_subparsers(dest="lds_command", required=True)

    b = sub.add_parser("build", help="draw subsets, retrain on each, measure the targets (resumable)")

    def build_option(name: str, *flags: str, **kwargs) -> None:
        add_field_option(b, LdsBuildConfig, name, *flags, **kwargs)

    build_option("model_dir", "--model", type=Path, default=MINI_MODEL_DIR)
    build_option("out_dir", "--out", type=Path, default=DEFAULT_LDS_OUT)
    build_option("num_subsets", "--subsets", type=int)
    build_option("num_tuning_subsets", "--tuning-subsets", type=int)
    build_option("seeds", "--seeds", type=_training_seeds)
    build_option("alpha", "--alpha", type=float)
    build_option("subset_seed", "--subset-seed", type=int)
    build_option("stratify_column", "--stratify-column")
    build_option("steps_rule", "--steps-rule", choices=STEPS_RULES)
    build_option("measure_timesteps", "--measure-timesteps", type=int)
    build_option("measure_noise", "--measure-noise", type=int)
    build_option("generated_seeds", "--generated-seeds", type=parse_seeds)
    build_option("max_validation", "--max-validation", type=int)
    build_option("extra_validation", "--extra-validation", action="append", metavar="COLUMN=VALUE")
    build_option("guidance_scale", "--guidance", type=float)
    build_option("ensemble_seeds", "--ensemble-seeds", type=parse_seeds)
    build_option("keep_models", "--keep-models", action="store_true")
    build_option("work_dir", "--work-dir", type=Path)
    b.add_argument("--max-models", type=int, default=None, help="stop after training this many models")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_lds_build)

    a = sub.add_parser("attribute", help="score matrices of every method of the grid for the build's targets")
    a.add_argument("--build", type=Path, default=DEFAULT_LDS_OUT)
    a.add_argument("--entries", nargs="+", default=None, help="grid entries (default: all)")
    a.add_argument("--lambdas", type=float, nargs="+", default=None, help="lambda sweep (default: 1e-2..1e7)")
    a.add_argument("-k", "--projection-dim", type=int, default=DEFAULT_PROJECTION_DIM)
    a.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    a.add_argument("--cache-dir", type=Path, default=None, help="feature store root")
    a.add_argument("--force", action="store_true")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_lds_attribute)

    s = sub.add_parser("score", help="LDS of stored score matrices (lambda tuned on the tuning subsets)")
    s.add_argument("--build", type=Path, default=DEFAULT_LDS_OUT)
    s.add_argument("--scores", type=Path, nargs="+", default=None,
                   help="score files (.npy (targets, train) or .npz of 'lds attribute'); default: every grid "
                   "entry, written to BUILD/results/")
    s.add_argument("--bootstrap", type=int, default=DEFAULT_NUM_BOOTSTRAP)
    s.add_argument("--report", type=Path, default=None, help="also write the markdown table here")
    s.set_defaults(func=cmd_lds_score)

    r = sub.add_parser("report", help="write the markdown LDS table from stored results")
    r.add_argument("--build", type=Path, default=DEFAULT_LDS_OUT)
    r.add_argument("--out", type=Path, default=DEFAULT_LDS_REPORT)
    r.set_defaults(func=cmd_lds_report)

    c = subparsers.add_parser("counterfactual", help="remove top proponents, retrain, regenerate, compare",
                              description="Counterfactual check of attributions (resumable, cached). Several "
                              "target seeds or methods = batch mode, which also writes the markdown table.")

    def counterfactual_option(name: str, *flags: str, **kwargs) -> None:
        add_field_option(c, CounterfactualConfig, name, *flags, **kwargs)

    c.add_argument("--model", type=Path, default=MINI_MODEL_DIR)
    c.add_argument("--target-seed", type=parse_seeds, required=True, help="seed(s), e.g. 3 or 0-59")
    counterfactual_option("method", "--method", nargs="+", default=[field_default(CounterfactualConfig, "method")])
    counterfactual_option("k", "--k", type=int)
    counterfactual_option("lam", "--lambda", dest="lam", type=float)
    counterfactual_option("num_timesteps", "-K", "--num-timesteps", type=int)
    counterfactual_option("projection_dim", "-k", "--projection-dim", type=int)
    counterfactual_option("steps_rule", "--steps-rule", choices=STEPS_RULES)
    counterfactual_option("random_seed", "--random-seed", type=int)
    counterfactual_option("prompt", "--prompt", action="append", default=None)
    counterfactual_option("guidance_scale", "--guidance", type=float)
    c.add_argument("--results", type=Path, default=None,
                   help="results folder (default benchmarks/counterfactual/<model folder name>)")
    c.add_argument("--models-dir", type=Path, default=None, help="retrained models (default cache/counterfactual)")
    c.add_argument("--report", type=Path, default=None,
                   help="markdown table (batch mode default: docs/benchmarks/counterfactual.md)")
    c.add_argument("--embedding-model", type=Path, default=None,
                   help="local transformers image model folder (e.g. CLIP) for the embedding cosine")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_counterfactual)


def _run(fn, args: argparse.Namespace) -> int:
    try:
        return fn(args) or 0
    except (ModelError, DatasetError, StaleFeaturesError, ValueError, FileNotFoundError, TargetsChangedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def cmd_lds_build(args: argparse.Namespace) -> int:
    return _run(_lds_build, args)


def cmd_lds_attribute(args: argparse.Namespace) -> int:
    return _run(_lds_attribute, args)


def cmd_lds_score(args: argparse.Namespace) -> int:
    return _run(_lds_score, args)


def cmd_lds_report(args: argparse.Namespace) -> int:
    return _run(_lds_report, args)


def cmd_counterfactual(args: argparse.Namespace) -> int:
    return _run(_counterfactual, args)


def _lds_build(args: argparse.Namespace) -> int:
    config = LdsBuildConfig(
        model_dir=str(args.model), out_dir=str(args.out), num_subsets=args.subsets,
        num_tuning_subsets=args.tuning_subsets, seeds=args.seeds, alpha=args.alpha, subset_seed=args.subset_seed,
        stratify_column=args.stratify_column, steps_rule=args.steps_rule, measure_timesteps=args.measure_timesteps,
        measure_noise=args.measure_noise, generated_seeds=args.generated_seeds, max_validation=args.max_validation,
        ensemble_seeds=args.ensemble_seeds, extra_validation=args.extra_validation, keep_models=args.keep_models,
        work_dir=str(args.work_dir) if args.work_dir else None, guidance_scale=args.guidance)
    if args.max_models is not None and args.max_models < 0:
        raise ValueError(f"--max-models {args.max_models} must be >= 0")
    result = build_lds(config, progress=not args.no_progress, max_models=args.max_models)
    print(f"{result['done']} of {result['total']} models measured in {args.out}")
    return 0


def _lds_attribute(args: argparse.Namespace) -> int:
    entries = [get_entry(name) for name in args.entries] if args.entries else list(DEFAULT_GRID)
    lambdas = args.lambdas or DEFAULT_LAMBDAS
    status = compute_scores(args.build, entries, lambdas, args.projection_dim, args.cache_dir, args.batch_size,
                            not args.no_progress, args.force)
    for name, state in status.items():
        print(f"{name}: {state}")
    return 0


def _lds_score(args: argparse.Namespace) -> int:
    if args.scores:
        for path in args.scores:
            lambdas, scores = load_scores(path)
            per_kind, _ = evaluate_matrix(args.build, lambdas, scores, args.bootstrap)
            for kind, record in per_kind.items():
                if record.get("status") != "measured":
                    print(f"{path} {kind}: {record.get('status')}")
                    continue
                lam = "" if record.get("lambda") is None else f", lambda {record['lambda']:g} (tuned)"
                print(f"{path} {kind}: LDS {100 * record['mean']:.1f}% [{100 * record['ci_low']:.1f}, "
                      f"{100 * record['ci_high']:.1f}] over {record['num_targets']} targets, "
                      f"{record['report_subsets']} subsets{lam}")
        return 0
    results = evaluate(args.build, num_bootstrap=args.bootstrap)
    measured = sum(any(k.get("status") == "measured" for k in e.get("kinds", {}).values())
                   for e in results["entries"].values())
    print(f"LDS of {measured} of {len(results['entries'])} methods written to {Path(args.build) / RESULTS_DIR}")
    if args.report:
        command = (f"python -m dtrak_core lds score --build {shlex.quote(str(args.build))} "
                   f"--report {shlex.quote(str(args.report))}")
        write_lds_report(args.build, args.report, command, lock=lds_report_lock_path(args.build))
        print(f"wrote {args.report}")
    return 0


def _lds_report(args: argparse.Namespace) -> int:
    command = (f"python -m dtrak_core lds score --build {shlex.quote(str(args.build))} && "
               f"python -m dtrak_core lds report --build {shlex.quote(str(args.build))} "
               f"--out {shlex.quote(str(args.out))}")
    write_lds_report(args.build, args.out, command, lock=lds_report_lock_path(args.build))
    print(f"wrote {args.out}")
    return 0


def _counterfactual(args: argparse.Namespace) -> int:
    results = args.results or REPO_ROOT / "benchmarks" / "counterfactual" / Path(args.model).resolve().name
    # k resolved here (default 20% of the recipe's training images) so that the experiment
    # names, and the locks workers share, do not depend on how k was given.
    num_train = read_retrain_recipe(args.model)["num_train_images"]
    text = issubclass(task_class_for(args.model), TextToImageTask)
    configs = []
    for prompt in args.prompt or [None]:  # a text-to-image model: every prompt with every seed
        for seed in args.target_seed:
            for method in args.method:
                k = None if method.startswith("artist:") else resolve_k(args.k, num_train)
                config = CounterfactualConfig(model_dir=str(args.model), target_seed=seed, method=method, k=k,
                                              lam=args.lam, num_timesteps=args.num_timesteps,
                                              projection_dim=args.projection_dim, steps_rule=args.steps_rule,
                                              random_seed=args.random_seed, results_dir=str(results),
                                              prompt=prompt, guidance_scale=args.guidance)
                if args.models_dir:
                    config.models_dir = str(args.models_dir)
                config.validate()  # every input checked before the first retrain
                config.check_family(text)
                configs.append(config)
    # Before the first retrain: room for the results and the retrained models still to do.
    full_hash = pipeline_files_hash(args.model)
    pending = [config for config in configs if stored_result(config, num_train, full_hash) is None]
    ensure_writable(results, len(pending) * RESULT_BYTES, "counterfactual results")
    if pending:
        ensure_writable(models_root(pending[0]), len(pending) * retrain_bytes(args.model),
                        "counterfactual retrained models")
    # update() per experiment (not iteration) so a background job's progress file follows too.
    bar = progress_bar(total=len(configs), desc="counterfactual", unit="experiment",
                       disable=args.no_progress or len(configs) == 1)
    embedder = None
    if args.embedding_model is not None:
        embedder = load_embedder(args.embedding_model)
    for config in configs:
        # Several workers may run the same batch (one per core): each experiment is run by the
        # worker that locks it first; the others go on to the next one.
        outcome = counterfactual_experiment(config, progress=not args.no_progress, embedder=embedder, wait=False)
        if outcome.status == "busy":
            target = f"seed {config.target_seed}" if config.prompt is None else \
                f"{config.prompt!r} seed {config.target_seed}"
            bar.write(f"{target} {config.tag}: another worker is running it; skipped")
            bar.update(1)
            continue
        r = outcome.record
        cosine = f", embedding cos {r['embedding_cosine']:.3f}" if embedder is not None else ""
        stored = " (stored)" if outcome.status == "stored" else ""
        target = f"{r['prompt']!r} seed {r['target_seed']}" if "prompt" in r else f"seed {r['target_seed']}"
        bar.write(f"{target} {r['tag']}{stored}: removed {r['k']} ({r['removed_by_artist']}), "
                  f"pixel L2 {r['pixel_l2']:.3f}, SSIM {r['ssim']:.3f}{cosine}")
        bar.update(1)
    bar.close()
    report = args.report or (DEFAULT_CF_REPORT if len(configs) > 1 else None)
    if report:
        command = (f"python -m dtrak_core counterfactual --model {shlex.quote(str(args.model))} --target-seed "
                   f"{format_seeds(args.target_seed)} --method {' '.join(map(shlex.quote, args.method))}"
                   + "".join(f" --prompt {shlex.quote(p)}" for p in args.prompt or [])
                   + (f" --guidance {args.guidance:g}" if args.guidance is not None else "")
                   + (f" --k {args.k}" if args.k else "")
                   + (f" --embedding-model {shlex.quote(str(args.embedding_model))}" if args.embedding_model else "")
                   + f" --report {shlex.quote(str(_repo_relative(report)))}")
        write_counterfactual_report(results, report, command, lock=report_lock_path(configs[0], report))
        print(f"wrote {report}")
    return 0
