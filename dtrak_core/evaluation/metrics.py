"""Metrics of the evaluation: Spearman correlation, LDS with a bootstrap CI, pixel L2 and SSIM.

Everything is plain numpy/scipy and vectorised over targets, because an LDS table evaluates
thousands of (target, method, lambda) correlations and a bootstrap repeats them a thousand times.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

#: Bootstrap resamples of a CI (over subsets for the LDS, over targets for paired differences).
DEFAULT_NUM_BOOTSTRAP = 1000
#: Resamples of a paired mean difference over targets (a few dozen pairs: cheap, so more of them).
DEFAULT_PAIRED_BOOTSTRAP = 2000


def _ranks(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Average ranks (ties share the mean rank, as Spearman's definition asks) along ``axis``."""
    return rankdata(values, method="average", axis=axis)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of ``x`` and ``y`` along the last axis.

    x, y: arrays of the same shape (..., M). Returns shape (...): the Pearson correlation of the
    ranks. A row where either side is constant has no defined correlation: NaN.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs arrays of one shape, got {x.shape} and {y.shape}")
    if x.shape[-1] < 2:
        raise ValueError(f"spearman needs at least 2 paired values, got {x.shape[-1]}")
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean(axis=-1, keepdims=True)
    ry -= ry.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(-1) / denominator
    return np.where(denominator > 0, rho, np.nan)


def check_masks(masks: np.ndarray, num_train: int | None = None) -> np.ndarray:
    """Subset membership as a bool matrix (M, n); M >= 2 subsets are needed for a correlation."""
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != bool:
        raise ValueError(f"subset masks must be a bool matrix (subsets, train), got {masks.dtype} {masks.shape}")
    if num_train is not None and masks.shape[1] != num_train:
        raise ValueError(f"subset masks cover {masks.shape[1]} training images but the scores have {num_train}")
    if masks.shape[0] < 2:
        raise ValueError(f"LDS needs at least 2 subsets with measured outputs, got {masks.shape[0]}")
    return masks


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Datamodel predictions (T, M): prediction[i, m] = sum_{j in S_m} scores[i, j].

    scores: (T, n) attribution scores of T targets; masks: (M, n) bool subset membership.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a matrix (targets, train), got shape {scores.shape}")
    masks = check_masks(masks, scores.shape[1])
    return scores @ masks.T.astype(np.float64)


def lds_per_target(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """LDS of every target, (T,): Spearman over subsets of prediction vs the negated loss.

    scores: (T, n); masks: (M, n) bool; losses: (M, T) measured loss of subset model m on target
    i. A proponent lowers the loss, so a good attribution predicts high values where the loss is
    low: we correlate with -loss.
    """
    predictions = subset_predictions(scores, masks)
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"losses of shape {losses.shape} do not match {masks.shape[0]} subsets x "
                         f"{scores.shape[0]} targets")
    return spearman(predictions, -losses.T)


@dataclass(frozen=True)
class LdsSummary:
    """Mean LDS over targets with a bootstrap CI over subsets (all as fractions, not %)."""

    mean: float
    ci_low: float
    ci_high: float
    num_targets: int
    num_subsets: int
    num_undefined: int  # targets whose correlation is undefined (constant predictions or outputs)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "num_targets": self.num_targets, "num_subsets": self.num_subsets,
                "num_undefined": self.num_undefined}


