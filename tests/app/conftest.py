"""A tiny trained model, its data and its cached D-TRAK features, for the app's tests.

The app is pointed at them with environment variables (DTRAK_MODEL_DIR, DTRAK_CACHE,
DTRAK_HIDE_DEMO), so the tests never touch the real cache or the embedded demo model.
Features use K=2 timesteps and k=256 (``FAST`` query parameters) so everything stays small.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dtrak_app.text import WORD_JOINER
from dtrak_core.attribution.featurizer import FeatureSettings
from dtrak_core.attribution.methods import train_features
from dtrak_core.attribution.loading import load_model, load_training_set
from tests.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[2]
APP = str(REPO / "app.py")
PAGES = REPO / "pages"
FAST = {"K": "2", "k": "256"}

torch.set_num_threads(1)


def plain(markdown: object) -> str:
    """Markdown as it reads: the backslash escapes and word joiners of ``md_escape`` removed
    (AppTest shows an element's Markdown source)."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", str(markdown)).replace(WORD_JOINER, "")


@dataclass(frozen=True)
class AppEnv:
    model_dir: Path
    data_dir: Path
    cache: Path

    def variables(self) -> dict[str, str]:
        return {"DTRAK_MODEL_DIR": str(self.model_dir), "DTRAK_MODEL_NAME": "tiny", "DTRAK_HIDE_DEMO": "1",
                "DTRAK_CACHE": str(self.cache), "DTRAK_DATA_DIR": "", "DTRAK_TOKEN": ""}


def build_app_env(root: Path, data: Path | None = None) -> AppEnv:
    """Train a tiny model on ``data`` (default: a 24-image folder, 20 in its train split; images
    16 px) and cache its D-TRAK features."""
    from dtrak_core.training import TrainConfig, train

    data = write_image_folder(root / "data", n=24) if data is None else data
    model_dir = train(TrainConfig(data_dir=str(data), out_dir=str(root / "model"), preset="tiny", image_size=16,
                                  steps=4, batch_size=4, warmup_steps=2, checkpoint_every=2), progress=False)
    cache = root / "cache"
    model = load_model(model_dir)
    settings = FeatureSettings(output_fn="square", num_timesteps=int(FAST["K"]), projection_dim=int(FAST["k"]))
    train_features(model, load_training_set(model), settings, cache / "features")
    return AppEnv(Path(model_dir), data, cache)


@pytest.fixture(scope="session")
def app_env(tmp_path_factory) -> AppEnv:
    return build_app_env(tmp_path_factory.mktemp("app"))


@pytest.fixture
def env(app_env, monkeypatch) -> AppEnv:
    for name, value in app_env.variables().items():
        monkeypatch.setenv(name, value)
    return app_env
