"""The default ridge lambda of a model, measured on that model rather than assumed.

Why per model: lambda is compared with the squared singular values of the training features
Phi (n, k), whose scale depends on the model, its output function and K (on the demo models
s^2 spans 1e-2..1e4). A constant lambda is loose for one model and crushing for another.

Two sources, in order:

1. **An LDS build of this model** (``benchmarks/lds/*/lds.json`` whose ``model_hash`` is the
   model folder's files hash): the lambda its tuning subsets chose for this method and K on the
   held-out *validation* targets (real images, tight CIs; the generated-target choice of the
   same builds has CIs too wide to pick from).
2. **Self-retrieval** on the model's own training features otherwise: the largest lambda on
   the half-decade grid at which every one of up to 100 training images (a seeded sample),
   used as a target, ranks *itself* first. At lambda -> 0 (and n <= k) every training image
   trivially retrieves itself; as lambda grows the kernel becomes a plain inner product and
   high-norm images outrank the image itself. The criterion takes the most regularised kernel
   that still treats every training image as its own strongest proponent: the sanity property
   a user checks first ("attribute a training image: is it on top?"). On the one model with an
   LDS build (emoji3-mini) this picks 3.16, the lambda its tuning subsets chose; a 99% goal
   picked 31.6, whose validation LDS was 8 points lower (docs/benchmarks/calibration.md).

``docs/benchmarks/calibration.md`` measures both against the old constant (lambda = 100):
self-retrieval, how concentrated the top proponents of generated samples are, and LDS at the
calibrated against the tuned lambda where a build exists.

A self-retrieval calibration costs one kernel decomposition and a (100, n) score matrix; it is
cached as ``<cache>/calibration/<features key>-<method>.json`` (the features key is a content
hash of model, data and feature settings), written atomically, with its own checksum.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dtrak_core import paths
from dtrak_core.attribution.feature_store import FeatureSet
from dtrak_core.attribution.scorers import KernelScorer
from dtrak_core.evaluation.lds.config import read_build
from dtrak_core.evaluation.lds.scores import read_results
from dtrak_core.io import sha256_json, write_json_atomic

#: Half-decades 1e-2 .. 1e6: the lambdas the criterion chooses from.
CALIBRATION_LAMBDAS: tuple[float, ...] = tuple(float(10 ** (e / 2)) for e in range(-4, 13))
#: Share of sampled training images that must rank themselves first (all of them).
SELF_RETRIEVAL_GOAL = 1.0
#: Training images sampled as targets (all of them when there are fewer).
SELF_RETRIEVAL_SAMPLE = 100
CRITERION_VERSION = 2


@dataclass(frozen=True)
class Calibration:
    """A model's default lambda and where it came from.

    Attributes:
        lam: the lambda to use by default.
        source: "lds" (tuned on an LDS build) or "self-retrieval".
        detail: one plain sentence saying where ``lam`` came from, for the app and the CLI.
        self_retrieval: lambda (as text) -> share of sampled training images ranked first by
            themselves (empty for an LDS calibration that did not need it).
    """

    lam: float
    source: str
    detail: str
    self_retrieval: dict[str, float]


def self_retrieval_curve(kernel: KernelScorer, train_features: np.ndarray, rows: np.ndarray,
                         lambdas: tuple[float, ...] = CALIBRATION_LAMBDAS) -> dict[float, float]:
    """For each lambda, the share of ``rows`` whose own training image scores highest when the
    row's features are the target: mean_i [argmax_j tau(phi_i, phi_j) == i]."""
    targets = np.asarray(train_features[np.sort(rows)], dtype=np.float64)
    rows = np.sort(rows)
    return {lam: float(np.mean(kernel.scores(targets, lam).argmax(axis=1) == rows)) for lam in lambdas}


def choose_lambda(curve: dict[float, float], goal: float = SELF_RETRIEVAL_GOAL) -> float:
    """The largest lambda whose self-retrieval share reaches ``goal``; if none does, the lambda
    with the highest share (the smallest of those on a tie)."""
    meeting = [lam for lam, share in curve.items() if share >= goal]
    if meeting:
        return max(meeting)
    best = max(curve.values())
    return min(lam for lam, share in curve.items() if share == best)


