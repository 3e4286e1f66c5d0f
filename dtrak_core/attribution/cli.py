"""Command-line subcommands ``featurize`` and ``score``.

``add_subcommands(subparsers)`` registers them on an ``argparse`` sub-parser group; each sets
``func`` to a function taking the parsed namespace and returning an exit code. Every check
that needs no gradients runs before the long work, and bad input ends with one sentence on
stderr (exit code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pandas as pd

from dtrak_core.attribution import dataset_features, loading, scorers
from dtrak_core.attribution.feature_computers import DTYPES, FEATURE_COMPUTERS
from dtrak_core.attribution.feature_store import StaleFeaturesError
from dtrak_core.attribution.featurizer import DEVICES, FeatureSettings
from dtrak_core.attribution.methods import METHODS, Method, get_method, score_targets
from dtrak_core.attribution.output_functions import DEFAULT_OUTPUT_FUNCTION, OUTPUT_FUNCTIONS
from dtrak_core.attribution.projectors import PROJECTORS
from dtrak_core.attribution.results import scores_to_long_table
from dtrak_core.cli_options import add_field_option
from dtrak_core.conventions import DEFAULT_LAMBDA
from dtrak_core.datasets.imagefolder import DatasetError
from dtrak_core.io import atomic_path, ensure_writable
from dtrak_core.models import ModelError

SCORERS = tuple(METHODS) + ("pixel-cosine",)  # "pixel-cosine": the old name of "pixel"


class CliError(Exception):
    """Bad command-line input; the message is the one sentence to print."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _feature_option_kwargs(name: str) -> dict:
    """What a FeatureSettings field needs beyond its default and help: its type or choices."""
    choices = {"output_fn": OUTPUT_FUNCTIONS.names, "projector": PROJECTORS.names,
               "computer": FEATURE_COMPUTERS.names, "device": lambda: list(DEVICES), "dtype": lambda: list(DTYPES)}
    if name in choices:
        return {"choices": choices[name]()}
    if name == "timesteps":
        return {"type": _int_list}
    field_type = {f.name: f.type for f in dataclasses.fields(FeatureSettings)}[name]
    return {"type": int} if field_type == "int" else {}


def _add_feature_options(parser: argparse.ArgumentParser, output_fn: str | None = DEFAULT_OUTPUT_FUNCTION) -> None:
    """One option per FeatureSettings field, with the field's flags, default and help.

    ``output_fn=None``: the option defaults to None, meaning "the scoring method's own".
    """
    group = parser.add_argument_group("features")
    for spec in dataclasses.fields(FeatureSettings):
        kwargs = _feature_option_kwargs(spec.name)
        if spec.name == "output_fn" and output_fn is None:
            kwargs.update(default=None, help=spec.metadata["help"] + " (default: the scoring method's own)")
        add_field_option(group, FeatureSettings, spec.name, *spec.metadata["flags"], **kwargs)
    group.add_argument("--cache-dir", type=Path, default=None,
                       help="feature store root (default: the cache's features/)")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_resize_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resize", action="store_true",
                        help="resize images whose size differs from the model's (default: refuse them)")


