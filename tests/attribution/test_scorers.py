import numpy as np
import pytest
import torch

from dtrak_core.attribution.scorers import (SCORERS, KernelScorer, ScoreInputs, check_lambda, cosine_scores,
                                            dot_scores, ensemble_scores, pixel_scores, random_scores,
                                            relative_influence, renormalized_influence,
                                            tracin_scores, trak_scores)

LAMBDAS = [1e-3, 0.1, 1.0, 10.0, 1e3]


def features(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def direct(g: np.ndarray, phi: np.ndarray, lam: float) -> np.ndarray:
    phi = phi.astype(np.float64)
    inverse_phi_t = np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T)
    return g.astype(np.float64) @ inverse_phi_t


@pytest.mark.parametrize("n,k", [(12, 40), (40, 12)])  # Gram side and covariance side
@pytest.mark.parametrize("method", ["auto", "gram", "covariance"])
def test_kernel_scores_equal_a_direct_solve(n, k, method):
    phi, g = features(n, k), features(5, k, seed=1)
    scorer = KernelScorer(phi, method=method, chunk=7)  # chunk < n exercises chunking
    if method == "auto":
        assert scorer.method == ("gram" if n <= k else "covariance")
    for lam, scores in scorer.sweep(g, LAMBDAS).items():
        expected = direct(g, phi, lam)
        assert scores.shape == (5, n)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert scorer.rank == min(n, k)