def sample_rows(n: int, size: int = SELF_RETRIEVAL_SAMPLE, seed: int = 0) -> np.ndarray:
    """``size`` distinct training rows drawn with ``seed`` (all rows when n <= size), sorted."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def calibrate_by_self_retrieval(features: FeatureSet, method: str, kernel: KernelScorer | None = None,
                                cache_root: str | Path | None = None) -> Calibration:
    """The self-retrieval calibration of ``features`` (cached under the features' key)."""
    path = Path(cache_root or paths.cache_dir()) / "calibration" / f"{features.key}-{method}.json"
    cached = _read_cached(path)
    if cached is not None:
        return cached
    kernel = kernel or KernelScorer(features.features)
    rows = sample_rows(len(features.features))
    curve = self_retrieval_curve(kernel, features.features, rows)
    lam = choose_lambda(curve)
    share = curve[lam]
    detail = (f"lambda {lam:g}: the most regularised value at which {share:.0%} of {len(rows)} training images, "
              f"attributed as targets, rank themselves first (goal {SELF_RETRIEVAL_GOAL:.0%})")
    calibration = Calibration(lam, "self-retrieval", detail, {f"{k:g}": v for k, v in curve.items()})
    record = {"calibration": asdict(calibration), "features_key": features.key, "method": method,
              "criterion_version": CRITERION_VERSION}
    write_json_atomic(path, {**record, "sha256": sha256_json(record)})
    return calibration


def _read_cached(path: Path) -> Calibration | None:
    """A cached calibration, or None when absent, torn, of another criterion or failing its checksum."""
    try:
        stored = json.loads(path.read_text())
        record = {k: v for k, v in stored.items() if k != "sha256"}
        if stored.get("sha256") != sha256_json(record) or record.get("criterion_version") != CRITERION_VERSION:
            return None
        return Calibration(**record["calibration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lds_tuned_lambda(files_hash: str, entry_name: str, builds_root: str | Path | None = None) -> Calibration | None:
    """The validation-tuned lambda of ``entry_name`` (e.g. ``dtrak-K10``) in an LDS build of the
    model whose files hash is ``files_hash``; None when no build of that model has one."""
    root = Path(builds_root) if builds_root is not None else paths.REPO_ROOT / "benchmarks" / "lds"
    for build in sorted(root.glob("*/lds.json")):
        try:  # verified reads: a damaged build or result is skipped, never trusted
            if read_build(build.parent).get("model_hash") != files_hash:
                continue
            lam = read_results(build.parent)["entries"][entry_name]["kinds"]["validation"]["lambda"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if lam is None:
            continue
        where = build.parent.relative_to(root.parent.parent) if build.is_relative_to(root.parent.parent) else build.parent
        return Calibration(float(lam), "lds", f"lambda {float(lam):g}: tuned for the best LDS on the held-out "
                           f"images of the LDS build {where} (its tuning subsets)", {})
    return None


def lds_entry_name(method: str, num_timesteps: int, output_fn: str) -> str | None:
    """The LDS grid's entry for a method at K timesteps with its own output function, if any
    (``dtrak``/square and ``trak``/loss at K = 10 or 100)."""
    own = {"dtrak": "square", "trak": "loss"}
    if own.get(method) != output_fn:
        return None
    return f"{method}-K{num_timesteps}"


def calibrate(features: FeatureSet, method: str, files_hash: str, settings_are_lds_defaults: bool,
              kernel: KernelScorer | None = None, cache_root: str | Path | None = None,
              builds_root: str | Path | None = None) -> Calibration:
    """A model's default lambda for ``method``: tuned on its LDS build when one exists and the
    feature settings are the build's (``settings_are_lds_defaults``), self-retrieval otherwise."""
    settings = features.manifest.get("settings", {})
    entry = lds_entry_name(method, int(settings.get("num_timesteps", 0)), str(settings.get("output_fn")))
    if settings_are_lds_defaults and entry is not None:
        tuned = lds_tuned_lambda(files_hash, entry, builds_root)
        if tuned is not None:
            return tuned
    return calibrate_by_self_retrieval(features, method, kernel, cache_root)
