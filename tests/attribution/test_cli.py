"""The featurize / score / bench subcommands, end to end on tiny models, and their error paths."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.attribution.conftest import synthetic_images, write_image_folder
from dtrak_core.cli import main
from dtrak_core.models import UNET_PRESETS, make_scheduler
from dtrak_core.tasks import UnconditionalPixelTask

FAST = ["-K", "2", "-k", "256", "--device", "cpu", "--no-progress"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny DDPM trained 200 steps on 8 distinct 16x16 images: (model folder, image folder)."""
    root = tmp_path_factory.mktemp("trained")
    images = synthetic_images(8, seed=1)
    data = write_image_folder(root / "data", images)
    torch.manual_seed(0)
    unet = UNET_PRESETS["tiny"].build(image_size=16, seed=0).train()
    scheduler = make_scheduler()
    abar = scheduler.alphas_cumprod.float()
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        t = torch.randint(0, 1000, (len(x0),), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = abar[t].view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5  # it learned something
    UnconditionalPixelTask(unet.eval(), scheduler).save(root / "model")
    return root / "model", data


def test_training_images_attribute_to_themselves(trained, tmp_path, capsys):
    """D-TRAK: each training image, scored as a target with fresh noise, ranks itself in the top 2."""
    model, data = trained
    out = tmp_path / "scores"
    code, stdout, err = run_cli(capsys, "score", "--model", model, "--train", data, "--targets", data,
                                "--lambda", "0.1", "10", "--out", out, "--cache-dir", tmp_path / "cache",
                                "-K", "10", "-k", "1024", "--device", "cpu", "--no-progress")
    assert code == 0, err
    table = pd.read_parquet(out.with_suffix(".parquet"))
    csv = pd.read_csv(out.with_suffix(".csv"))
    assert len(table) == len(csv) == 2 * 8 * 8
    assert {"target", "lambda", "scorer", "train_index", "file_name", "label", "score", "rank"} <= set(table.columns)
    assert set(table["label"]) == {"alice", "bob"}
    for (lam, target), group in table.groupby(["lambda", "target"]):
        assert sorted(group["rank"]) == list(range(1, 9))
        own = group.loc[group["file_name"] == target, "rank"].item()
        assert own <= 2, f"{target} ranks itself {own} at lambda {lam}"
    # The control: random scores do not put every image on top of its own list.
    code, _, err = run_cli(capsys, "score", "--model", model, "--train", data, "--targets", data,
                           "--scorer", "random", "--out", tmp_path / "random", "--no-progress")
    assert code == 0, err
    random = pd.read_parquet(tmp_path / "random.parquet")
    own = random[random["file_name"] == random["target"]]["rank"]
    assert (own > 2).any()


def test_featurize_then_cached_score(model_dir, image_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, stdout, err = run_cli(capsys, "featurize", "--model", model_dir, "--data", image_folder,
                                "--cache-dir", cache, *FAST)
    assert code == 0, err
    assert "5 x 256 features" in stdout
    manifest = json.loads(next(cache.glob("*/manifest.json")).read_text())
    assert manifest["status"] == "complete" and manifest["shape"] == [5, 256]
    targets = write_image_folder(tmp_path / "targets", synthetic_images(2, seed=7), artists=False)
    for scorer in ("dtrak", "cosine", "relative", "pixel-cosine"):
        out = tmp_path / f"out-{scorer}"
        code, _, err = run_cli(capsys, "score", "--model", model_dir, "--train", image_folder,
                               "--targets", targets, "--scorer", scorer, "--top", "3", "--out", out,
                               "--cache-dir", cache, *FAST)
        assert code == 0, err
        table = pd.read_csv(out.with_suffix(".csv"))
        assert len(table) == 2 * 3 and table["rank"].max() == 3
    # Train features were reused: one folder for train, one for targets.
    assert len(list(cache.glob("*/manifest.json"))) == 2


def test_ensemble_of_two_models_is_the_mean(model_dir, image_folder, tmp_path, capsys):
    other = tmp_path / "model2"
    UnconditionalPixelTask(UNET_PRESETS["tiny"].build(image_size=16, seed=1), make_scheduler()).save(other)
    outs = {}
    for name, models in {"a": [model_dir], "b": [other], "ab": [model_dir, other]}.items():
        code, _, err = run_cli(capsys, "score", "--model", *models, "--train", image_folder, "--targets",
                               image_folder, "--scorer", "dot", "--out", tmp_path / name,
                               "--cache-dir", tmp_path / "cache", *FAST)
        assert code == 0, err
        outs[name] = pd.read_parquet(tmp_path / f"{name}.parquet").sort_values(["target_index", "train_index"])
    np.testing.assert_allclose(outs["ab"]["score"].to_numpy(),
                               (outs["a"]["score"].to_numpy() + outs["b"]["score"].to_numpy()) / 2, rtol=1e-4)


def one_sentence(err: str) -> str:
    """The error is one line, last on stderr (diffusers may log loading progress before it)."""
    lines = [line for line in err.strip().splitlines() if line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


def test_model_folder_that_is_not_a_pipeline(image_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "featurize", "--model", tmp_path / "empty", "--data", image_folder, *FAST)
    assert code == 2
    assert "is not a diffusers pipeline folder" in one_sentence(err)


def test_image_size_mismatch(model_dir, tmp_path, capsys):
    small = write_image_folder(tmp_path / "small", synthetic_images(3, size=8))
    code, _, err = run_cli(capsys, "featurize", "--model", model_dir, "--data", small, *FAST)
    assert code == 2
    assert "are 8x8 but the model" in one_sentence(err) and "expects 16x16" in err


def test_projection_dim_larger_than_parameters(model_dir, image_folder, capsys):
    code, _, err = run_cli(capsys, "featurize", "--model", model_dir, "--data", image_folder,
                           "-k", "100000000", "--device", "cpu", "--no-progress")
    assert code == 2
    assert "k=100000000 exceeds the number of selected gradient coordinates" in one_sentence(err)


def test_negative_lambda_is_refused_before_loading_anything(image_folder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "score", "--model", tmp_path / "does-not-exist", "--train", image_folder,
                           "--targets", image_folder, "--lambda", "-1", "--out", tmp_path / "x", *FAST)
    assert code == 2
    assert "lambda=-1.0 must be a finite number >= 0" in one_sentence(err)
    assert not (tmp_path / "x.csv").exists()


def test_empty_dataset(model_dir, tmp_path, capsys):
    empty = tmp_path / "emptydata"
    empty.mkdir()
    (empty / "metadata.csv").write_text("file_name,artist\n")
    code, _, err = run_cli(capsys, "featurize", "--model", model_dir, "--data", empty, *FAST)
    assert code == 2
    assert "has no images" in one_sentence(err)


def test_bad_settings_are_one_sentence(model_dir, image_folder, capsys):
    code, _, err = run_cli(capsys, "featurize", "--model", model_dir, "--data", image_folder,
                           "-K", "0", "--device", "cpu", "--no-progress")
    assert code == 2
    assert "K=0" in one_sentence(err)
