"""Attribution scores from features: TRAK/D-TRAK kernel and its relatives.

Notation: train features Phi (n, k), target features G (m, k); scores are (m, n) with
``scores[i, j] = tau(target_i, train_j)``; positive = proponent.

TRAK / D-TRAK:  tau = G (Phi^T Phi + lambda I)^{-1} Phi^T.
With Phi = U S V^T (thin SVD, rank r) this is  G V diag(1 / (s^2 + lambda)) (Phi V)^T, exactly
for every lambda > 0 (Phi^T lies in span V, where the inverse acts as diag(1/(s^2+lambda))).
:class:`KernelScorer` decomposes once, in torch (CPU or CUDA) and float64, so a sweep over
lambdas costs one (m, r) x (r, n) product each. It gets V and s from whichever Gram matrix is
smaller: Phi Phi^T (n x n) when n <= k, Phi^T Phi (k x k) otherwise, accumulated in row chunks
(so a memmap Phi is never loaded whole).

The scoring rules a method can name are the classes in :data:`SCORERS` (``kernel``,
``relative``, ``renormalized``, ``dot``, ``cosine``, ``tracin``, ``pixel-dot``,
``pixel-cosine``, ``random``): each declares whether it uses lambda and gradient features and
turns a :class:`ScoreInputs` into score matrices. A new rule is a :class:`Scorer` subclass with
``@SCORERS.register("name")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from dtrak_core.plugins import Registry

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


def _torch_rows(array: np.ndarray, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` of a (possibly memory-mapped) array as a float64 tensor on ``device``."""
    rows = _rows(array, start, stop)
    if not rows.flags.writeable:
        # A float64 memmap comes back as a read-only view, which torch.from_numpy warns about.
        rows = rows.copy()
    return torch.from_numpy(rows).to(device)


