"""Command-line subcommands ``lds build|attribute|score|report`` and ``counterfactual``.

``add_subcommands(subparsers)`` registers them; bad input ends with one sentence on stderr and
exit code 2, checked before any training starts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dtrak_core.paths import MINI_MODEL_DIR, REPO_ROOT
from dtrak_core.seeds import format_seeds, parse_seeds

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
    """Register ``lds`` (with build, attribute, score, report) and ``counterfactual``."""
    lds = subparsers.add_parser("lds", help="Linear Datamodeling Score benchmark (subset retrains)",
                                description="LDS: retrain on random half subsets, measure, correlate with "
                                "attribution scores.")
    sub = lds.add_subparsers(dest="lds_command", required=True)

    b = sub.add_parser("build", help="draw subsets, retrain on each, measure the targets (resumable)")
    b.add_argument("--model", type=Path, default=MINI_MODEL_DIR, help="pipeline folder with recipe.json")
    b.add_argument("--out", type=Path, default=DEFAULT_LDS_OUT, help="build folder (commit-able results)")
    b.add_argument("--subsets", type=int, default=64, help="reported subsets M (default %(default)s)")
    b.add_argument("--tuning-subsets", type=int, default=16,
                   help="separate subsets for choosing lambda (default %(default)s)")
    b.add_argument("--seeds", type=_training_seeds, default=[0, 1],
                   help="training seeds per subset: a count S (seeds 0..S-1) or a list '0,3' (default 2)")
    b.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default %(default)s)")
    b.add_argument("--subset-seed", type=int, default=0)
    b.add_argument("--stratify-column", default="artist")
    b.add_argument("--steps-rule", choices=("epochs", "steps"), default="epochs",
                   help="epochs: same passes over the data (half the steps on half the data); steps: recipe's")
    b.add_argument("--measure-timesteps", type=int, default=100)
    b.add_argument("--measure-noise", type=int, default=1, help="noise draws per (target, t)")
    b.add_argument("--generated-seeds", type=parse_seeds, default=parse_seeds("0-99"))
    b.add_argument("--max-validation", type=int, default=None)
    b.add_argument("--extra-validation", action="append", default=[], metavar="COLUMN=VALUE",
                   help="also use the held-out images where COLUMN == VALUE (another selection of the same "
                   "dataset) as validation targets; may be added to a finished build (repeatable)")
    b.add_argument("--ensemble-seeds", type=parse_seeds, default=[],
                   help="also retrain the full model with these seeds (for the D-TRAK ensemble)")
    b.add_argument("--keep-models", action="store_true", help="keep subset models after measuring")
    b.add_argument("--work-dir", type=Path, default=None, help="where models train (default OUT/runs)")
    b.add_argument("--max-models", type=int, default=None, help="stop after training this many models")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_lds_build)

    a = sub.add_parser("attribute", help="score matrices of every method of the grid for the build's targets")
    a.add_argument("--build", type=Path, default=DEFAULT_LDS_OUT)
    a.add_argument("--entries", nargs="+", default=None, help="grid entries (default: all)")
    a.add_argument("--lambdas", type=float, nargs="+", default=None, help="lambda sweep (default: 1e-2..1e7)")
    a.add_argument("-k", "--projection-dim", type=int, default=2048)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--cache-dir", type=Path, default=None, help="feature store root")
    a.add_argument("--force", action="store_true")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_lds_attribute)

    s = sub.add_parser("score", help="LDS of stored score matrices (lambda tuned on the tuning subsets)")
    s.add_argument("--build", type=Path, default=DEFAULT_LDS_OUT)
    s.add_argument("--scores", type=Path, nargs="+", default=None,
                   help="score files (.npy (targets, train) or .npz of 'lds attribute'); default: every grid "
                   "entry, written to BUILD/results/")
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--report", type=Path, default=None, help="also write the markdown table here")
    s.set_defaults(func=cmd_lds_score)

    r = sub.add_parser("report", help="write the markdown LDS table from stored results")
    r.add_argument("--build", type=Path, default=DEFAULT_LDS_OUT)
    r.add_argument("--out", type=Path, default=DEFAULT_LDS_REPORT)
    r.set_defaults(func=cmd_lds_report)

    c = subparsers.add_parser("counterfactual", help="remove top proponents, retrain, regenerate, compare",
                              description="Counterfactual check of attributions (resumable, cached). Several "
                              "target seeds or methods = batch mode, which also writes the markdown table.")
    c.add_argument("--model", type=Path, default=MINI_MODEL_DIR)
    c.add_argument("--target-seed", type=parse_seeds, required=True, help="seed(s), e.g. 3 or 0-59")
    c.add_argument("--method", nargs="+", default=["dtrak"],
                   help="dtrak, trak, random, artist:<name> or another attribution method (several allowed)")
    c.add_argument("--k", type=int, default=None, help="images to remove (default 20%% of the training set)")
    c.add_argument("--lambda", dest="lam", type=float, default=100.0)
    c.add_argument("-K", "--num-timesteps", type=int, default=10)
    c.add_argument("-k", "--projection-dim", type=int, default=2048)
    c.add_argument("--steps-rule", choices=("epochs", "steps"), default="epochs")
    c.add_argument("--random-seed", type=int, default=0)
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
    from dtrak_core.attribution.feature_store import StaleFeaturesError
    from dtrak_core.datasets.imagefolder import DatasetError
    from dtrak_core.models import ModelError

    try:
        return fn(args) or 0
    except (ModelError, DatasetError, StaleFeaturesError, ValueError, FileNotFoundError) as error:
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
    from dtrak_core.evaluation.lds import LdsBuildConfig, build_lds

    config = LdsBuildConfig(
        model_dir=str(args.model), out_dir=str(args.out), num_subsets=args.subsets,
        num_tuning_subsets=args.tuning_subsets, seeds=args.seeds, alpha=args.alpha, subset_seed=args.subset_seed,
        stratify_column=args.stratify_column, steps_rule=args.steps_rule, measure_timesteps=args.measure_timesteps,
        measure_noise=args.measure_noise, generated_seeds=args.generated_seeds, max_validation=args.max_validation,
        ensemble_seeds=args.ensemble_seeds, extra_validation=args.extra_validation, keep_models=args.keep_models,
        work_dir=str(args.work_dir) if args.work_dir else None)
    if args.max_models is not None and args.max_models < 0:
        raise ValueError(f"--max-models {args.max_models} must be >= 0")
    result = build_lds(config, progress=not args.no_progress, max_models=args.max_models)
    print(f"{result['done']} of {result['total']} models measured in {args.out}")
    return 0


def _lds_attribute(args: argparse.Namespace) -> int:
    from dtrak_core.evaluation.lds_scores import DEFAULT_GRID, DEFAULT_LAMBDAS, compute_scores, get_entry

    entries = [get_entry(name) for name in args.entries] if args.entries else list(DEFAULT_GRID)
    lambdas = args.lambdas or DEFAULT_LAMBDAS
    status = compute_scores(args.build, entries, lambdas, args.projection_dim, args.cache_dir, args.batch_size,
                            not args.no_progress, args.force)
    for name, state in status.items():
        print(f"{name}: {state}")
    return 0


def _lds_score(args: argparse.Namespace) -> int:
    from dtrak_core.evaluation.lds_scores import evaluate, evaluate_matrix, load_scores, write_report

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
    print(f"LDS of {measured} of {len(results['entries'])} methods written to {Path(args.build) / 'results'}")
    if args.report:
        command = (f"python -m dtrak_core lds score --build {shlex.quote(str(args.build))} "
                   f"--report {shlex.quote(str(args.report))}")
        write_report(args.build, args.report, command)
        print(f"wrote {args.report}")
    return 0


def _lds_report(args: argparse.Namespace) -> int:
    from dtrak_core.evaluation.lds_scores import write_report

    command = (f"python -m dtrak_core lds score --build {shlex.quote(str(args.build))} && "
               f"python -m dtrak_core lds report --build {shlex.quote(str(args.build))} "
               f"--out {shlex.quote(str(args.out))}")
    write_report(args.build, args.out, command)
    print(f"wrote {args.out}")
    return 0


def _counterfactual(args: argparse.Namespace) -> int:
    from dtrak_core.evaluation.counterfactual import (CounterfactualConfig, experiment_lock_path, resolve_k,
                                                      run_counterfactual, write_report)
    from dtrak_core.io import try_lock

    results = args.results or REPO_ROOT / "benchmarks" / "counterfactual" / Path(args.model).resolve().name
    from dtrak_core.evaluation.lds import read_recipe_config

    # k resolved here (default 20% of the recipe's training images) so that the experiment
    # names, and the locks workers share, do not depend on how k was given.
    num_train = read_recipe_config(args.model)["num_train_images"]
    configs = []
    for seed in args.target_seed:
        for method in args.method:
            k = None if method.startswith("artist:") else resolve_k(args.k, num_train)
            config = CounterfactualConfig(model_dir=str(args.model), target_seed=seed, method=method, k=k,
                                          lam=args.lam, num_timesteps=args.num_timesteps,
                                          projection_dim=args.projection_dim, steps_rule=args.steps_rule,
                                          random_seed=args.random_seed, results_dir=str(results))
            if args.models_dir:
                config.models_dir = str(args.models_dir)
            config.validate()  # every input checked before the first retrain
            configs.append(config)
    from dtrak_core.progress import progress_bar

    # update() per experiment (not iteration) so a background job's progress file follows too.
    bar = progress_bar(total=len(configs), desc="counterfactual", unit="experiment",
                       disable=args.no_progress or len(configs) == 1)
    embedder = None
    if args.embedding_model is not None:
        from dtrak_core.evaluation.embeddings import load_embedder

        embedder = load_embedder(args.embedding_model)
    for config in configs:
        # Several workers may run the same batch (one per core): each experiment is run by the
        # worker that locks it first; the others go on to the next one.
        with try_lock(experiment_lock_path(config)) as mine:
            if not mine:
                bar.write(f"seed {config.target_seed} {config.tag}: another worker is running it; skipped")
                bar.update(1)
                continue
            r = run_counterfactual(config, progress=not args.no_progress, embedder=embedder)
        cosine = f", embedding cos {r['embedding_cosine']:.3f}" if embedder is not None else ""
        bar.write(f"seed {r['target_seed']} {r['tag']}: removed {r['k']} ({r['removed_by_artist']}), "
                  f"pixel L2 {r['pixel_l2']:.3f}, SSIM {r['ssim']:.3f}{cosine}")
        bar.update(1)
    bar.close()
    report = args.report or (DEFAULT_CF_REPORT if len(configs) > 1 else None)
    if report:
        command = (f"python -m dtrak_core counterfactual --model {shlex.quote(str(args.model))} --target-seed "
                   f"{format_seeds(args.target_seed)} --method {' '.join(map(shlex.quote, args.method))}"
                   + (f" --k {args.k}" if args.k else "")
                   + (f" --embedding-model {shlex.quote(str(args.embedding_model))}" if args.embedding_model else "")
                   + f" --report {shlex.quote(str(_repo_relative(report)))}")
        write_report(results, report, command)
        print(f"wrote {report}")
    return 0
