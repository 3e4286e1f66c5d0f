"""``docs/benchmarks/calibration.md``: the default lambda before (a constant) and after (calibrated).

For every embedded model (``models/*`` with a recipe), at the app's feature settings (D-TRAK,
K = 10, k = 2048):

(a) the share of 100 training images that rank themselves first when used as targets;
(b) over 64 generated samples (DDIM, 50 steps, seeds 0-63): how many distinct training images
    are a top-1 proponent, the largest share one of them takes, and whether the samples that
    image tops are near-copies of it (pixel RMS distance to it, against each sample's distance
    to its nearest training image in pixels);
(c) where the model has an LDS build: LDS (validation and generated targets, report subsets)
    at the calibrated lambda against the build's tuned lambda, from one score sweep.

    python -m dtrak_core.evaluation.calibration_report --out docs/benchmarks/calibration.md
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dtrak_core import paths
from dtrak_core.attribution.featurizer import FeatureSettings
from dtrak_core.attribution.feature_store import compute_features
from dtrak_core.attribution.loading import load_model, load_training_set
from dtrak_core.attribution.methods import MethodCache, train_features
from dtrak_core.conventions import DEFAULT_LAMBDA, target_ids, uint8_to_model_range
from dtrak_core.evaluation import calibration as cal
from dtrak_core.generation import SamplerConfig, generate_to_folder
from dtrak_core.io import sha256_array
from dtrak_core.models import pipeline_files_hash

NUM_SAMPLES = 64


@dataclass
class Concentration:
    """(b): top-1 proponents of the generated samples at one lambda."""

    distinct: int
    top_share: float
    top_file: str
    near_copy: str


def generated_samples(model_dir: Path) -> np.ndarray:
    folder = generate_to_folder(model_dir, list(range(NUM_SAMPLES)), SamplerConfig(), None, batch_size=64)
    return np.stack([np.asarray(Image.open(folder / f"{s}.png").convert("RGB")) for s in range(NUM_SAMPLES)])


def concentration(scores: np.ndarray, samples: np.ndarray, train_images: np.ndarray, names: list[str]) -> Concentration:
    top1 = scores.argmax(axis=1)
    values, counts = np.unique(top1, return_counts=True)
    hub = int(values[counts.argmax()])
    mine = np.flatnonzero(top1 == hub)
    pixels = lambda a: a.reshape(len(a), -1).astype(np.float64) / 255.0  # noqa: E731
    to_hub = np.sqrt(((pixels(samples[mine]) - pixels(train_images[hub:hub + 1])) ** 2).mean(axis=1))
    distances = np.sqrt(((pixels(samples[mine])[:, None] - pixels(train_images)[None]) ** 2).mean(axis=2))
    nearest_is_hub = float(np.mean(distances.argmin(axis=1) == hub))
    # A near-copy: the hub is the pixel-nearest training image of most of them, and close (RMS <= 0.1 of the range).
    copies = nearest_is_hub >= 0.5 and np.median(to_hub) <= 0.1
    verdict = (f"{'yes' if copies else 'no'}: median RMS pixel distance to it {np.median(to_hub):.2f} (to their "
               f"nearest training image {np.median(distances.min(axis=1)):.2f}); it is the nearest for "
               f"{nearest_is_hub:.0%} of them")
    return Concentration(len(values), float(counts.max() / len(scores)), names[hub], verdict)


def lds_at(build: Path, lambdas: list[float], work: Path) -> dict[float, dict[str, str]]:
    """LDS of D-TRAK K=10 at each of ``lambdas`` on a scratch copy of ``build`` (report subsets)."""
    from dtrak_core.evaluation.lds.scores import compute_scores, evaluate_matrix, get_entry, load_scores

    copy = work / build.name
    shutil.copytree(build, copy)
    compute_scores(copy, [get_entry("dtrak-K10")], lambdas=lambdas, feature_root=work / "features", progress=False)
    sweep, scores = load_scores(copy / "scores" / "dtrak-K10.npz")
    out: dict[float, dict[str, str]] = {}
    for i, lam in enumerate(sweep.tolist()):
        per_kind, _ = evaluate_matrix(copy, np.array([lam]), scores[i:i + 1])
        out[lam] = {kind: f"{100 * r['mean']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
                    for kind, r in per_kind.items() if r.get("status") == "measured"}
    return out


def model_section(model_dir: Path, work: Path) -> list[str]:
    model = load_model(model_dir)
    train = load_training_set(model)
    settings = FeatureSettings()
    cache = MethodCache()
    features = train_features(model, train, settings, progress=True, cache=cache)
    kernel = cache.kernel(features)
    files_hash = pipeline_files_hash(model_dir)
    calibrated = cal.calibrate(features, "dtrak", files_hash, True, kernel)
    self_only = cal.calibrate_by_self_retrieval(features, "dtrak", kernel)
    rows = cal.sample_rows(len(train))
    phi = np.asarray(features.features)
    samples = generated_samples(model_dir)
    g = np.asarray(compute_features(cache.featurizer(model, settings), uint8_to_model_range(samples),
                                    sha256_array(samples), target_ids(len(samples)), None, model.state_dict_hash,
                                    model.scheduler_config_hash, True).features)
    names = train.metadata["file_name"].tolist()
    lambdas = {"before: the constant": DEFAULT_LAMBDA, "after: calibrated": calibrated.lam}
    if self_only.lam != calibrated.lam:
        lambdas["self-retrieval criterion"] = self_only.lam
    lines = [f"## {model_dir.name}", "", f"{len(train)} training images; calibration: {calibrated.detail}.", "",
             "| lambda | value | (a) self-retrieval (100 training images) | (b) distinct top-1 of 64 samples | "
             "(b) largest share | image | samples near-copies of it? |", "|---|---|---|---|---|---|---|"]
    measured = {}
    for label, lam in lambdas.items():
        share = cal.self_retrieval_curve(kernel, phi, rows, (lam,))[lam]
        c = measured[label] = (share, concentration(kernel.scores(g, lam), samples, train.images, names))[1]
        lines.append(f"| {label} | {lam:g} | {share:.0%} | {c.distinct} | {c.top_share:.0%} | `{c.top_file}` | "
                     f"{c.near_copy} |")
        measured[label] = (share, c)
    share, c = measured["after: calibrated"]
    lines += ["", f"Goals at the calibrated lambda: (a) at least 90% self-retrieval: **{'met' if share >= 0.9 else 'not met'}** "
              f"({share:.0%}); (b) no training image top-1 for more than 10% of the samples: "
              f"**{'met' if c.top_share <= 0.10 else 'not met'}** (`{c.top_file}` tops {c.top_share:.0%}; are those "
              f"samples near-copies of it? {c.near_copy})."]
    curve = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(self_only.self_retrieval.items(), key=lambda kv: float(kv[0])))
    lines += ["", f"Self-retrieval by lambda: {curve}. The self-retrieval criterion alone chooses "
              f"{self_only.lam:g}" + (" (the calibration)." if self_only.lam == calibrated.lam else "."), ""]
    builds = [b.parent for b in sorted((paths.REPO_ROOT / "benchmarks" / "lds").glob("*/lds.json"))
              if cal.lds_tuned_lambda(files_hash, "dtrak-K10", b.parent.parent) is not None]
    if builds:
        tuned = cal.lds_tuned_lambda(files_hash, "dtrak-K10").lam
        wanted = sorted({tuned, self_only.lam, DEFAULT_LAMBDA})
        lds = lds_at(builds[0], wanted, work)
        lines += [f"(c) LDS of D-TRAK K=10 on the build `{builds[0].relative_to(paths.REPO_ROOT)}` (report subsets, "
                  "mean [95% bootstrap CI], x100):", "", "| lambda | value | validation | generated |", "|---|---|---|---|"]
        for lam in wanted:
            label = "tuned (the calibration)" if np.isclose(lam, tuned) else (
                "self-retrieval criterion" if np.isclose(lam, self_only.lam) else "the old constant")
            row = next(v for k, v in lds.items() if np.isclose(k, lam))
            lines.append(f"| {label} | {lam:g} | {row.get('validation', '-')} | {row.get('generated', '-')} |")
        lines.append("")
    else:
        lines += ["(c) No LDS build of this model exists.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks/calibration.md")
    parser.add_argument("--models", nargs="*", default=["emoji3-demo", "emoji3-mini"])
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sections = [line for name in args.models for line in model_section(paths.REPO_ROOT / "models" / name, Path(tmp))]
    text = "\n".join(["# Calibration of the default lambda", "",
                      f"Generated by `python -m dtrak_core.evaluation.calibration_report --out {args.out}` on "
                      f"{platform.machine()} with {torch.get_num_threads()} thread(s) in {time.time() - started:.0f} s. "
                      "The criterion and why: `dtrak_core/evaluation/calibration.py`.", "", *sections])
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
