"""The score command attributes a text-to-image model's targets with their own captions."""

import numpy as np
import pandas as pd

from dtrak_core import cli
from dtrak_core.attribution.featurizer import FeatureSettings
from dtrak_core.attribution.loading import load_dataset_for, load_model
from dtrak_core.attribution.methods import score_targets


def test_score_uses_each_targets_caption(sd_lora, sd_data, tmp_path):
    out = tmp_path / "scores"
    args = ["score", "--model", str(sd_lora), "--train", str(sd_data), "--targets", str(sd_data), "-K", "1", "-k", "8",
            "--lambda", "0.01", "--out", str(out), "--cache-dir", str(tmp_path / "features"), "--no-progress"]
    assert cli.main(args) == 0
    table = pd.read_parquet(out.with_suffix(".parquet"))
    model = load_model(sd_lora)
    data = load_dataset_for(model, sd_data)
    settings = FeatureSettings(num_timesteps=1, projection_dim=8)
    captions = data.metadata["text"].tolist()
    right = score_targets("dtrak", [model], data, data.images, settings, [0.01], tmp_path / "features",
                          captions=captions)[0.01]
    wrong = score_targets("dtrak", [model], data, data.images, settings, [0.01], tmp_path / "features",
                          captions=captions[::-1])[0.01]
    got = np.zeros_like(right)
    for row in table.itertuples(index=False):
        got[row.target_index, row.train_index] = row.score
    assert np.allclose(got, right, rtol=1e-5, atol=1e-6) and not np.allclose(got, wrong, rtol=1e-3)