class KernelScorer:
    """The TRAK kernel from one eigendecomposition of Phi's smaller Gram matrix, in torch float64.

    Cost of the two sides (float64, r = rank <= min(n, k)):

    - ``"gram"``: Phi Phi^T is n x n, 8 n^2 bytes (twice that while ``eigh`` holds its
      eigenvectors), O(n^2 k) to accumulate and O(n^3) to decompose.
    - ``"covariance"``: Phi^T Phi is k x k, 8 k^2 bytes (k = 32768 -> 8.6 GB; twice that
      in ``eigh``), O(n k^2) and O(k^3).

    ``"auto"`` takes the smaller side. Either way V (k, r) and Phi V (n, r) are kept, 8 (k + n) r
    bytes. Phi is read in row chunks of ``chunk`` rows (float32 -> float64 per chunk), so a
    memory-mapped Phi is never loaded whole.

    Attributes after construction (NumPy float64 views of the device tensors):
        V: (k, r) right singular vectors; s2: (r,) squared singular values;
        phi_v: (n, r) = Phi V = U S, the train features in the singular basis.
    """

    def __init__(self, train_features: np.ndarray, method: str = "auto", chunk: int = DEFAULT_CHUNK,
                 rcond: float = 1e-12, device: str | torch.device = "cpu") -> None:
        phi = _check_features("train", train_features)
        n, k = phi.shape
        if method == "auto":
            method = "gram" if n <= k else "covariance"
        if method not in ("gram", "covariance"):
            raise ValueError(f"kernel method {method!r} is not one of 'auto', 'gram', 'covariance'")
        self.method, self.n, self.k, self.chunk = method, n, k, chunk
        self.device = torch.device(device)
        decompose = self._from_gram if method == "gram" else self._from_covariance
        self._v, self._s2, self._phi_v = decompose(phi, rcond)

    def _read(self, array: np.ndarray, start: int) -> torch.Tensor:
        return _torch_rows(array, start, start + self.chunk, self.device)

    @staticmethod
    def _keep(s2: torch.Tensor, rcond: float) -> torch.Tensor:
        """Mask of the eigenvalues above ``rcond`` times the largest (the numerical rank)."""
        top = float(s2.max())
        if top <= 0:
            raise ValueError("the train features are all zero; the kernel is undefined")
        return s2 > rcond * top

    def _from_gram(self, phi: np.ndarray, rcond: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Phi Phi^T = U S^2 U^T  ->  V = Phi^T U / s, Phi V = U S."""
        n, c = self.n, self.chunk
        gram = torch.zeros((n, n), dtype=torch.float64, device=self.device)
        for a in range(0, n, c):
            block = self._read(phi, a)
            for b in range(a, n, c):
                # Upper blocks only, mirrored: half the products and chunk reads.
                product = block @ (block if b == a else self._read(phi, b)).T
                gram[a:a + c, b:b + c] = product
                gram[b:b + c, a:a + c] = product.T
        s2, u = torch.linalg.eigh(gram)
        del gram
        keep = self._keep(s2, rcond)
        s2, u = s2[keep], u[:, keep]
        s = s2.sqrt()
        v = torch.zeros((self.k, len(s)), dtype=torch.float64, device=self.device)
        for a in range(0, n, c):
            v += self._read(phi, a).T @ u[a:a + c]
        return v / s, s2, u * s

    def _from_covariance(self, phi: np.ndarray, rcond: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Phi^T Phi = V S^2 V^T  ->  Phi V in chunks."""
        cov = torch.zeros((self.k, self.k), dtype=torch.float64, device=self.device)
        for a in range(0, self.n, self.chunk):
            block = self._read(phi, a)
            cov += block.T @ block
        s2, v = torch.linalg.eigh(cov)
        del cov
        keep = self._keep(s2, rcond)
        s2, v = s2[keep], v[:, keep]
        phi_v = torch.cat([self._read(phi, a) @ v for a in range(0, self.n, self.chunk)])
        return v, s2, phi_v

    @property
    def V(self) -> np.ndarray:
        """(k, r) right singular vectors of Phi."""
        return self._v.cpu().numpy()

    @property
    def s2(self) -> np.ndarray:
        """(r,) squared singular values of Phi, ascending."""
        return self._s2.cpu().numpy()

    @property
    def phi_v(self) -> np.ndarray:
        """(n, r) Phi V = U S."""
        return self._phi_v.cpu().numpy()

    @property
    def rank(self) -> int:
        return int(self._s2.shape[0])

    def _weights(self, lam: float) -> torch.Tensor:
        """1 / (s^2 + lambda), (r,); lambda = 0 gives the pseudo-inverse on the span of Phi."""
        return 1.0 / (self._s2 + check_lambda(lam))

    def scores(self, targets: np.ndarray, lam: float, chunk: int | None = None) -> np.ndarray:
        """tau = G (Phi^T Phi + lambda I)^{-1} Phi^T = ((G V) / (s^2 + lambda)) (Phi V)^T as float32
        (m, n), targets in row chunks."""
        weights = self._weights(lam)
        g = _check_features("target", targets, self.k)
        chunk = chunk or self.chunk
        out = np.empty((g.shape[0], self.n), dtype=np.float32)
        for a in range(0, g.shape[0], chunk):
            block = _torch_rows(g, a, a + chunk, self.device)
            out[a:a + chunk] = ((block @ self._v) * weights @ self._phi_v.T).to(torch.float32).cpu().numpy()
        return out

    def sweep(self, targets: np.ndarray, lambdas: Sequence[float]) -> dict[float, np.ndarray]:
        """Scores for each lambda, all from the one decomposition."""
        return {float(lam): self.scores(targets, lam) for lam in lambdas}

    def inverse_norms(self, lam: float) -> np.ndarray:
        """|(Phi^T Phi + lambda I)^{-1} phi_j| = |(Phi V)_j / (s^2 + lambda)| for every train row j, (n,)."""
        return torch.linalg.vector_norm(self._phi_v * self._weights(lam), dim=1).cpu().numpy()


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


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """Images (n, ...) -> flat float64 rows (n, prod(...)); uint8 is mapped to [-1, 1] like the models' inputs."""
    images = np.asarray(images)
    flat = images.reshape(len(images), -1).astype(np.float64)
    return flat / 127.5 - 1.0 if images.dtype == np.uint8 else flat


#: Similarities of the raw-pixel baseline: name -> (targets, train) -> scores.
PIXEL_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "dot": dot_scores, "cosine": cosine_scores}