def settings_from_args(args: argparse.Namespace) -> FeatureSettings:
    """FeatureSettings from the options ``_add_feature_options`` made (each named as its field)."""
    values = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(FeatureSettings)}
    values["output_fn"] = values["output_fn"] or DEFAULT_OUTPUT_FUNCTION
    values["timesteps"] = tuple(values["timesteps"]) if values["timesteps"] else None
    try:
        return FeatureSettings(**values)
    except ValueError as error:
        raise CliError(str(error)) from None


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``featurize`` and ``score``."""
    p = subparsers.add_parser("featurize", help="compute (or reuse cached) D-TRAK features of an image folder",
                              description="Compute D-TRAK/TRAK features of every image of a folder; "
                              "cached by model weights, data and settings, resumable.")
    p.add_argument("--model", required=True, type=Path, help="pipeline folder")
    p.add_argument("--data", default=None, type=Path,
                   help="image folder (metadata.csv optional); with --training-set, overrides the recipe's")
    p.add_argument("--split", default=None, help="keep only rows with this 'split' value")
    p.add_argument("--training-set", action="store_true",
                   help="featurize exactly the model's training images (selected as its recipe.json says)")
    _add_resize_option(p)
    _add_feature_options(p)
    p.set_defaults(func=cmd_featurize)

    s = subparsers.add_parser("score", help="attribute target images to training images",
                              description="Score every training image for every target image and "
                              "write a tidy table (parquet and CSV).")
    s.add_argument("--model", required=True, type=Path, nargs="+",
                   help="pipeline folder(s); several = ensemble (dtrak...) or checkpoints (tracin)")
    s.add_argument("--train", default=None, type=Path,
                   help="training image folder (with --training-set: overrides the recipe's data folder)")
    s.add_argument("--training-set", action="store_true",
                   help="score against exactly the model's training images (as its recipe.json selects them)")
    s.add_argument("--train-split", default=None)
    s.add_argument("--targets", required=True, type=Path, help="folder of target images")
    s.add_argument("--target-split", default=None)
    s.add_argument("--label-column", default="artist", help="metadata column with the artist/label")
    s.add_argument("--scorer", default="dtrak", choices=SCORERS,
                   help="attribution method (see dtrak_core.attribution.methods; default %(default)s)")
    s.add_argument("--lambda", dest="lambdas", type=float, nargs="+", default=[DEFAULT_LAMBDA],
                   help="ridge lambda(s) for dtrak/relative/renormalized (default %(default)s)")
    s.add_argument("--top", type=int, default=None, help="keep only the top N rows per target")
    s.add_argument("--out", required=True, type=Path,
                   help="output path without suffix; writes OUT.parquet and OUT.csv")
    _add_resize_option(s)
    _add_feature_options(s, output_fn=None)
    s.set_defaults(func=cmd_score)


def _run(fn, args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except (CliError, ModelError, DatasetError, StaleFeaturesError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def cmd_featurize(args: argparse.Namespace) -> int:
    return _run(_featurize, args)


def cmd_score(args: argparse.Namespace) -> int:
    return _run(_score, args)


def _featurize(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    model = loading.load_model(args.model)
    if args.training_set:
        dataset = loading.load_training_set(model, args.data, resize=args.resize)
    elif args.data is None:
        raise CliError("give --data FOLDER or --training-set (the model's own training images)")
    else:
        dataset = loading.load_dataset_for(model, args.data, args.split, resize=args.resize)
    # The store checks its folder (writable, n * k * 4 bytes free) before the first gradient.
    features = dataset_features.featurize(model, dataset, settings, args.cache_dir, not args.no_progress)
    print(f"{features.shape[0]} x {features.shape[1]} features in {features.path}")
    return 0


#: Room per table row for OUT.csv and OUT.parquet together (a CSV row of long file names is
#: about 120 bytes, its parquet copy less), so the free-space check errs on the safe side.
TABLE_BYTES_PER_ROW = 256


def _table_bytes(args: argparse.Namespace, method: Method, num_targets: int, num_train: int) -> int:
    """Estimated size of the score tables: one row per (lambda, target, kept training image)."""
    lambdas = len(args.lambdas) if method.uses_lambda else 1
    kept = min(args.top, num_train) if args.top is not None else num_train
    return lambdas * num_targets * kept * TABLE_BYTES_PER_ROW


def _score(args: argparse.Namespace) -> int:
    # Cheap checks first: lambdas, top, settings, every model folder, both datasets, k <= p.
    method = get_method(args.scorer)
    for lam in args.lambdas:
        scorers.check_lambda(lam)
    if args.top is not None and args.top < 1:
        raise CliError(f"--top {args.top} must be at least 1")
    settings = method.feature_settings(settings_from_args(args), args.output_fn)
    out = Path(args.out)
    ensure_writable(out.parent, 0, "scores")  # a read-only --out fails now, not after the work
    models = [loading.load_model(m) for m in args.model]
    if args.training_set:
        train = loading.load_training_set(models[0], args.train, args.label_column, resize=args.resize)
    elif args.train is None:
        raise CliError("give --train FOLDER or --training-set (the model's own training images)")
    else:
        train = loading.load_dataset_for(models[0], args.train, args.train_split, args.label_column, args.resize)
    targets = loading.load_dataset_for(models[0], args.targets, args.target_split, None, args.resize)
    target_names = targets.metadata["file_name"].astype(str).tolist()
    ensure_writable(out.parent, _table_bytes(args, method, len(targets), len(train)), "scores")
    # A text-to-image model attributes each target with its own caption (the folder's text column).
    captions = models[0].task.captions_for(targets)
    matrices = score_targets(method, models, train, targets.images, settings, args.lambdas,
                             args.cache_dir, not args.no_progress, seed=args.seed, captions=captions)

    frames = []
    for lam, matrix in matrices.items():
        table = scores_to_long_table(matrix, train.metadata, train.label_column, target_names)
        if args.top is not None:
            table = table[table["rank"] <= args.top]
        table.insert(2, "lambda", lam)
        frames.append(table)
    table = pd.concat(frames, ignore_index=True)
    table.insert(3, "scorer", args.scorer)
    with atomic_path(out.with_suffix(".parquet")) as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(out.with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False)
    print(f"{len(table)} rows written to {out.with_suffix('.parquet')} and {out.with_suffix('.csv')}")
    return 0
