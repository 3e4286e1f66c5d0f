"""Where things live: the repository, the embedded models, and the cache.

The cache folder is resolved at call time from ``DTRAK_CACHE`` (default ``<repo>/cache``), so a
process (or a test) that sets the variable after import is obeyed; every cache path comes from
the functions here.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The embedded demo DDPM and the small evaluation model (committed pipeline folders).
MODELS_DIR = REPO_ROOT / "models"
DEMO_MODEL_DIR = MODELS_DIR / "emoji3-demo"
MINI_MODEL_DIR = MODELS_DIR / "emoji3-mini"


def cache_dir() -> Path:
    """Computed artefacts (datasets, features, scores, samples, job state); contents git-ignored."""
    return Path(os.environ.get("DTRAK_CACHE", REPO_ROOT / "cache"))


def features_dir() -> Path:
    """The feature store's root."""
    return cache_dir() / "features"


def emoji3_dir() -> Path:
    """emoji3 at 32 px, the data of the demo model."""
    return cache_dir() / "emoji3"


def emoji3_16_dir() -> Path:
    """emoji3 rendered at 16 px, the data of the mini model."""
    return cache_dir() / "emoji3-16"

