"""Are a text-to-image model's images recognisable? Measured by judges trained here, not asserted.

Two judges (``evaluation.classifier``), trained on the model's dataset at its image size:

- **artist**: every artist, trained on the ``train`` split, tested on ``validation`` (subjects it
  never saw: the style, not the subject);
- **subject**: the subjects of the LoRA's training rows (``subject_column``, e.g. the emoji
  name), one drawing per subject held out and tested (is a subject recognised in an artist's
  drawing the judge did not see?).

Then each of the LoRA's training prompts (``"<subject>, <artist> style"``; its caption column)
is generated with ``seeds`` and judged: the share whose predicted artist is the prompted artist
and whose predicted subject is the prompted subject. The unconditional demo's samples are
judged by the same artist judge beside them (no prompt: how its artist predictions spread and
how sure the judge is).

    python -m dtrak_core.evaluation.recognisability --model models/emoji3-sd-travel \
        --unconditional models/emoji3-demo --out docs/recognisability.md --grid docs/sd-demo-grid.png
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dtrak_core.attribution.loading import load_model, load_training_set
from dtrak_core.datasets import ImageFolderDataset, load_image_folder
from dtrak_core.evaluation.classifier import Classifier, ClassifierConfig, train_classifier
from dtrak_core.generation import (SamplerConfig, generate_text_to_image, generate_to_folder, image_grid,
                                   text_sample_key)
from dtrak_core.tasks.text_to_image import GuidanceSettings, dataset_captions


@dataclass
class Judged:
    """Generated images of prompts with what each judge says."""

    prompts: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    prompted_artist: list[str]
    prompted_subject: list[str]
    artist: list[str]
    subject: list[str]

    @property
    def artist_share(self) -> float:
        return float(np.mean(np.array(self.artist) == np.array(self.prompted_artist)))

    @property
    def subject_share(self) -> float:
        return float(np.mean(np.array(self.subject) == np.array(self.prompted_subject)))


def train_judges(full: ImageFolderDataset, lora_rows: ImageFolderDataset, subject_column: str,
                 steps: int, seed: int = 0) -> tuple[Classifier, Classifier]:
    """(artist judge, subject judge): see the module docstring."""
    artist = train_classifier(full, ClassifierConfig(column=full.label_column or "artist", protocol="split",
                                                      steps=steps, seed=seed))
    subject = train_classifier(lora_rows, ClassifierConfig(column=subject_column, protocol="one-per-group",
                                                           group_column=subject_column, steps=steps, seed=seed))
    return artist, subject


def judge_prompts(model_dir: Path, rows: ImageFolderDataset, subject_column: str, artist_column: str,
                  seeds: list[int], settings: GuidanceSettings, judges: tuple[Classifier, Classifier],
                  out_dir: Path | None = None) -> Judged:
    """Generate each distinct training prompt of ``rows`` with ``seeds`` and judge the images."""
    captions = dataset_captions(rows)
    first = {}
    for i, caption in enumerate(captions):
        first.setdefault(caption, i)
    prompts = list(first)
    folder = generate_text_to_image(model_dir, prompts, seeds, settings, out_dir, progress=True)
    images, prompt_of, artist_of, subject_of = [], [], [], []
    for prompt in prompts:
        row = rows.metadata.iloc[first[prompt]]
        for seed in seeds:
            images.append(np.asarray(Image.open(folder / f"{text_sample_key(prompt, seed)}.png").convert("RGB")))
            prompt_of.append(prompt)
            artist_of.append(str(row[artist_column]))
            subject_of.append(str(row[subject_column]))
    images = np.stack(images)
    artist_judge, subject_judge = judges
    return Judged(prompt_of, images, artist_of, subject_of, artist_judge.predict(images), subject_judge.predict(images))


def unconditional_artists(model_dir: Path, seeds: list[int], judge: Classifier) -> tuple[Counter, float]:
    """The artist judge on an unconditional model's samples: prediction counts, mean top probability."""
    folder = generate_to_folder(model_dir, seeds, SamplerConfig(), None, batch_size=64)
    images = np.stack([np.asarray(Image.open(folder / f"{s}.png").convert("RGB")) for s in seeds])
    probabilities = judge.predict_proba(images)
    return Counter(judge.classes[i] for i in probabilities.argmax(1)), float(probabilities.max(1).mean())


