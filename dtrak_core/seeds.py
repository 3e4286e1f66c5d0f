"""Seeds: the two seed derivations, and seed lists as written on command lines ('0-3,7' <-> [0, 1, 2, 3, 7]).

Two derivations exist because stored results depend on each, bit for bit; their algorithms
never change:

- :func:`experiment_seed` seeds what training and evaluation draw: training batches, timesteps
  and noise, the (t, eps) draws of the diffusion loss, LDS subsets, counterfactual removals;
- :func:`feature_seed` seeds what attribution draws: the noise of a feature (seed, sample id,
  t) and the blocks of the random projections.
"""

from __future__ import annotations

import argparse
import hashlib


def experiment_seed(*parts: int | str) -> int:
    """63-bit seed: sha256 of "/".join(parts), first 8 bytes big-endian, shifted right by one."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def feature_seed(*parts: object) -> int:
    """63-bit seed: sha256 of ":".join(parts), first 8 bytes little-endian, top bit cleared."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def parse_seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must look like '0-63' or '1,5,9', got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be non-negative integers, got {text!r}")
    return seeds


def format_seeds(seeds: list[int]) -> str:
    """The inverse of :func:`parse_seeds`: [0, 1, 2, 3, 7] -> '0-3,7' (runs of 3 or more as ranges)."""
    parts: list[str] = []
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts += [f"{seeds[i]}-{seeds[j]}"] if j - i >= 2 else [str(s) for s in seeds[i:j + 1]]
        i = j + 1
    return ",".join(parts)