def _nanmean_or_nan(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    # An all-NaN slice (no defined correlation) is an answer here, not something to warn about.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def lds_summary(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray,
                num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP, confidence: float = 0.95, seed: int = 0) -> LdsSummary:
    """Mean LDS over targets and a percentile bootstrap CI that resamples the subsets.

    Each bootstrap replicate draws M subsets with replacement, recomputes every target's
    Spearman correlation on them and averages over targets; the CI is the (1-c)/2 and (1+c)/2
    percentiles of those means. Undefined correlations are left out of the means.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be between 0 and 1")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap {num_bootstrap} must be at least 1")
    per_target = lds_per_target(scores, masks, losses)
    predictions = subset_predictions(scores, masks)                   # (T, M)
    actual = -np.asarray(losses, dtype=np.float64).T                  # (T, M)
    rng = np.random.default_rng(seed)
    M = masks.shape[0]
    means = np.empty(num_bootstrap)
    for b in range(num_bootstrap):
        pick = rng.integers(0, M, M)
        means[b] = _nanmean_or_nan(spearman(predictions[:, pick], actual[:, pick]))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.nanpercentile(means, [100 * alpha, 100 * (1 - alpha)]) if np.isfinite(means).any() \
        else (np.nan, np.nan)
    return LdsSummary(float(_nanmean_or_nan(per_target)), float(low), float(high), int(len(per_target)),
                      int(M), int(np.isnan(per_target).sum()))


def paired_lds_difference(predictions_a: np.ndarray, predictions_b: np.ndarray, losses: np.ndarray,
                          num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP, confidence: float = 0.95,
                          seed: int = 0) -> tuple[float, float, float]:
    """LDS(a) - LDS(b) on the same targets and subsets, with a paired bootstrap CI over subsets.

    predictions_*: (T, M) predicted outputs of two methods; losses: (M, T) measured losses.
    Each replicate draws M subsets with replacement and computes both methods' mean LDS on that
    same draw, so the subset noise the two share cancels (unlike comparing two separate CIs).
    Returns (difference, CI low, CI high) as fractions; a target undefined for either method
    is left out of both.
    """
    predictions_a, predictions_b = np.asarray(predictions_a, float), np.asarray(predictions_b, float)
    if predictions_a.shape != predictions_b.shape:
        raise ValueError(f"prediction shapes differ: {predictions_a.shape} vs {predictions_b.shape}")
    actual = -np.asarray(losses, dtype=np.float64).T                  # (T, M)

    def difference(pick: np.ndarray) -> float:
        a = spearman(predictions_a[:, pick], actual[:, pick])
        b = spearman(predictions_b[:, pick], actual[:, pick])
        both = np.isfinite(a) & np.isfinite(b)
        return float(np.mean(a[both] - b[both])) if both.any() else np.nan

    M = actual.shape[1]
    rng = np.random.default_rng(seed)
    draws = np.array([difference(rng.integers(0, M, M)) for _ in range(num_bootstrap)])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.nanpercentile(draws, [100 * alpha, 100 * (1 - alpha)]) if np.isfinite(draws).any() \
        else (np.nan, np.nan)
    return difference(np.arange(M)), float(low), float(high)


def paired_mean_difference(a: np.ndarray, b: np.ndarray, num_bootstrap: int = DEFAULT_PAIRED_BOOTSTRAP,
                           confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """mean(a - b) over paired items (T,), with a percentile bootstrap CI that resamples the pairs.

    a, b: (T,) one value per item (e.g. a counterfactual's pixel L2 per target for two removal
    methods). Resampling pairs, not the two sides apart, keeps what a target shares between the
    methods (how fragile its image is) out of the interval. Returns (difference, CI low, CI high).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 1:
        raise ValueError(f"paired values must be two 1-D arrays of one non-zero length, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1 or num_bootstrap < 1:
        raise ValueError(f"need 0 < confidence < 1 and num_bootstrap >= 1, got {confidence} and {num_bootstrap}")
    differences = a - b
    rng = np.random.default_rng(seed)
    draws = differences[rng.integers(0, len(differences), (num_bootstrap, len(differences)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(draws, [100 * alpha, 100 * (1 - alpha)])
    return float(differences.mean()), float(low), float(high)


def common_factor_share(losses: np.ndarray) -> float:
    """Share of the across-subset variance of the losses carried by their first principal component.

    losses: (M, T) measured outputs. Centre each target's column over the subsets, then return
    s_1^2 / sum_i s_i^2 from the singular values s. Near 1: the subset models' losses rise and fall
    together on every target (one model trained better overall), which no per-target attribution
    can predict, so per-target LDS estimates move together and the CI over subsets is wide.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or min(losses.shape) < 2:
        raise ValueError(f"losses must be (subsets, targets) with at least 2 of each, got shape {losses.shape}")
    centred = losses - losses.mean(axis=0, keepdims=True)
    singular = np.linalg.svd(centred, compute_uv=False)
    total = float((singular ** 2).sum())
    return float(singular[0] ** 2 / total) if total > 0 else float("nan")


def _as_unit_images(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float64 in [0, 1]; float images are taken as already in [0, 1]."""
    images = np.asarray(images)
    return images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)


def pixel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of two images over all pixels and channels, values in [0, 1].

    a, b: (H, W, C) uint8 (divided by 255) or float in [0, 1]. For a 16x16x3 image the
    maximum is sqrt(768) ~ 27.7; the paper's CIFAR numbers (32x32x3) have a maximum of ~55.4.
    """
    a, b = _as_unit_images(a), _as_unit_images(b)
    if a.shape != b.shape:
        raise ValueError(f"pixel L2 needs images of one shape, got {a.shape} and {b.shape}")
    return float(np.sqrt(((a - b) ** 2).sum()))


#: SSIM constants of Wang et al. (2004) for a data range L = 1.
SSIM_K1, SSIM_K2 = 0.01, 0.03


def gaussian_window(sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """The normalised 2-D Gaussian weights (2r+1, 2r+1) of the SSIM window."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-(offsets ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g)
    return w / w.sum()


def ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, radius: int = 5) -> float:
    """Structural similarity (Wang et al. 2004) of two images, mean over pixels and channels.

    a, b: (H, W, C) uint8 or float in [0, 1] (data range L = 1). With Gaussian-weighted local
    means mu, variances s^2 and covariance s_ab (window of radius ``radius``, reflected at the
    border, so a 16 px image keeps all its pixels):

        SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
        C1 = (0.01 L)^2, C2 = (0.03 L)^2.

    1 for identical images; lower is more different.
    """
    a, b = _as_unit_images(a), _as_unit_images(b)
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one shape, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"SSIM needs (H, W) or (H, W, C) images, got shape {a.shape}")
    window = gaussian_window(sigma, radius)

    def blur(x: np.ndarray) -> np.ndarray:
        # One 2-D correlation per channel; mode="reflect" mirrors the edge (d c b a | a b c d).
        return np.stack([ndimage.correlate(x[..., c], window, mode="reflect") for c in range(x.shape[-1])], -1)

    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(value.mean())
