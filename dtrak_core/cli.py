"""Command line: ``python -m dtrak_core <command> ...``; a thin layer over the library."""

# (A comment, not the docstring, which is the text of --help.) The top of the command layer:
# it registers the subcommands each part owns (attribution, bench, evaluation), so those parts
# never import one another for their commands.

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from PIL import Image

from dtrak_core import bench, paths, training_sd
from dtrak_core.attribution import cli as attribution_cli
from dtrak_core.cli_options import add_field_option
from dtrak_core.datasets import load_image_folder
from dtrak_core.datasets.emoji3 import build_emoji3
from dtrak_core.evaluation import cli as evaluation_cli
from dtrak_core.generation import (SamplerConfig, generate_text_to_image, generate_to_folder, image_grid,
                                   text_sample_key)
from dtrak_core.seeds import parse_seeds
from dtrak_core.models import UNET_PRESETS
from dtrak_core.tasks import TextToImageTask, check_model_folder, load_task
from dtrak_core.tasks.text_to_image import GuidanceSettings
from dtrak_core.tasks.prediction import PREDICTION_TYPES
from dtrak_core.training import TrainConfig, held_out_loss, train, untrained_copy


def cmd_caption_data(args: argparse.Namespace) -> None:
    from dtrak_core.datasets.captions import caption_folder

    print(f"wrote {caption_folder(args.data or paths.emoji3_dir(), args.out, args.template)}")


def cmd_build_data(args: argparse.Namespace) -> None:
    out = build_emoji3(args.out or paths.emoji3_dir(), size=args.size, limit=args.limit)
    print(f"wrote {out}")


def _train_option_kwargs(spec: dataclasses.Field) -> dict:
    """What a TrainConfig field's option needs beyond its default and help."""
    special = {"data_dir": {"default": None}, "out_dir": {"required": True, "default": None},
               "filter_values": {"nargs": "*"}, "keep_checkpoints": {"action": "store_true"},
               "preset": {"choices": sorted(UNET_PRESETS)}, "prediction_type": {"choices": PREDICTION_TYPES.names()}}
    if spec.name in special:
        return special[spec.name]
    return {"type": {"int": int, "float": float}[spec.type]} if spec.type in ("int", "float") else {}


def cmd_train(args: argparse.Namespace) -> None:
    values = {spec.name: getattr(args, _dest(spec)) for spec in dataclasses.fields(TrainConfig)}
    values["data_dir"] = str(values["data_dir"] or paths.emoji3_dir())
    values["split"] = None if values["split"] == "all" else values["split"]
    values["filter_values"] = values["filter_values"] or []
    if values["subset"]:
        values["subset"] = [int(x) for x in Path(values["subset"]).read_text().split()]
    print(f"wrote {train(TrainConfig(**values))}")


def _dest(spec: dataclasses.Field) -> str:
    """argparse's dest of a field's option: its first long flag, dashes made underscores."""
    return next(f for f in spec.metadata["flags"] if f.startswith("--"))[2:].replace("-", "_")


def cmd_generate(args: argparse.Namespace) -> None:
    # Before hashing its files: an unfinished or unsupported model is refused even when its
    # samples are cached already (the writers load the model only for missing samples).
    # Then each writer refuses a model of the other kind: prompts for a DDPM, none for an SD.
    task_class = check_model_folder(args.model)
    prompts = _prompts(args)
    if prompts:
        _generate_text_to_image(args, prompts)
        return
    if args.guidance is not None and not issubclass(task_class, TextToImageTask):
        raise ValueError(f"{args.model} holds a {task_class.pipeline_class}, which takes no --guidance (text-to-image "
                         "models only)")
    sampler = SamplerConfig(kind=args.sampler, steps=args.steps, eta=args.eta)
    out = generate_to_folder(args.model, args.seeds, sampler, args.out, batch_size=args.batch_size)
    print(f"wrote {len(args.seeds)} samples to {out}")
    if args.grid:
        images = [Image.open(out / f"{s}.png") for s in args.seeds]
        image_grid(images, columns=8, scale=args.grid_scale).save(args.grid)
        print(f"wrote {args.grid}")