def pixel_scores(target_images: np.ndarray, train_images: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Raw-pixel baseline: dot or cosine of flattened images (any shape (n, ...)), centred at 0."""
    if metric not in PIXEL_METRICS:
        raise ValueError(f"pixel metric {metric!r} is not one of {list(PIXEL_METRICS)}")
    return PIXEL_METRICS[metric](pixel_vectors(target_images), pixel_vectors(train_images))


def random_scores(num_targets: int, num_train: int, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal scores (m, n): the LDS ~ 0 baseline."""
    return np.random.default_rng(seed).standard_normal((num_targets, num_train)).astype(np.float32)


@dataclass(frozen=True)
class ScoreInputs:
    """Everything a scoring rule may read, for m targets, n training images and M models.

    Attributes:
        target_images: uint8 (m, H, W, 3).
        train_images: uint8 (n, H, W, 3).
        target_features: per model, float32 (m, k); empty for rules without gradient features.
        train_features: per model, float32 (n, k), possibly memory-mapped; as many as targets'.
        kernels: model index -> the :class:`KernelScorer` of ``train_features[index]`` (a cache
            lookup, so a decomposition is reused between calls); None builds one per call.
        seed: seed of random rules.
    """

    target_images: np.ndarray
    train_images: np.ndarray
    target_features: Sequence[np.ndarray] = ()
    train_features: Sequence[np.ndarray] = ()
    kernels: Callable[[int], KernelScorer] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.target_features) != len(self.train_features):
            raise ValueError(f"{len(self.target_features)} target feature sets for {len(self.train_features)} "
                             "train feature sets; expected one of each per model")

    @property
    def num_targets(self) -> int:
        return len(self.target_images)

    @property
    def num_train(self) -> int:
        return len(self.train_images)

    def per_model(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(G, Phi) of every model, in model order."""
        return list(zip(self.target_features, self.train_features))

    def kernel(self, index: int) -> KernelScorer:
        """The kernel of model ``index``'s train features."""
        if self.kernels is not None:
            return self.kernels(index)
        return KernelScorer(self.train_features[index])


class Scorer:
    """A scoring rule: :class:`ScoreInputs` -> float32 score matrices (m, n).

    Class attributes a rule declares:
        uses_lambda: the ridge lambda changes its scores (one matrix per lambda; otherwise one
            matrix keyed by NaN).
        needs_features: it reads gradient features (otherwise only images and the seed).
        extra_key_fields: further ``score_targets`` arguments its numbers depend on ("seed").

    A rule implements :meth:`matrix`; :meth:`score` applies it per lambda.
    """

    uses_lambda: ClassVar[bool] = False
    needs_features: ClassVar[bool] = True
    extra_key_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def key_fields(cls) -> tuple[str, ...]:
        """What a cache of these scores keys on besides model, training set, method and target:
        "features" (the feature settings), "lambda", then ``extra_key_fields``."""
        return (("features",) if cls.needs_features else ()) + (("lambda",) if cls.uses_lambda else ()) \
            + cls.extra_key_fields

    def score(self, inputs: ScoreInputs, lambdas: Sequence[float]) -> dict[float, np.ndarray]:
        """{lambda: scores (m, n)} for each (checked) lambda, or {NaN: scores} without lambda."""
        if self.uses_lambda:
            return {float(lam): self.matrix(inputs, float(lam)) for lam in lambdas}
        return {float("nan"): self.matrix(inputs, float("nan"))}

    def matrix(self, inputs: ScoreInputs, lam: float) -> np.ndarray:  # pragma: no cover - abstract
        """Scores (m, n) float32 for one lambda (NaN for rules without lambda)."""
        raise NotImplementedError


#: scorer name (``Method.scorer``) -> rule class.
SCORERS: Registry[type[Scorer]] = Registry("scorer")


@SCORERS.register("kernel")
class TrakScorer(Scorer):
    """TRAK / D-TRAK: tau = G (Phi^T Phi + lambda I)^{-1} Phi^T, averaged over models."""

    uses_lambda = True

    def matrix(self, inputs: ScoreInputs, lam: float) -> np.ndarray:
        return ensemble_scores([self.model_scores(inputs.kernel(i), g, phi, lam)
                                for i, (g, phi) in enumerate(inputs.per_model())])

    def model_scores(self, kernel: KernelScorer, targets: np.ndarray, train: np.ndarray, lam: float) -> np.ndarray:
        """One model's scores (m, n) from its kernel, target features G and train features Phi."""
        return kernel.scores(targets, lam)


@SCORERS.register("relative")
class RelativeScorer(TrakScorer):
    """tau_ij / |(Phi^T Phi + lambda I)^{-1} phi_j|, averaged over models."""

    def model_scores(self, kernel: KernelScorer, targets: np.ndarray, train: np.ndarray, lam: float) -> np.ndarray:
        return relative_influence(kernel, targets, lam)


@SCORERS.register("renormalized")
class RenormalizedScorer(TrakScorer):
    """tau_ij / |phi_j|, averaged over models."""

    def model_scores(self, kernel: KernelScorer, targets: np.ndarray, train: np.ndarray, lam: float) -> np.ndarray:
        return renormalized_influence(kernel.scores(targets, lam), train)


@SCORERS.register("dot")
class DotScorer(Scorer):
    """g_i . phi_j, averaged over models."""

    def matrix(self, inputs: ScoreInputs, lam: float) -> np.ndarray:
        return ensemble_scores([self.pair_scores(g, phi) for g, phi in inputs.per_model()])

    def pair_scores(self, targets: np.ndarray, train: np.ndarray) -> np.ndarray:
        """One model's scores (m, n) from G (m, k) and Phi (n, k)."""
        return dot_scores(targets, train)


@SCORERS.register("cosine")
class CosineScorer(DotScorer):
    """g_i . phi_j / (|g_i| |phi_j|), averaged over models."""

    def pair_scores(self, targets: np.ndarray, train: np.ndarray) -> np.ndarray:
        return cosine_scores(targets, train)


@SCORERS.register("tracin")
class TracInScorer(Scorer):
    """TracIn: the models are checkpoints; mean over them of g_i . phi_j."""

    def matrix(self, inputs: ScoreInputs, lam: float) -> np.ndarray:
        return tracin_scores(inputs.per_model())


@SCORERS.register("pixel-dot")
class PixelDotScorer(Scorer):
    """Dot product of the raw pixels in [-1, 1] (no model)."""

    needs_features = False
    metric: ClassVar[str] = "dot"

    def matrix(self, inputs: ScoreInputs, lam: float) -> np.ndarray:
        return pixel_scores(inputs.target_images, inputs.train_images, self.metric)


@SCORERS.register("pixel-cosine")
class PixelCosineScorer(PixelDotScorer):
    """Cosine of the raw pixels in [-1, 1] (no model)."""

    metric = "cosine"


@SCORERS.register("random")
class RandomScorer(Scorer):
    """Seeded standard-normal scores: the floor any method must beat."""

    needs_features = False
    extra_key_fields = ("seed",)

    def matrix(self, inputs: ScoreInputs, lam: float) -> np.ndarray:
        return random_scores(inputs.num_targets, inputs.num_train, inputs.seed)
