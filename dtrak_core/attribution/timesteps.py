"""Which timesteps a feature averages over, and the noise drawn at each.

Timesteps: ``K`` uniform steps of ``T``, ``{floor(i T / K) : i = 0..K-1}`` (``{0, 100, ..., 900}``
for K = 10, T = 1000; T is always the model's own, as in D-TRAK), or an explicit list.

Noise: the reference D-TRAK code seeds the noise by (seed, t) and the sample's batch position,
so a sample's feature changes with the batch size. Here every draw eps(seed, sample_id, t) has
its own ``torch.Generator`` seeded by a hash of the triple, drawn on the CPU and then moved,
so a sample's feature is the same whatever batch, position or device computes it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dtrak_core.conventions import DEFAULT_NUM_TIMESTEPS
from dtrak_core.seeds import feature_seed


def uniform_timesteps(num_timesteps: int, num_train_timesteps: int) -> list[int]:
    """The ``K`` timesteps ``floor(i T / K)``, i = 0..K-1, all distinct for 1 <= K <= T."""
    if not 1 <= num_timesteps <= num_train_timesteps:
        raise ValueError(f"number of timesteps K={num_timesteps} must be between 1 and "
                         f"T={num_train_timesteps}")
    return [i * num_train_timesteps // num_timesteps for i in range(num_timesteps)]


def resolve_timesteps(
    num_timesteps: int | None, timesteps: Sequence[int] | None, num_train_timesteps: int
) -> list[int]:
    """An explicit list wins (validated: non-empty, distinct, each in [0, T)); else K uniform steps."""
    if timesteps is None:
        return uniform_timesteps(num_timesteps or DEFAULT_NUM_TIMESTEPS, num_train_timesteps)
    steps = [int(t) for t in timesteps]
    if not steps:
        raise ValueError("the explicit timestep list is empty; expected at least one timestep")
    bad = [t for t in steps if not 0 <= t < num_train_timesteps]
    if bad:
        raise ValueError(f"timestep {bad[0]} is outside [0, {num_train_timesteps}) for this scheduler")
    if len(set(steps)) != len(steps):
        raise ValueError(f"the timestep list {steps} has repeated values; expected distinct timesteps")
    return steps


def sample_noise(
    seed: int, sample_id: int, timesteps: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """Noise for one sample at each timestep, float32 CPU tensor of shape (K, *shape).

    Row i is drawn from a generator seeded by ``feature_seed("noise", seed, sample_id, t_i)``,
    so it depends on nothing else.
    """
    out = torch.empty((len(timesteps), *shape), dtype=torch.float32)
    generator = torch.Generator(device="cpu")
    for i, t in enumerate(timesteps):
        generator.manual_seed(feature_seed("noise", seed, int(sample_id), int(t)))
        out[i] = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return out


def batch_noise(
    seed: int, sample_ids: Sequence[int], timesteps: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """Noise for a batch, float32 CPU tensor (B, K, *shape); row b depends only on sample_ids[b]."""
    return torch.stack([sample_noise(seed, int(i), timesteps, shape) for i in sample_ids])
