"""Where things live: the repository root, the cache, the embedded models."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Computed artefacts (datasets, features, scores, samples, job state); contents git-ignored.
CACHE_DIR = Path(os.environ.get("DTRAK_CACHE", REPO_ROOT / "cache"))
#: The embedded demo DDPM and the small evaluation model (committed pipeline folders).
MODELS_DIR = REPO_ROOT / "models"
DEMO_MODEL_DIR = MODELS_DIR / "emoji3-demo"
MINI_MODEL_DIR = MODELS_DIR / "emoji3-mini"
EMOJI3_DIR = CACHE_DIR / "emoji3"
#: emoji3 rendered at 16 px, the data of the mini model.
EMOJI3_16_DIR = CACHE_DIR / "emoji3-16"
