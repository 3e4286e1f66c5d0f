"""Attribution scores from features: TRAK/D-TRAK kernel and its relatives.

Notation: train features Phi (n, k), target features G (m, k); scores are (m, n) with
``scores[i, j] = tau(target_i, train_j)``; positive = proponent.

TRAK / D-TRAK:  tau = G (Phi^T Phi + lambda I)^{-1} Phi^T.
With Phi = U S V^T (thin SVD, rank r) this is  G V diag(1 / (s^2 + lambda)) (Phi V)^T, exactly
for every lambda > 0 (Phi^T lies in span V, where the inverse acts as diag(1/(s^2+lambda))).
:class:`KernelScorer` decomposes once, so a sweep over lambdas costs one (m, r) x (r, n)
product each. It gets V and s from whichever Gram matrix is smaller: Phi Phi^T (n x n) when
n <= k, Phi^T Phi (k x k) otherwise, accumulated in row chunks (so a memmap Phi is never
loaded whole), in float64.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_CHUNK = 4096


def check_lambda(lam: float) -> float:
    """lambda must be a finite number >= 0 (0 means the pseudo-inverse)."""
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"regularisation lambda={lam} must be a finite number >= 0")
    return lam


def _check_features(name: str, features: np.ndarray, dim: int | None = None) -> np.ndarray:
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{name} features of shape {features.shape} must be a non-empty (rows, k) matrix")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{name} features have k={features.shape[1]} but the train features have k={dim}")
    return features


def _rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.asarray(array[start:stop], dtype=np.float64)


class KernelScorer:
    """The TRAK kernel from one eigendecomposition of Phi's smaller Gram matrix.

    Attributes after construction:
        V: (k, r) right singular vectors; s2: (r,) squared singular values;
        phi_v: (n, r) = Phi V = U S, the train features in the singular basis.
    """

    def __init__(self, train_features: np.ndarray, method: str = "auto", chunk: int = DEFAULT_CHUNK,
                 rcond: float = 1e-12) -> None:
        phi = _check_features("train", train_features)
        n, k = phi.shape
        if method == "auto":
            method = "gram" if n <= k else "covariance"
        if method not in ("gram", "covariance"):
            raise ValueError(f"kernel method {method!r} is not one of 'auto', 'gram', 'covariance'")
        self.method, self.n, self.k, self.chunk = method, n, k, chunk
        if method == "gram":
            # Phi Phi^T = U S^2 U^T  ->  V = Phi^T U / s.
            gram = np.zeros((n, n))
            for a in range(0, n, chunk):
                block = _rows(phi, a, a + chunk)
                for b in range(0, n, chunk):
                    gram[a:a + chunk, b:b + chunk] = block @ _rows(phi, b, b + chunk).T
            s2, u = np.linalg.eigh(gram)
            keep = s2 > rcond * max(s2.max(), 0.0) if s2.max() > 0 else np.zeros_like(s2, bool)
            s2, u = s2[keep], u[:, keep]
            s = np.sqrt(s2)
            v = np.zeros((k, len(s)))
            for a in range(0, n, chunk):
                v += _rows(phi, a, a + chunk).T @ u[a:a + chunk]
            self.V = v / s
            self.phi_v = u * s
        else:
            # Phi^T Phi = V S^2 V^T  ->  Phi V in chunks.
            cov = np.zeros((k, k))
            for a in range(0, n, chunk):
                block = _rows(phi, a, a + chunk)
                cov += block.T @ block
            s2, v = np.linalg.eigh(cov)
            keep = s2 > rcond * max(s2.max(), 0.0) if s2.max() > 0 else np.zeros_like(s2, bool)
            s2, self.V = s2[keep], v[:, keep]
            self.phi_v = np.concatenate([_rows(phi, a, a + chunk) @ self.V for a in range(0, n, chunk)])
        self.s2 = s2
        if len(s2) == 0:
            raise ValueError("the train features are all zero; the kernel is undefined")

    @property
    def rank(self) -> int:
        return int(len(self.s2))

    def scores(self, targets: np.ndarray, lam: float, chunk: int | None = None) -> np.ndarray:
        """tau = G (Phi^T Phi + lambda I)^{-1} Phi^T as float32 (m, n), targets in row chunks."""
        # lambda = 0 gives the pseudo-inverse on the span of the train features.
        weights = 1.0 / (self.s2 + check_lambda(lam))
        g = _check_features("target", targets, self.k)
        chunk = chunk or self.chunk
        out = np.empty((g.shape[0], self.n), dtype=np.float32)
        for a in range(0, g.shape[0], chunk):
            out[a:a + chunk] = ((_rows(g, a, a + chunk) @ self.V) * weights) @ self.phi_v.T
        return out

    def sweep(self, targets: np.ndarray, lambdas: Sequence[float]) -> dict[float, np.ndarray]:
        """Scores for each lambda, all from the one decomposition."""
        return {float(lam): self.scores(targets, lam) for lam in lambdas}

    def inverse_norms(self, lam: float) -> np.ndarray:
        """|(Phi^T Phi + lambda I)^{-1} phi_j| for every train row j, (n,)."""
        weights = 1.0 / (self.s2 + check_lambda(lam))
        return np.linalg.norm(self.phi_v * weights, axis=1)


def trak_scores(targets: np.ndarray, train: np.ndarray, lam: float) -> np.ndarray:
    """One-shot TRAK/D-TRAK scores (see :class:`KernelScorer` for sweeps)."""
    check_lambda(lam)
    return KernelScorer(train).scores(targets, lam)


def dot_scores(targets: np.ndarray, train: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Gradient dot product g_i . phi_j, (m, n) float32, in chunks of train rows."""
    g = _check_features("target", targets)
    phi = _check_features("train", train, g.shape[1])
    out = np.empty((g.shape[0], phi.shape[0]), dtype=np.float32)
    g64 = np.asarray(g, dtype=np.float64)
    for a in range(0, phi.shape[0], chunk):
        out[:, a:a + chunk] = g64 @ _rows(phi, a, a + chunk).T
    return out


