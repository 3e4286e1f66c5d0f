import math

import numpy as np
import pytest
import torch

from dtrak_core.tasks import UnconditionalPixelTask
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.projectors import (BLOCK_ROWS, PROJECTOR_SETTINGS, PROJECTORS, GaussianProjector,
                                               IdentityProjector, Projector, RademacherProjector,
                                               SparseProjector, make_projector)

P, K = 3000, 512
KINDS = ["sjlt", "rademacher", "gaussian"]


def random_vectors(n: int, p: int = P, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_jl_preserves_norms_and_inner_products(kind):
    x = random_vectors(30)
    y = make_projector(kind, P, K, seed=0).project(x).double()
    x = x.double()
    # JL: |Px|^2 / |x|^2 has standard deviation about sqrt(2/k) = 0.0625; allow 5 of them.
    eps = 5 * math.sqrt(2 / K)
    ratio = (y.norm(dim=1) ** 2) / (x.norm(dim=1) ** 2)
    assert (ratio - 1).abs().max() < eps
    assert abs(ratio.mean().item() - 1) < 3 * math.sqrt(2 / K / len(ratio)) + 0.01
    # Inner products: |<Px,Py> - <x,y>| <= eps |x||y| for every pair.
    gram_x, gram_y = x @ x.T, y @ y.T
    scale = torch.outer(x.norm(dim=1), x.norm(dim=1))
    assert ((gram_y - gram_x).abs() / scale).max() < eps


@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_deterministic_and_seeded(kind):
    x = random_vectors(4)
    a = make_projector(kind, P, K, seed=3).project(x)
    b = make_projector(kind, P, K, seed=3).project(x)
    c = make_projector(kind, P, K, seed=4).project(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_equals_its_matrix(kind):
    projector = make_projector(kind, P, K, seed=1)
    x = random_vectors(3)
    matrix = projector.matrix()
    assert matrix.shape == (P, K)
    torch.testing.assert_close(projector.project(x), x @ matrix, rtol=1e-4, atol=1e-4)


def test_dense_entries_and_block_generation_without_cache():
    cached = RademacherProjector(P, K, seed=2)
    matrix = cached.matrix()
    torch.testing.assert_close(matrix.abs(), torch.full_like(matrix, 1 / math.sqrt(K)))
    assert 0.45 < (matrix > 0).float().mean().item() < 0.55
    assert P > BLOCK_ROWS  # several blocks
    uncached = RademacherProjector(P, K, seed=2, cache_bytes=0)
    x = random_vectors(2)
    torch.testing.assert_close(uncached.project(x), cached.project(x), rtol=1e-5, atol=1e-5)
    assert not uncached._cache


def test_sparse_structure():
    s = 4
    matrix = SparseProjector(P, K, seed=0, sparsity=s).matrix()
    nonzero = matrix != 0
    assert torch.equal(nonzero.sum(dim=1), torch.full((P,), s))
    assert torch.allclose(matrix[nonzero].abs(), torch.tensor(1 / math.sqrt(s)))
    # One bucket in each of the s column groups.
    for j in range(s):
        group = nonzero[:, j * K // s:(j + 1) * K // s]
        assert torch.equal(group.sum(dim=1), torch.ones(P, dtype=torch.long))
    # Buckets are used roughly uniformly.
    assert nonzero.sum(dim=0).float().std() < 3 * math.sqrt(P * s / K)


def test_dict_input_follows_parameter_order():
    names = ["a", "b"]
    grads = {"b": torch.randn(2, 10, 5), "a": torch.randn(2, 1000)}
    projector = make_projector("sjlt", 1050, 64, seed=0, param_names=names)
    flat = torch.cat([grads["a"], grads["b"].reshape(2, -1)], dim=1)
    torch.testing.assert_close(projector.project(grads), projector.project(flat))
    with pytest.raises(ValueError, match="lacks parameter 'a'"):
        projector.project({"b": grads["b"]})


def test_identity_and_errors():
    x = random_vectors(2, 50)
    assert torch.equal(IdentityProjector(50).project(x), x)
    with pytest.raises(ValueError, match="k=100 must be between 1 and .* p=50"):
        make_projector("rademacher", 50, 100)
    with pytest.raises(ValueError, match=r"^unknown projector 'fjlt'; expected one of "
                       r"\['sjlt', 'rademacher', 'gaussian', 'identity'\]$"):
        make_projector("fjlt", 50, 10)
    with pytest.raises(ValueError, match=r"^unknown projector 'fjlt'; expected one of \['sjlt'"):
        FeatureSettings(projector="fjlt")
    with pytest.raises(ValueError, match=r"do not fit a projector with p=50"):
        make_projector("sjlt", 50, 10).project(random_vectors(2, 49))


def test_numpy_independent_of_batch_composition():
    projector = make_projector("sjlt", P, K, seed=0)
    x = random_vectors(5)
    together = projector.project(x)
    alone = torch.cat([projector.project(x[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(together.numpy(), alone.numpy(), rtol=1e-5, atol=1e-6)


def test_golden_values_pin_the_random_streams():
    """Features must agree across runs and machines: pin the first draws of each stream.

    If this fails after a torch upgrade, cached features computed before it are not comparable.
    """
    buckets, weights = SparseProjector(1000, 64, seed=0, sparsity=2).block(0)
    assert buckets[:4].tolist() == [[28, 35], [7, 52], [29, 41], [15, 35]]
    assert weights[:4].sign().tolist() == [[1, 1], [1, -1], [1, -1], [1, -1]]
    dense = RademacherProjector(1000, 64, seed=0).block(0)
    assert (dense[0, :12] * 8).round().tolist() == [1, 1, 1, 1, 1, -1, 1, -1, 1, 1, -1, -1]
    from dtrak_core.attribution.timesteps import sample_noise

    noise = sample_noise(0, 1, [0], (4,))[0].tolist()
    assert noise == pytest.approx([1.582718014717102, 0.05418861657381058, -0.8604421019554138,
                                   0.9330021142959595], rel=1e-6)


def test_registry_builds_each_kind_from_the_same_arguments():
    assert PROJECTORS.names() == ["sjlt", "rademacher", "gaussian", "identity"]
    expected = {"sjlt": SparseProjector, "rademacher": RademacherProjector, "gaussian": GaussianProjector,
                "identity": IdentityProjector}
    for kind, cls in expected.items():
        assert PROJECTORS[kind] is cls and cls.kind == kind  # kind seeds P: it must be the registry name
        assert set(cls.key_settings) <= set(PROJECTOR_SETTINGS)
        projector = make_projector(kind, 300, 32, seed=1, sparsity=2)
        assert type(projector) is cls
        # The identity keeps p coordinates whatever k says; the others project to k.
        assert projector.output_dim == (300 if kind == "identity" else 32)
    assert make_projector("sjlt", 300, 32, sparsity=2).sparsity == 2
    # Gaussian and Rademacher draw from differently seeded streams.
    assert not torch.equal(GaussianProjector(300, 32).block(0).abs(), RademacherProjector(300, 32).block(0).abs())


@pytest.mark.parametrize("kind,k,s", [("sjlt", 64, 4), ("rademacher", 64, None), ("gaussian", 64, None),
                                      ("identity", None, None)])
def test_cache_key_keeps_the_settings_the_projector_declares(kind, k, s):
    fields = FeatureSettings(projector=kind, projection_dim=64, sparsity=4).key_fields()
    assert (fields["projection_dim"], fields["sparsity"]) == (k, s)
    assert list(fields) == list(FeatureSettings().key_fields())  # same keys in the same order


class ToyProjector(Projector):
    """phi = g M with a fixed integer M (p, 3), M[i, j] = (i (j + 1)) mod 5 - 2; k is always 3."""

    kind = "test-toy"
    key_settings = ()

    @classmethod
    def build(cls, input_dim, projection_dim, seed=0, sparsity=4, param_names=None):
        return cls(input_dim, 3, seed, param_names)

    def matrix(self) -> torch.Tensor:
        rows, cols = torch.arange(self.input_dim)[:, None], torch.arange(3)[None, :]
        return ((rows * (cols + 1)) % 5 - 2).float()

    def _project(self, flat: torch.Tensor) -> torch.Tensor:
        return flat @ self.matrix()


@pytest.fixture
def toy_registered(monkeypatch):
    """Register the toy projector for one test (the registry's entries are restored afterwards)."""
    monkeypatch.setattr(PROJECTORS, "_entries", dict(PROJECTORS._entries))
    PROJECTORS.register("test-toy")(ToyProjector)


def test_a_projector_registered_elsewhere_is_used_by_the_featurizer(toy_registered, tiny_unet, scheduler):
    settings = FeatureSettings(projector="test-toy", projection_dim=64, sparsity=7, num_timesteps=2,
                               device="cpu")
    # Neither k nor s is in the toy's key_settings, so the cache key drops both.
    assert settings.key_fields()["projection_dim"] is None and settings.key_fields()["sparsity"] is None
    featurizer = Featurizer.create(UnconditionalPixelTask(tiny_unet, scheduler), settings)
    assert isinstance(featurizer.computer.projector, ToyProjector) and featurizer.feature_dim == 3
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    features = featurizer.featurize_batch(images, [0, 1])
    grads = featurizer.gradients(images, [0, 1])
    flat = torch.cat([grads[name].reshape(2, -1) for name in featurizer.param_names], dim=1).double()
    rows, cols = torch.arange(flat.shape[1])[:, None], torch.arange(3)[None, :]
    expected = flat @ ((rows * (cols + 1)) % 5 - 2).double()
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-6 * expected.abs().max().item())
