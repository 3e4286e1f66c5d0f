"""The attribution methods by name, and the one function that scores targets with any of them.

Every caller (the ``score`` subcommand, the app, benchmarks) goes through :func:`score_targets`:
(method, model(s), training set, target images, feature settings, lambdas) -> score matrices
(m, n), one per lambda, with ``scores[i, j] = tau(target_i, train_j)`` (positive = proponent).

Gradient methods reuse the cached training features of the feature store; the target features
are cached too (keyed by the target pixels), so attributing a target seen before costs a
memory-map read and one matrix product.

A method is a :class:`Method` in :data:`METHODS`: a name, a label, an output function and the
scoring rule (a class in :data:`~dtrak_core.attribution.scorers.SCORERS`) that turns features or
images into scores. A new method is ``register_method(Method(...))``, with a new rule if needed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from dtrak_core.attribution import scorers
from dtrak_core.attribution.feature_store import FeatureSet, compute_features
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.output_functions import OUTPUT_FUNCTIONS
from dtrak_core.attribution.dataset_features import FeatureStatus, featurize, feature_status
from dtrak_core.attribution.loading import LoadedModel, check_dataset_fits
from dtrak_core.attribution.scorers import SCORERS, Scorer, ScoreInputs
from dtrak_core.conventions import DEFAULT_LAMBDA, target_ids, uint8_to_model_range
from dtrak_core.datasets.imagefolder import ImageFolderDataset
from dtrak_core.io import sha256_array, sha256_json
from dtrak_core.plugins import Registry


@dataclass(frozen=True)
class Method:
    """A named attribution method.

    Attributes:
        name: registry key (also the CLI's ``--scorer`` value).
        label: what people call it.
        scorer: the name of its scoring rule in :data:`~dtrak_core.attribution.scorers.SCORERS`
            ("kernel" = TRAK/D-TRAK ridge kernel, "relative", "renormalized", "dot", "cosine",
            "tracin", "pixel-dot", "pixel-cosine", "random", or one registered later).
        output_fn: the output function whose gradients are the features; None exactly when the
            rule reads no gradient features.
        summary: one plain-language sentence.
    """

    name: str
    label: str
    scorer: str
    output_fn: str | None
    summary: str

    def __post_init__(self) -> None:
        rule = SCORERS.get(self.scorer)
        if rule.needs_features and self.output_fn is None:
            raise ValueError(f"method {self.name!r}: scorer {self.scorer!r} reads gradient features, "
                             "so it needs an output function; got None")
        if not rule.needs_features and self.output_fn is not None:
            raise ValueError(f"method {self.name!r}: scorer {self.scorer!r} reads no gradients, so its "
                             f"output function must be None; got {self.output_fn!r}")
        if self.output_fn is not None:
            OUTPUT_FUNCTIONS.get(self.output_fn)

    @property
    def rule(self) -> type[Scorer]:
        """The scoring rule class."""
        return SCORERS.get(self.scorer)

    @property
    def needs_features(self) -> bool:
        return self.rule.needs_features

    @property
    def uses_lambda(self) -> bool:
        return self.rule.uses_lambda

    @property
    def key_fields(self) -> tuple[str, ...]:
        """What its scores depend on besides model, training set, method and target (see :class:`Scorer`)."""
        return self.rule.key_fields()

    def feature_settings(self, base: FeatureSettings, output_fn: str | None = None) -> FeatureSettings:
        """``base`` with this method's output function (or ``output_fn`` when given)."""
        return replace(base, output_fn=output_fn or self.output_fn or base.output_fn)


#: name -> method, in menu order of the CLI.
METHODS: Registry[Method] = Registry("attribution method")


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` under its name."""
    return METHODS.register(method.name)(method)


for _method in (
    Method("dtrak", "D-TRAK", "kernel", "square",
           "gradients of the squared model output, compared through the ridge kernel (the paper's best)"),
    Method("trak", "TRAK", "kernel", "loss",
           "like D-TRAK but with gradients of the training loss (the theoretically motivated choice)"),
    Method("cosine", "gradient cosine", "cosine", "square",
           "cosine of the target's and each training image's gradient features (no kernel)"),
    Method("dot", "gradient dot", "dot", "square",
           "dot product of gradient features (no kernel; large gradients dominate)"),
    Method("tracin", "TracIn", "tracin", "loss",
           "dot product of loss gradients, averaged over the given checkpoints"),
    Method("relative", "relative influence", "relative", "square",
           "D-TRAK score divided by the size of the training image's own influence vector"),
    Method("renormalized", "renormalized influence", "renormalized", "square",
           "D-TRAK score divided by the size of the training image's gradient"),
    Method("pixel", "raw pixel similarity", "pixel-cosine", None,
           "cosine similarity of the raw pixels (a baseline that knows nothing of the model)"),
    Method("pixel-dot", "raw pixel dot", "pixel-dot", None,
           "dot product of the raw pixels (a baseline)"),
    Method("random", "random", "random", None,
           "random scores: the floor any method must beat"),
):
    register_method(_method)

#: The methods the app offers, in menu order.
APP_METHODS = ("dtrak", "trak", "cosine", "tracin", "relative", "renormalized", "pixel", "random")


#: Other names accepted for a method (earlier CLI spellings).
ALIASES = {"pixel-cosine": "pixel"}


def get_method(name: str) -> Method:
    """The method called ``name`` (or an alias of it); unknown names are a one-line error."""
    return METHODS.get(ALIASES.get(name, name))


class FeaturesNotReady(RuntimeError):
    """The training features a method needs are not computed yet (``status`` says how far)."""

    def __init__(self, status: FeatureStatus, settings: FeatureSettings) -> None:
        self.status, self.settings = status, settings
        super().__init__(f"training features are {status.state} ({status.rows_done} of {status.rows} "
                         f"images) in {status.folder}; compute them first")


class MethodCache:
    """Featurizers and kernel decompositions kept between calls (one per process in the app).

    Building a featurizer prepares the model (vmap-friendly attention, projection matrices) and a
    kernel decomposes the training features; both are reused while the model, settings and
    training features stay the same. Thread-safe: the app serves several sessions in threads.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device  # where kernels are decomposed and applied ("cpu" or "cuda")
        self._featurizers: dict[tuple, Featurizer] = {}
        self._kernels: dict[str, scorers.KernelScorer] = {}
        self._lock = threading.Lock()

    def featurizer(self, model: LoadedModel, settings: FeatureSettings) -> Featurizer:
        key = (model.state_dict_hash, model.scheduler_config_hash, id(model.unet), tuple(sorted(settings.to_dict().items())))
        with self._lock:
            if key not in self._featurizers:
                self._featurizers[key] = Featurizer.create(model.task, settings)
            return self._featurizers[key]

    def kernel(self, features: FeatureSet) -> scorers.KernelScorer:
        with self._lock:
            if features.key not in self._kernels:
                self._kernels[features.key] = scorers.KernelScorer(features.features, device=self.device)
            return self._kernels[features.key]


def _as_uint8_images(targets: np.ndarray) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.ndim != 4 or targets.shape[-1] != 3 or targets.dtype != np.uint8 or len(targets) == 0:
        raise ValueError(f"target images must be a non-empty uint8 array (m, H, W, 3), got "
                         f"{targets.dtype} {targets.shape}")
    return targets


def train_features(model: LoadedModel, train: ImageFolderDataset, settings: FeatureSettings,
                   root: str | Path | None = None, progress: bool = False, compute_missing: bool = True,
                   cache: MethodCache | None = None) -> FeatureSet:
    """The training features (n, k): from the store, computed when ``compute_missing``, else
    :class:`FeaturesNotReady`."""
    if not compute_missing:
        status = feature_status(model, train, settings, root)
        if status.state != "complete":
            raise FeaturesNotReady(status, settings)
    featurizer = (cache or MethodCache()).featurizer(model, settings)
    return featurize(model, train, settings, root, progress, featurizer, "train")


def score_targets(method: str | Method, models: Sequence[LoadedModel], train: ImageFolderDataset,
                  targets: np.ndarray, settings: FeatureSettings | None = None,
                  lambdas: Sequence[float] = (DEFAULT_LAMBDA,), root: str | Path | None = None,
                  progress: bool = False, compute_missing: bool = True, seed: int = 0,
                  cache: MethodCache | None = None, captions: Sequence[str] | None = None) -> dict[float, np.ndarray]:
    """Scores of every training image for every target, one float32 matrix (m, n) per lambda.

    Args:
        method: a name in :data:`METHODS` or a :class:`Method`.
        models: one model; several = an ensemble (mean of score matrices) or, for TracIn, the
            checkpoints to average over. All must fit ``train``.
        train: the training set (row j = training image j, noise id j).
        targets: uint8 images (m, H, W, 3) of the model's size.
        settings: feature settings (its output function is used as given: pick it with
            :meth:`Method.feature_settings`); default: the method's defaults.
        lambdas: ridge lambdas for kernel methods; methods without lambda return one matrix
            keyed by NaN.
        root: feature store root (default ``paths.features_dir()``).
        compute_missing: compute missing training features here (long); if False raise
            :class:`FeaturesNotReady` instead.
        seed: seed of the random baseline.
        cache: featurizers and kernels to reuse between calls.
        captions: one per target for a text-to-image model: each target's features are computed
            with its own caption as the condition (the same condition its output is measured
            with), and the captions enter the target features' cache key; None for an
            unconditional model (rules that read no gradients ignore them).
    """
    method = get_method(method) if isinstance(method, str) else method
    rule = method.rule()
    if not models:
        raise ValueError("scoring needs at least one model")
    lambdas = [scorers.check_lambda(lam) for lam in lambdas] if rule.uses_lambda else [float("nan")]
    if not lambdas:
        raise ValueError(f"method {method.label} needs at least one lambda")
    targets = _as_uint8_images(targets)
    if captions is not None:
        captions = [str(c) for c in captions]
        if len(captions) != len(targets):
            raise ValueError(f"{len(captions)} captions for {len(targets)} target images; expected one caption per "
                             "target")
    for model in models:
        check_dataset_fits(train, model)
    if targets.shape[1:3] != train.images.shape[1:3]:
        raise ValueError(f"target images are {targets.shape[2]}x{targets.shape[1]} but the training images are "
                         f"{train.image_size}x{train.image_size}; resize the targets to the model's size")
    if not rule.needs_features:
        return rule.score(ScoreInputs(targets, train.images, seed=seed), lambdas)

    settings = settings or method.feature_settings(FeatureSettings())
    cache = cache or MethodCache()
    target_tensor = uint8_to_model_range(targets)
    # The captions are part of what is featurized (the condition): a target's cache key holds them.
    target_hash = sha256_array(targets) if captions is None else sha256_json(
        {"images": sha256_array(targets), "captions": captions})
    target_features: list[np.ndarray] = []
    train_sets: list[FeatureSet] = []
    for model in models:
        train_sets.append(train_features(model, train, settings, root, progress, compute_missing, cache))
        featurizer = cache.featurizer(model, settings)
        g = compute_features(featurizer, target_tensor, target_hash, target_ids(len(targets)), root,
                             model.state_dict_hash, model.scheduler_config_hash, progress, description="targets",
                             captions=captions)
        target_features.append(np.asarray(g.features))
    inputs = ScoreInputs(targets, train.images, tuple(target_features), tuple(phi.features for phi in train_sets),
                         kernels=lambda index: cache.kernel(train_sets[index]), seed=seed)
    return rule.score(inputs, lambdas)