def _prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values, then the lines of ``--prompts-file`` (blank lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        lines = [line.strip() for line in Path(args.prompts_file).read_text().splitlines()]
        if not any(lines):
            raise ValueError(f"{args.prompts_file} holds no prompt; expected one prompt per line")
        prompts += [line for line in lines if line]
    return prompts


def _generate_text_to_image(args: argparse.Namespace, prompts: list[str]) -> None:
    """Every prompt with every seed: PNGs and target records (``generation.generate_text_to_image``)."""
    if args.sampler != "ddim" or args.eta != 0:
        raise ValueError("text-to-image samples are generated with DDIM at eta 0 (what their targets record); "
                         "drop --sampler / --eta")
    defaults = GuidanceSettings()
    guidance = defaults.guidance_scale if args.guidance is None else args.guidance
    settings = GuidanceSettings(guidance_scale=guidance, steps=args.steps)
    out = generate_text_to_image(args.model, prompts, args.seeds, settings, args.out, batch_size=args.batch_size)
    prompts = list(dict.fromkeys(prompts))
    print(f"wrote {len(prompts) * len(args.seeds)} samples ({len(prompts)} prompts x {len(args.seeds)} seeds) to {out}")
    if args.grid:
        images = [Image.open(out / f"{text_sample_key(p, s)}.png") for p in prompts for s in args.seeds]
        columns = len(args.seeds) if len(prompts) > 1 else 8  # one row per prompt
        image_grid(images, columns=columns, scale=args.grid_scale).save(args.grid)
        print(f"wrote {args.grid}")


def cmd_heldout_loss(args: argparse.Namespace) -> None:
    size = load_task(args.model).input_shape[-1]
    data = load_image_folder(args.data or paths.emoji3_dir(), image_size=size, resize=True, split=args.split)
    if args.filter_column:
        data = data.subset(data.where(args.filter_column, args.filter_values or []))
    trained = held_out_loss(args.model, data, num_timesteps=args.timesteps)
    with untrained_copy(args.model) as untrained_dir:
        untrained = held_out_loss(untrained_dir, data, num_timesteps=args.timesteps)
    print(f"held-out diffusion loss on {len(data)} images ({args.split}), {args.timesteps} timesteps: "
          f"trained {trained:.4f}, untrained {untrained:.4f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dtrak_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-data", help="render the emoji3 dataset")
    p.add_argument("--out", default=None, help="folder (default: the cache's emoji3/)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="keep the first N subjects")
    p.set_defaults(func=cmd_build_data)

    p = sub.add_parser("caption-data", help="a captioned copy of an image folder (a 'text' column from a template)")
    p.add_argument("--data", default=None, help="image folder (default: the cache's emoji3/)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--template", default="{name}, {artist} style", help="caption from metadata columns")
    p.set_defaults(func=cmd_caption_data)

    p = sub.add_parser("train", help="train (or resume) a DDPM on an image folder")
    for spec in dataclasses.fields(TrainConfig):
        add_field_option(p, TrainConfig, spec.name, *spec.metadata["flags"], **_train_option_kwargs(spec))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample images with fixed seeds (and prompts, for text-to-image models)")
    p.add_argument("--model", required=True, help="pipeline folder, or a LoRA adapter folder naming its base")
    p.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-15"))
    p.add_argument("--prompt", action="append", default=None,
                   help="text-to-image models: a prompt (repeat for several); each is generated with every seed")
    p.add_argument("--prompts-file", default=None, help="text-to-image models: a file of prompts, one per line")
    p.add_argument("--guidance", type=float, default=None, help=f"text-to-image models: classifier-free guidance "
                   f"scale (<= 1: none; default {GuidanceSettings().guidance_scale:g})")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="folder (default: cache/samples/<model hash>/...)")
    p.add_argument("--grid", default=None, help="also write a PNG grid of the samples here (a row per prompt)")
    p.add_argument("--grid-scale", type=int, default=2)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("heldout-loss", help="diffusion loss of a model and of its untrained twin")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--split", default="validation")
    p.add_argument("--filter-column", default=None)
    p.add_argument("--filter-values", nargs="*")
    p.add_argument("--timesteps", type=int, default=100)
    p.set_defaults(func=cmd_heldout_loss)

    attribution_cli.add_subcommands(sub)  # featurize, score
    bench.add_subcommand(sub)  # bench (after score: the order of --help is unchanged)
    evaluation_cli.add_subcommands(sub)  # lds build|attribute|score|report, counterfactual
    training_sd.add_subcommands(sub)  # train-sd, train-lora
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as error:
        # Our errors are written to be read: one sentence, no stack trace.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # The system's own failures (read-only or full disk, permissions): still one line, naming the file.
        where = f" ({error.filename})" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
