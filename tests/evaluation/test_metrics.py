"""Spearman, LDS and image metrics against scipy and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from dtrak_core.evaluation.metrics import (gaussian_window, lds_per_target, lds_summary, paired_mean_difference,
                                           pixel_l2, spearman, ssim, subset_predictions)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, (7, 30)).astype(float)   # many ties
    y = rng.normal(size=(7, 30)) + 0.3 * x
    ours = spearman(x, y)
    for i in range(7):
        assert ours[i] == pytest.approx(spearmanr(x[i], y[i]).statistic, abs=1e-12)


def test_spearman_of_constant_row_is_nan_and_shapes_are_checked():
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="one shape"):
        spearman(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="at least 2"):
        spearman(np.ones(1), np.ones(1))


def _linear_datamodel(seed: int = 0, n: int = 40, M: int = 60, T: int = 6, noise: float = 0.05):
    """Losses from a known linear datamodel: loss(S, x_i) = c_i - sum_{j in S} tau_ij + noise."""
    rng = np.random.default_rng(seed)
    tau = rng.normal(size=(T, n))
    masks = rng.random((M, n)) < 0.5
    losses = 3.0 - masks.astype(float) @ tau.T + noise * rng.normal(size=(M, T))
    return tau, masks, losses


def test_lds_is_near_one_for_the_true_datamodel_and_near_zero_for_random_scores():
    tau, masks, losses = _linear_datamodel()
    truth = lds_per_target(tau, masks, losses)
    assert truth.min() > 0.9
    random = lds_per_target(np.random.default_rng(1).normal(size=tau.shape), masks, losses)
    assert abs(random.mean()) < 0.2
    # The sign convention: negated scores (opponents as proponents) give -LDS.
    assert lds_per_target(-tau, masks, losses) == pytest.approx(-truth)


def test_lds_per_target_equals_scipy_on_the_explicit_predictions():
    tau, masks, losses = _linear_datamodel(noise=2.0)
    scores = tau + np.random.default_rng(3).normal(size=tau.shape)
    ours = lds_per_target(scores, masks, losses)
    for i in range(len(tau)):
        prediction = [scores[i, masks[m]].sum() for m in range(len(masks))]   # sum over j in S_m
        assert ours[i] == pytest.approx(spearmanr(prediction, -losses[:, i]).statistic, abs=1e-10)
    assert subset_predictions(scores, masks)[2, 5] == pytest.approx(scores[2, masks[5]].sum())


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    tau, masks, losses = _linear_datamodel(noise=3.0)
    noisy = tau + np.random.default_rng(5).normal(size=tau.shape)
    a = lds_summary(noisy, masks, losses, num_bootstrap=200, seed=1)
    b = lds_summary(noisy, masks, losses, num_bootstrap=200, seed=1)
    assert a == b
    assert a.ci_low < a.mean < a.ci_high
    assert a.num_subsets == len(masks) and a.num_targets == len(tau)
    assert a.mean == pytest.approx(np.mean(lds_per_target(noisy, masks, losses)))


def test_lds_rejects_mismatched_inputs():
    tau, masks, losses = _linear_datamodel()
    with pytest.raises(ValueError, match="do not match"):
        lds_per_target(tau, masks, losses[:, :3])
    with pytest.raises(ValueError, match="bool"):
        lds_per_target(tau, masks.astype(int), losses)
    with pytest.raises(ValueError, match="cover"):
        lds_per_target(tau[:, :10], masks, losses)


def test_pixel_l2_on_uint8_and_float():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    b[1, 2, 1] = 51
    assert pixel_l2(a, b) == pytest.approx(np.sqrt(1.0 + 0.2 ** 2))
    assert pixel_l2(a / 255.0, b / 255.0) == pytest.approx(pixel_l2(a, b))
    with pytest.raises(ValueError, match="one shape"):
        pixel_l2(a, b[:3])


def _ssim_brute_force(a: np.ndarray, b: np.ndarray, sigma: float = 1.5, radius: int = 5) -> float:
    """SSIM with explicit loops over pixels and window offsets (edge mirrored: d c b a | a b c d)."""
    w = gaussian_window(sigma, radius)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    h, width, channels = a.shape
    pa = np.pad(a, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    pb = np.pad(b, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    values = []
    for c in range(channels):
        for y in range(h):
            for x in range(width):
                wa = pa[y:y + 2 * radius + 1, x:x + 2 * radius + 1, c]
                wb = pb[y:y + 2 * radius + 1, x:x + 2 * radius + 1, c]
                ma, mb = (w * wa).sum(), (w * wb).sum()
                va = (w * (wa - ma) ** 2).sum()
                vb = (w * (wb - mb) ** 2).sum()
                cov = (w * (wa - ma) * (wb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_brute_force_and_orders_changes():
    rng = np.random.default_rng(0)
    a = rng.random((12, 12, 3))
    small = np.clip(a + 0.05 * rng.normal(size=a.shape), 0, 1)
    large = np.clip(a + 0.4 * rng.normal(size=a.shape), 0, 1)
    assert ssim(a, small) == pytest.approx(_ssim_brute_force(a, small), abs=1e-10)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, small) == pytest.approx(ssim(small, a))
    assert 1.0 > ssim(a, small) > ssim(a, large)
    uint8 = (a * 255).round().astype(np.uint8)
    assert ssim(uint8, uint8) == pytest.approx(1.0)


def test_paired_difference_is_the_difference_of_the_means_with_a_ci_that_excludes_0_for_truth_vs_random():
    from dtrak_core.evaluation.lds.scores import ordering_verdict
    from dtrak_core.evaluation.metrics import paired_lds_difference

    truth, masks, losses = _linear_datamodel()
    noise = np.random.default_rng(5).normal(size=truth.shape)
    a, b = subset_predictions(truth, masks), subset_predictions(noise, masks)
    difference, low, high = paired_lds_difference(a, b, losses, num_bootstrap=200)
    expected = lds_per_target(truth, masks, losses).mean() - lds_per_target(noise, masks, losses).mean()
    assert difference == pytest.approx(expected, abs=1e-12)
    assert 0 < low <= difference <= high and ordering_verdict(low, high, difference) == "holds"
    assert paired_lds_difference(b, a, losses, num_bootstrap=200)[0] == pytest.approx(-expected)
    # The same method against itself: exactly 0 on every resample.
    assert paired_lds_difference(a, a, losses, num_bootstrap=50) == (0.0, 0.0, 0.0)
    assert paired_lds_difference(a, b, losses, num_bootstrap=50, seed=3) == \
        paired_lds_difference(a, b, losses, num_bootstrap=50, seed=3)
    assert ordering_verdict(-0.3, -0.1, -0.2) == "reversed"
    assert ordering_verdict(-0.1, 0.2, 0.05) == "holds by the mean, CI includes 0"
    with pytest.raises(ValueError, match="shapes differ"):
        paired_lds_difference(a, b[:, :-1], losses)


def test_common_factor_share_is_near_one_for_a_shared_shift_and_small_for_independent_noise():
    from dtrak_core.evaluation.metrics import common_factor_share

    rng = np.random.default_rng(0)
    shared = rng.normal(size=(40, 1)) + 0.01 * rng.normal(size=(40, 30))
    assert common_factor_share(shared) > 0.99
    independent = rng.normal(size=(40, 30))
    assert common_factor_share(independent) < 0.15
    # Brute force: the largest eigenvalue of the target covariance over its trace.
    eig = np.linalg.eigvalsh(np.cov(independent, rowvar=False))
    assert common_factor_share(independent) == pytest.approx(eig[-1] / eig.sum())
    # A constant offset per target changes nothing (columns are centred).
    assert common_factor_share(independent + np.arange(30)) == pytest.approx(common_factor_share(independent))
    with pytest.raises(ValueError, match="at least 2"):
        common_factor_share(np.zeros((1, 5)))


def test_paired_mean_difference_brackets_the_mean_and_ignores_what_pairs_share():
    rng = np.random.default_rng(3)
    fragility = rng.gamma(2.0, 2.0, size=30)             # per-target scale both methods share
    a, b = fragility + 0.5 + rng.normal(0, 0.05, 30), fragility
    difference, low, high = paired_mean_difference(a, b, num_bootstrap=500, seed=1)
    assert difference == pytest.approx(np.mean(a - b)) and low <= difference <= high
    assert low > 0.4 and high < 0.6                       # the shared spread (sd ~2.8) stays out
    assert paired_mean_difference(a, b, num_bootstrap=500, seed=1) == (difference, low, high)
    assert paired_mean_difference(b + 1.0, b) == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="1-D arrays"):
        paired_mean_difference(a, b[:-1])
    with pytest.raises(ValueError, match="confidence"):
        paired_mean_difference(a, b, confidence=1.5)