def _row_norms(features: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    return np.concatenate([np.linalg.norm(_rows(features, a, a + chunk), axis=1)
                           for a in range(0, features.shape[0], chunk)])


def _safe_divide(values: np.ndarray, norms: np.ndarray) -> np.ndarray:
    # A zero-norm feature has zero scores everywhere; keep them zero rather than NaN.
    return values / np.where(norms > 0, norms, np.inf)


def cosine_scores(targets: np.ndarray, train: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Gradient cosine g_i . phi_j / (|g_i| |phi_j|) (Diffusion-ReTrac's normalisation)."""
    dots = dot_scores(targets, train, chunk)
    dots = _safe_divide(dots, _row_norms(train, chunk)[None, :])
    return _safe_divide(dots, _row_norms(targets, chunk)[:, None]).astype(np.float32)


def tracin_scores(checkpoints: Sequence[tuple[np.ndarray, np.ndarray]], reduce: str = "mean",
                  weights: Sequence[float] | None = None) -> np.ndarray:
    """TracIn: sum_c w_c g_i^(c) . phi_j^(c) over checkpoints c, given (targets, train) per checkpoint.

    ``reduce="mean"`` divides by the number of checkpoints; ``weights`` (e.g. learning rates)
    default to 1.
    """
    if not checkpoints:
        raise ValueError("TracIn needs features from at least one checkpoint")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"TracIn reduce {reduce!r} is not 'mean' or 'sum'")
    weights = [1.0] * len(checkpoints) if weights is None else list(weights)
    if len(weights) != len(checkpoints):
        raise ValueError(f"{len(weights)} TracIn weights for {len(checkpoints)} checkpoints")
    total = sum(w * dot_scores(g, phi).astype(np.float64) for w, (g, phi) in zip(weights, checkpoints))
    if reduce == "mean":
        total = total / len(checkpoints)
    return np.asarray(total, dtype=np.float32)


def relative_influence(scorer: KernelScorer, targets: np.ndarray, lam: float) -> np.ndarray:
    """tau_ij / |(Phi^T Phi + lambda I)^{-1} phi_j| (Barshan et al.'s relative influence)."""
    return _safe_divide(scorer.scores(targets, lam), scorer.inverse_norms(lam)[None, :]).astype(np.float32)


def renormalized_influence(scores: np.ndarray, train: np.ndarray) -> np.ndarray:
    """tau_ij / |phi_j|: removes the "high-norm images influence everything" bias."""
    return _safe_divide(scores, _row_norms(train)[None, :]).astype(np.float32)


def ensemble_scores(score_matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of score matrices of the same shape (models trained on different subsets/seeds)."""
    if not score_matrices:
        raise ValueError("an ensemble needs at least one score matrix")
    shapes = {np.shape(s) for s in score_matrices}
    if len(shapes) != 1:
        raise ValueError(f"ensemble score matrices have different shapes {sorted(shapes)}; expected one shape")
    return np.mean([np.asarray(s, dtype=np.float64) for s in score_matrices], axis=0).astype(np.float32)


def pixel_scores(target_images: np.ndarray, train_images: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Raw-pixel baseline: dot or cosine of flattened images (any shape (n, ...)), centred at 0.

    uint8 images are mapped to [-1, 1] first, like the models' inputs.
    """
    def prepare(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        flat = images.reshape(len(images), -1).astype(np.float64)
        return flat / 127.5 - 1.0 if images.dtype == np.uint8 else flat

    g, phi = prepare(target_images), prepare(train_images)
    if metric == "dot":
        return dot_scores(g, phi)
    if metric == "cosine":
        return cosine_scores(g, phi)
    raise ValueError(f"pixel metric {metric!r} is not 'dot' or 'cosine'")


def random_scores(num_targets: int, num_train: int, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal scores (m, n): the LDS ~ 0 baseline."""
    return np.random.default_rng(seed).standard_normal((num_targets, num_train)).astype(np.float32)