def report(model_dir: Path, judged: Judged, judges: tuple[Classifier, Classifier], unconditional: tuple | None,
           command: str, seconds: float) -> str:
    artist_judge, subject_judge = judges
    n = len(judged.images)
    lines = ["# Recognisability of the text-to-image demo", "",
             f"Generated by `{command}` on {platform.machine()} with {torch.get_num_threads()} thread(s) in "
             f"{seconds:.0f} s. Method: `dtrak_core/evaluation/recognisability.py`.", "",
             "## The judges (held-out real images)", "",
             "| judge | classes | trained on | held-out protocol | held-out accuracy | chance |", "|---|---|---|---|---|---|",
             f"| artist | {len(artist_judge.classes)} | {artist_judge.record['train_rows']} images | validation split "
             f"(unseen subjects), {artist_judge.record['test_rows']} images | "
             f"{artist_judge.record['held_out_accuracy']:.1%} | {artist_judge.record['chance_accuracy']:.1%} |",
             f"| subject | {len(subject_judge.classes)} | {subject_judge.record['train_rows']} images | one drawing per "
             f"subject held out, {subject_judge.record['test_rows']} images | "
             f"{subject_judge.record['held_out_accuracy']:.1%} | {subject_judge.record['chance_accuracy']:.1%} |", "",
             f"## {n} images generated from the LoRA's training prompts (`{model_dir}`)", "",
             f"- predicted artist = prompted artist: **{judged.artist_share:.1%}** (goal >= 90%)",
             f"- predicted subject = prompted subject: **{judged.subject_share:.1%}** (goal >= 50%)", ""]
    by_artist = sorted(set(judged.prompted_artist))
    lines += ["| prompted artist | images | judged that artist | judged the prompted subject |", "|---|---|---|---|"]
    for artist in by_artist:
        mine = np.array(judged.prompted_artist) == artist
        lines.append(f"| {artist} | {int(mine.sum())} | {np.mean(np.array(judged.artist)[mine] == artist):.1%} | "
                     f"{np.mean(np.array(judged.subject)[mine] == np.array(judged.prompted_subject)[mine]):.1%} |")
    if unconditional is not None:
        name, counts, confidence = unconditional
        total = sum(counts.values())
        spread = ", ".join(f"{a} {c / total:.0%}" for a, c in sorted(counts.items()))
        lines += ["", f"## Beside it: the unconditional demo `{name}` ({total} samples, no prompt)", "",
                  f"The artist judge calls them: {spread}; its mean top probability {confidence:.2f}. "
                  "(No prompt, so there is no prompted artist or subject to match.)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the LoRA adapter folder (or an SD pipeline folder)")
    parser.add_argument("--data", default=None, help="the full captioned dataset (default: the model's recipe's)")
    parser.add_argument("--subject-column", default="name")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per prompt (0..N-1)")
    parser.add_argument("--guidance", type=float, default=GuidanceSettings().guidance_scale)
    parser.add_argument("--steps", type=int, default=GuidanceSettings().steps)
    parser.add_argument("--judge-steps", type=int, default=1500)
    parser.add_argument("--unconditional", default=None, help="an unconditional model judged beside it")
    parser.add_argument("--unconditional-samples", type=int, default=300)
    parser.add_argument("--out", required=True)
    parser.add_argument("--grid", default=None, help="a 64-image grid PNG; its prompts go beside it (.txt)")
    args = parser.parse_args()
    started = time.time()
    model_dir = Path(args.model)
    model = load_model(model_dir)
    rows = load_training_set(model)
    full = load_image_folder(args.data or rows.root, image_size=rows.image_size, label_column=rows.label_column)
    judges = train_judges(full, rows, args.subject_column, args.judge_steps)
    settings = GuidanceSettings(guidance_scale=args.guidance, steps=args.steps)
    judged = judge_prompts(model_dir, rows, args.subject_column, rows.label_column or "artist",
                           list(range(args.seeds)), settings, judges)
    unconditional = None
    if args.unconditional:
        counts, confidence = unconditional_artists(Path(args.unconditional), list(range(args.unconditional_samples)),
                                                   judges[0])
        unconditional = (args.unconditional, counts, confidence)
    command = "python -m dtrak_core.evaluation.recognisability " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    Path(args.out).write_text(report(model_dir, judged, judges, unconditional, command, time.time() - started))
    if args.grid:
        pick = np.linspace(0, len(judged.images) - 1, 64).astype(int)
        image_grid([Image.fromarray(judged.images[i]) for i in pick], columns=8, scale=3).save(args.grid)
        Path(args.grid).with_suffix(".txt").write_text(
            "\n".join(f"{k + 1}: {judged.prompts[i]}" for k, i in enumerate(pick)) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
