"""Random projections R^p -> R^k (Johnson-Lindenstrauss), seeded and device-independent.

A projector maps gradients g (B, p) to g P (B, k) with a fixed random p x k matrix P scaled so
that E |g P|^2 = |g|^2 (and inner products are preserved in expectation). P is a function of
(kind, seed, p, k[, s]) only: every block of it is drawn on the CPU from a ``torch.Generator``
seeded by a hash of (kind, seed, block index), then moved to the gradients' device, so runs,
devices and machines agree.

- :class:`DenseProjector`: Gaussian N(0, 1/k) (:class:`GaussianProjector`) or Rademacher
  +-1/sqrt(k) (:class:`RademacherProjector`) entries (TRAK's choice). Cost O(p k) per sample.
  Generated in row blocks of ``BLOCK_ROWS``; kept in memory only when p * k * 4 bytes fits
  ``cache_bytes``, regenerated block by block otherwise, so memory stays bounded by one block.
- :class:`SparseProjector`: a sparse JL transform (Kane & Nelson's block count-sketch). The k
  outputs are split into s contiguous groups; each input coordinate i lands in one bucket of
  every group, h_j(i), with a random sign sigma_j(i), weight 1/sqrt(s). Cost O(p s) per sample.
- :class:`IdentityProjector`: no projection (k = p); exact features, for tests and tiny models.

Projection is linear, so averaging gradients over timesteps before or after projecting is the same.

Each class registers itself in :data:`PROJECTORS` under its ``kind`` and declares in
``key_settings`` which of the projector-specific feature settings (``projection_dim``,
``sparsity``) change P, so the feature cache key keeps exactly those. A new projector is a
subclass with ``@PROJECTORS.register("name")``; :func:`make_projector` builds any of them.
"""

from __future__ import annotations

import math
from typing import ClassVar, Mapping, Sequence

import torch

from dtrak_core.seeds import feature_seed
from dtrak_core.plugins import Registry

#: Rows of P drawn per generator (fixed: changing it would change P).
BLOCK_ROWS = 256
#: Input coordinates hashed per generator in the sparse projector (fixed for the same reason).
SPARSE_BLOCK = 1 << 16

#: Feature settings a projector may depend on besides the seed (see ``Projector.key_settings``).
PROJECTOR_SETTINGS = ("projection_dim", "sparsity")