def test_kernel_on_a_memmap_and_rank_deficient_features(tmp_path):
    phi = features(10, 30)
    phi[5] = phi[0]  # duplicate row -> rank 9
    path = tmp_path / "phi.npy"
    np.save(path, phi)
    scorer = KernelScorer(np.load(path, mmap_mode="r"), chunk=4)
    assert scorer.rank == 9
    g = features(3, 30, seed=2)
    np.testing.assert_allclose(scorer.scores(g, 1.0), direct(g, phi, 1.0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(trak_scores(g, phi, 1.0), direct(g, phi, 1.0), rtol=1e-4, atol=1e-6)


def test_small_lambda_with_k_greater_than_n_picks_the_training_point_itself():
    phi = features(8, 50)
    scores = KernelScorer(phi).scores(phi, 1e-8)
    np.testing.assert_allclose(scores, np.eye(8), atol=1e-4)


@pytest.mark.parametrize("lam", [-1.0, float("nan"), float("inf")])
def test_bad_lambda_is_a_clear_error(lam):
    with pytest.raises(ValueError, match="lambda=.* must be a finite number >= 0"):
        check_lambda(lam)
    with pytest.raises(ValueError, match="lambda"):
        KernelScorer(features(4, 6)).scores(features(1, 6), lam)


def test_feature_dimension_mismatch_is_refused():
    with pytest.raises(ValueError, match="target features have k=5 but the train features have k=6"):
        KernelScorer(features(4, 6)).scores(features(1, 5), 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        KernelScorer(np.zeros((0, 6), np.float32))
    for shape in ((3, 5), (5, 3)):  # both sides
        with pytest.raises(ValueError, match="the train features are all zero"):
            KernelScorer(np.zeros(shape, np.float32))


def test_dot_cosine_and_renormalized_brute_force():
    phi, g = features(9, 7), features(4, 7, seed=1)
    phi[3] = 0  # a zero feature scores 0, not NaN
    dots = np.array([[gi @ pj for pj in phi.astype(np.float64)] for gi in g.astype(np.float64)])
    np.testing.assert_allclose(dot_scores(g, phi, chunk=2), dots, rtol=1e-5, atol=1e-5)
    norms = np.linalg.norm(phi, axis=1)
    cos = np.array([[d / (np.linalg.norm(gi) * nj) if nj > 0 else 0.0 for d, nj in zip(row, norms)]
                    for row, gi in zip(dots, g)])
    np.testing.assert_allclose(cosine_scores(g, phi, chunk=4), cos, rtol=1e-5, atol=1e-6)
    assert np.abs(cosine_scores(g, phi)).max() <= 1 + 1e-6
    tau = direct(g, np.delete(phi, 3, axis=0), 1.0)
    renorm = renormalized_influence(tau, np.delete(phi, 3, axis=0))
    np.testing.assert_allclose(renorm, tau / np.delete(norms, 3)[None], rtol=1e-5)


def test_relative_influence_brute_force():
    phi, g = features(6, 10), features(2, 10, seed=3)
    lam = 2.0
    inverse = np.linalg.inv(phi.T.astype(np.float64) @ phi + lam * np.eye(10))
    expected = direct(g, phi, lam) / np.linalg.norm(phi @ inverse, axis=1)[None]
    np.testing.assert_allclose(relative_influence(KernelScorer(phi), g, lam), expected, rtol=1e-4)


def test_tracin_and_ensemble():
    checkpoints = [(features(2, 5, s), features(4, 5, s + 10)) for s in range(3)]
    total = sum(g.astype(np.float64) @ phi.T for g, phi in checkpoints)
    np.testing.assert_allclose(tracin_scores(checkpoints, "sum"), total, rtol=1e-5)
    np.testing.assert_allclose(tracin_scores(checkpoints), total / 3, rtol=1e-5)
    np.testing.assert_allclose(tracin_scores(checkpoints, weights=[1, 0, 0]),
                               checkpoints[0][0] @ checkpoints[0][1].T / 3, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one checkpoint"):
        tracin_scores([])
    a, b = np.ones((2, 3)), np.zeros((2, 3))
    np.testing.assert_allclose(ensemble_scores([a, b]), 0.5 * np.ones((2, 3)))
    with pytest.raises(ValueError, match="different shapes"):
        ensemble_scores([a, np.zeros((3, 2))])


def test_pixel_and_random_baselines():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    cos = pixel_scores(train[:2], train, "cosine")
    assert cos.shape == (2, 5)
    np.testing.assert_allclose(np.diag(cos[:, :2]), 1.0, rtol=1e-5)
    flat = train.reshape(5, -1) / 127.5 - 1
    np.testing.assert_allclose(pixel_scores(train[:1], train, "dot")[0], flat @ flat[0], rtol=1e-5)
    with pytest.raises(ValueError, match=r"pixel metric 'l2' is not one of \['dot', 'cosine'\]"):
        pixel_scores(train, train, "l2")
    assert np.array_equal(random_scores(2, 5, seed=1), random_scores(2, 5, seed=1))
    assert not np.array_equal(random_scores(2, 5, seed=1), random_scores(2, 5, seed=2))


@pytest.mark.parametrize("n,k", [(9, 30), (30, 9)])  # Gram side and covariance side
def test_torch_kernel_equals_numpy_solve_to_float32_rounding(n, k):
    phi, g = features(n, k, seed=4), features(6, k, seed=5)
    scorer = KernelScorer(phi)
    assert scorer.method == ("gram" if n <= k else "covariance")
    phi64 = phi.astype(np.float64)
    for lam in (0.01, 1.0, 100.0):
        inverse = np.linalg.solve(phi64.T @ phi64 + lam * np.eye(k), np.eye(k))
        expected = g.astype(np.float64) @ inverse @ phi64.T
        got = scorer.scores(g, lam)
        assert got.dtype == np.float32 and got.shape == (6, n)
        # Float64 throughout: only the final float32 rounding (relative 6e-8) separates them.
        np.testing.assert_allclose(got, expected, rtol=3e-7, atol=1e-7 * np.abs(expected).max())
        np.testing.assert_allclose(scorer.inverse_norms(lam), np.linalg.norm(phi64 @ inverse, axis=1), rtol=1e-9)
    # The public arrays: Phi V = U S and V orthonormal.
    assert scorer.V.shape == (k, min(n, k)) and scorer.phi_v.shape == (n, min(n, k))
    np.testing.assert_allclose(scorer.V.T @ scorer.V, np.eye(min(n, k)), atol=1e-9)
    np.testing.assert_allclose(phi64 @ scorer.V, scorer.phi_v, atol=1e-9)
    np.testing.assert_allclose(np.sort(scorer.s2), np.sort(np.linalg.svd(phi64, compute_uv=False) ** 2), rtol=1e-9)


class RowReader:
    """A (n, k) float32 matrix that only hands out row slices, recording the largest one."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.largest = array, 0
        self.shape, self.ndim, self.dtype = array.shape, array.ndim, array.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        assert isinstance(rows, slice), "the kernel must read row slices, not the whole matrix"
        part = self.array[rows]
        self.largest = max(self.largest, len(part))
        return part

    def __array__(self, *args, **kwargs):
        raise AssertionError("the kernel loaded the whole matrix")


@pytest.mark.parametrize("n,k", [(11, 20), (20, 11)])
def test_kernel_reads_train_features_in_row_chunks(n, k):
    phi = features(n, k, seed=6)
    reader = RowReader(phi)
    scorer = KernelScorer(reader, chunk=4)
    assert reader.largest == 4
    g = features(2, k, seed=7)
    np.testing.assert_allclose(scorer.scores(g, 1.0), KernelScorer(phi).scores(g, 1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(40, 300), (300, 40)])
def test_kernel_on_cuda_equals_the_cpu_kernel(n, k):
    phi, g = features(n, k), features(5, k, seed=1)
    cpu, cuda = KernelScorer(phi), KernelScorer(phi, device="cuda")
    assert cuda._v.device.type == "cuda"
    for lam in (0.1, 10.0):
        np.testing.assert_allclose(cuda.scores(g, lam), cpu.scores(g, lam), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cuda.inverse_norms(lam), cpu.inverse_norms(lam), rtol=1e-9)


def test_scorer_registry_declarations():
    assert SCORERS.names() == ["kernel", "relative", "renormalized", "dot", "cosine", "tracin",
                               "pixel-dot", "pixel-cosine", "random"]
    with pytest.raises(ValueError, match=r"^unknown scorer 'ridge'; expected one of \['kernel', .*'random'\]$"):
        SCORERS.get("ridge")
    assert SCORERS["kernel"].key_fields() == ("features", "lambda")
    assert SCORERS["renormalized"].uses_lambda and not SCORERS["cosine"].uses_lambda
    assert SCORERS["tracin"].key_fields() == ("features",)
    assert SCORERS["pixel-cosine"].key_fields() == () and not SCORERS["pixel-dot"].needs_features
    assert SCORERS["random"].key_fields() == ("seed",)


def test_scorers_apply_their_rule_to_every_model():
    """Two models: kernel rules average per-model scores per lambda; TracIn averages dots."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    gs, phis = [features(2, 6, seed=1), features(2, 6, seed=2)], [features(7, 6, seed=3), features(7, 6, seed=4)]
    inputs = ScoreInputs(images[:2], images, gs, phis, seed=5)
    lambdas = [0.5, 50.0]
    for name, per_model in [("kernel", lambda g, phi, lam: direct(g, phi, lam)),
                            ("renormalized", lambda g, phi, lam: direct(g, phi, lam) / np.linalg.norm(phi, axis=1)),
                            ("relative", lambda g, phi, lam: relative_influence(KernelScorer(phi), g, lam))]:
        out = SCORERS[name]().score(inputs, lambdas)
        assert list(out) == lambdas
        for lam in lambdas:
            expected = np.mean([per_model(g, phi, lam) for g, phi in zip(gs, phis)], axis=0)
            np.testing.assert_allclose(out[lam], expected, rtol=1e-4, atol=1e-6)
    dots = [g.astype(np.float64) @ phi.T for g, phi in zip(gs, phis)]
    for name in ("dot", "tracin"):
        (key, matrix), = SCORERS[name]().score(inputs, lambdas).items()
        assert np.isnan(key)
        np.testing.assert_allclose(matrix, np.mean(dots, axis=0), rtol=1e-5, atol=1e-6)
    (_, cos), = SCORERS["cosine"]().score(inputs, lambdas).items()
    np.testing.assert_allclose(cos, np.mean([cosine_scores(g, phi) for g, phi in zip(gs, phis)], axis=0), rtol=1e-6)
    (_, pixel), = SCORERS["pixel-dot"]().score(inputs, lambdas).items()
    np.testing.assert_allclose(pixel, pixel_scores(images[:2], images, "dot"))
    (_, noise), = SCORERS["random"]().score(inputs, lambdas).items()
    np.testing.assert_array_equal(noise, random_scores(2, 7, seed=5))
    with pytest.raises(ValueError, match="2 target feature sets for 1 train feature sets"):
        ScoreInputs(images[:2], images, gs, phis[:1])