class Projector:
    """Base class: ``project`` takes (B, p) or a dict of per-parameter (B, ...) gradients.

    Subclasses set ``kind`` (their registry name) and ``key_settings`` (the subset of
    :data:`PROJECTOR_SETTINGS` that changes P; the others are left out of the cache key, so
    they must not change the output) and implement ``_project``.
    """

    kind: ClassVar[str] = "base"
    key_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, input_dim: int, output_dim: int, seed: int = 0,
                 param_names: Sequence[str] | None = None) -> None:
        if input_dim < 1:
            raise ValueError(f"projector input dimension {input_dim} must be positive")
        if not 1 <= output_dim <= input_dim:
            raise ValueError(f"projection dimension k={output_dim} must be between 1 and the "
                             f"number of gradient coordinates p={input_dim}")
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.seed = int(seed)
        self.param_names = list(param_names) if param_names is not None else None

    @classmethod
    def build(cls, input_dim: int, projection_dim: int, seed: int = 0, sparsity: int = 4,
              param_names: Sequence[str] | None = None) -> "Projector":
        """The projector for p = ``input_dim`` from the feature settings (k, seed, s).

        Every kind takes the same arguments, so callers need no per-kind code; a kind ignores
        the settings that are not in its ``key_settings``.
        """
        return cls(input_dim, projection_dim, seed, param_names=param_names)

    def describe(self) -> dict:
        return {"kind": self.kind, "input_dim": self.input_dim, "output_dim": self.output_dim,
                "seed": self.seed}

    def project(self, grads: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, p) or {name: (B, ...)} -> (B, k) float32 on the input's device."""
        flat = self._flatten(grads).float()
        if flat.dim() != 2 or flat.shape[1] != self.input_dim:
            raise ValueError(f"gradients of shape {tuple(flat.shape)} do not fit a projector "
                             f"with p={self.input_dim}; expected (B, {self.input_dim})")
        return self._project(flat)

    def _flatten(self, grads: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(grads, torch.Tensor):
            return grads
        names = self.param_names if self.param_names is not None else list(grads)
        missing = [n for n in names if n not in grads]
        if missing:
            raise ValueError(f"gradient dict lacks parameter {missing[0]!r} that the projector expects")
        batch = grads[names[0]].shape[0]
        return torch.cat([grads[n].reshape(batch, -1) for n in names], dim=1)

    def _project(self, flat: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


#: kind -> projector class.
PROJECTORS: Registry[type[Projector]] = Registry("projector")


@PROJECTORS.register("sjlt")
class SparseProjector(Projector):
    """Sparse JL: each coordinate goes to one bucket in each of s groups, sign +-1, weight 1/sqrt(s).

    Group j owns the output columns [floor(j k / s), floor((j+1) k / s)); so a coordinate's s
    buckets are distinct and |g P|^2 is unbiased for |g|^2.
    """

    kind = "sjlt"
    key_settings = ("projection_dim", "sparsity")

    def __init__(self, input_dim: int, output_dim: int, seed: int = 0, sparsity: int = 4,
                 param_names: Sequence[str] | None = None, cache_entries: int = 1 << 26) -> None:
        super().__init__(input_dim, output_dim, seed, param_names)
        if not 1 <= sparsity <= output_dim:
            raise ValueError(f"sparse projector sparsity s={sparsity} must be between 1 and k={output_dim}")
        self.sparsity = int(sparsity)
        self.num_blocks = math.ceil(self.input_dim / SPARSE_BLOCK)
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_all = self.input_dim * self.sparsity <= cache_entries
        edges = [j * self.output_dim // self.sparsity for j in range(self.sparsity + 1)]
        self._starts = torch.tensor(edges[:-1], dtype=torch.float64)
        self._widths = torch.tensor([b - a for a, b in zip(edges[:-1], edges[1:])], dtype=torch.float64)

    @classmethod
    def build(cls, input_dim: int, projection_dim: int, seed: int = 0, sparsity: int = 4,
              param_names: Sequence[str] | None = None) -> "SparseProjector":
        return cls(input_dim, projection_dim, seed, sparsity, param_names)

    def describe(self) -> dict:
        return {**super().describe(), "sparsity": self.sparsity}

    def block(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (rows, s) int64 and signed weights (rows, s) float32 for one coordinate block, on CPU."""
        rows = min(SPARSE_BLOCK, self.input_dim - index * SPARSE_BLOCK)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(feature_seed("sjlt", self.seed, self.output_dim, self.sparsity, index))
        uniform = torch.rand((rows, self.sparsity), generator=generator, dtype=torch.float64)
        buckets = (self._starts + torch.floor(uniform * self._widths)).long()
        signs = torch.randint(0, 2, (rows, self.sparsity), generator=generator).float() * 2 - 1
        return buckets, signs.mul_(1.0 / math.sqrt(self.sparsity))

    def _device_block(self, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (index, str(device))
        if key in self._cache:
            return self._cache[key]
        buckets, weights = self.block(index)
        # Column j of a block as contiguous vectors for index_add_.
        pair = (buckets.t().contiguous().to(device), weights.t().contiguous().to(device))
        if self._cache_all:
            self._cache[key] = pair
        return pair

    def matrix(self) -> torch.Tensor:
        """The dense equivalent P (p, k); for tests and small p only."""
        dense = torch.zeros(self.input_dim, self.output_dim)
        for index in range(self.num_blocks):
            buckets, weights = self.block(index)
            rows = torch.arange(buckets.shape[0]) + index * SPARSE_BLOCK
            for j in range(self.sparsity):
                dense[rows, buckets[:, j]] += weights[:, j]
        return dense

    def _project(self, flat: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(flat.shape[0], self.output_dim, device=flat.device, dtype=torch.float32)
        for index in range(self.num_blocks):
            start = index * SPARSE_BLOCK
            chunk = flat[:, start:start + SPARSE_BLOCK]
            buckets, weights = self._device_block(index, flat.device)
            for j in range(self.sparsity):
                out.index_add_(1, buckets[j], chunk * weights[j])
        return out


class DenseProjector(Projector):
    """P with i.i.d. entries of variance 1/k, drawn in row blocks; subclasses say which entries."""

    key_settings = ("projection_dim",)

    def __init__(self, input_dim: int, output_dim: int, seed: int = 0,
                 param_names: Sequence[str] | None = None, cache_bytes: int = 256 << 20) -> None:
        super().__init__(input_dim, output_dim, seed, param_names)
        self.num_blocks = math.ceil(self.input_dim / BLOCK_ROWS)
        self._cache: dict[str, torch.Tensor] = {}
        self._cache_all = self.input_dim * self.output_dim * 4 <= cache_bytes

    def _draw(self, rows: int, generator: torch.Generator) -> torch.Tensor:  # pragma: no cover - abstract
        """Unscaled entries (rows, k) float32 with variance 1."""
        raise NotImplementedError

    def block(self, index: int) -> torch.Tensor:
        """Rows [index*BLOCK_ROWS, ...) of P, float32 CPU (rows, k), already scaled by 1/sqrt(k)."""
        rows = min(BLOCK_ROWS, self.input_dim - index * BLOCK_ROWS)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(feature_seed("dense", self.kind, self.seed, self.output_dim, index))
        return self._draw(rows, generator).mul_(1.0 / math.sqrt(self.output_dim))

    def _device_matrix(self, device: torch.device) -> torch.Tensor:
        # Only called when the whole P fits the cache: one matmul beats many small ones.
        key = str(device)
        if key not in self._cache:
            self._cache[key] = self.matrix().to(device)
        return self._cache[key]

    def matrix(self) -> torch.Tensor:
        """The whole P (p, k); for tests and small p only."""
        return torch.cat([self.block(i) for i in range(self.num_blocks)])

    def _project(self, flat: torch.Tensor) -> torch.Tensor:
        if self._cache_all:
            return flat @ self._device_matrix(flat.device)
        out = torch.zeros(flat.shape[0], self.output_dim, device=flat.device, dtype=torch.float32)
        for index in range(self.num_blocks):
            start = index * BLOCK_ROWS
            out.addmm_(flat[:, start:start + BLOCK_ROWS], self.block(index).to(flat.device))
        return out


@PROJECTORS.register("rademacher")
class RademacherProjector(DenseProjector):
    """Entries +-1/sqrt(k), each sign with probability 1/2."""

    kind = "rademacher"

    def _draw(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        # One random byte gives 8 signs: 8x fewer generator calls than randint(0, 2).
        nbytes = (self.output_dim + 7) // 8
        packed = torch.randint(0, 256, (rows, nbytes), generator=generator, dtype=torch.int32)
        bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
        return bits.reshape(rows, nbytes * 8)[:, :self.output_dim].float() * 2 - 1


@PROJECTORS.register("gaussian")
class GaussianProjector(DenseProjector):
    """Entries N(0, 1/k)."""

    kind = "gaussian"

    def _draw(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((rows, self.output_dim), generator=generator)


@PROJECTORS.register("identity")
class IdentityProjector(Projector):
    """phi = g (k = p)."""

    kind = "identity"
    key_settings = ()

    def __init__(self, input_dim: int, output_dim: int | None = None, seed: int = 0,
                 param_names: Sequence[str] | None = None) -> None:
        if output_dim is not None and output_dim != input_dim:
            raise ValueError(f"the identity projector keeps all p={input_dim} coordinates; "
                             f"got k={output_dim}")
        super().__init__(input_dim, input_dim, seed, param_names)

    @classmethod
    def build(cls, input_dim: int, projection_dim: int, seed: int = 0, sparsity: int = 4,
              param_names: Sequence[str] | None = None) -> "IdentityProjector":
        """k is p whatever ``projection_dim`` says (it is not in the cache key either)."""
        return cls(input_dim, None, seed, param_names)

    def _project(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.clone()


def make_projector(kind: str, input_dim: int, output_dim: int, seed: int = 0,
                   param_names: Sequence[str] | None = None, sparsity: int = 4) -> Projector:
    """Build the projector registered as ``kind`` (see :data:`PROJECTORS`) for p = ``input_dim``."""
    return PROJECTORS.get(kind).build(input_dim, output_dim, seed, sparsity, param_names)
