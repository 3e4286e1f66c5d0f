"""The LDS build end to end on a tiny model: retrain, measure, resume, score, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dtrak_core.evaluation.lds.build import build_lds, job_queue
from dtrak_core.evaluation.lds.config import LdsBuildConfig
from dtrak_core.evaluation.lds.measure import measure_losses, measure_new_targets, measure_timesteps
from dtrak_core.evaluation.lds.outputs import build_progress, load_outputs, output_path
from dtrak_core.evaluation.lds.report import build_command, write_report
from dtrak_core.evaluation.lds.scores import GridEntry, compute_scores, evaluate, load_scores, ordering_checks
from dtrak_core.evaluation.lds.targets import Targets
from dtrak_core.evaluation.retrain import full_data_train_config, subset_train_config
from dtrak_core.evaluation.subsets import SubsetPlan
from tests.conftest import write_image_folder


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model trained by our trainer on 20 images of 2 artists (4 validation images)."""
    from dtrak_core.training import TrainConfig, train

    root = tmp_path_factory.mktemp("lds")
    data = write_image_folder(root / "data", n=24, size=16)
    config = TrainConfig(data_dir=str(data), out_dir=str(root / "model"), preset="tiny", image_size=16,
                         steps=8, batch_size=4, warmup_steps=2, checkpoint_every=4, keep_checkpoints=True)
    return train(config, progress=False), root


def _config(model: Path, out: Path, **changes) -> LdsBuildConfig:
    base = dict(model_dir=str(model), out_dir=str(out), num_subsets=3, num_tuning_subsets=2, seeds=[0],
                measure_timesteps=3, generated_seeds=[0, 1], sampler_steps=2, checkpoint_every=2)
    base.update(changes)
    return LdsBuildConfig(**base)


def test_measure_timesteps_are_offset_uniform_over_the_models_T():
    assert measure_timesteps(100, 1000)[:3] == [5, 15, 25] and measure_timesteps(100, 1000)[-1] == 995
    assert measure_timesteps(4, 1000) == [125, 375, 625, 875]
    assert measure_timesteps(4, 200) == [25, 75, 125, 175]
    assert measure_timesteps(200, 200) == list(range(200))
    with pytest.raises(ValueError, match="measure timesteps 201 must be between 1 and T=200"):
        measure_timesteps(201, 200)


def test_the_measured_timesteps_are_bounded_by_the_models_own_T(tiny_setup, tmp_path):
    """A model whose scheduler has T = 50: 60 timesteps are refused before anything is written."""
    import shutil

    model, _ = tiny_setup
    copy = tmp_path / "model-T50"
    shutil.copytree(model, copy)
    scheduler_file = copy / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text())
    assert scheduler_config["num_train_timesteps"] == 1000
    scheduler_file.write_text(json.dumps({**scheduler_config, "num_train_timesteps": 50}))
    with pytest.raises(ValueError, match="measure timesteps 60 must be between 1 and T=50"):
        build_lds(_config(copy, tmp_path / "build", measure_timesteps=60), progress=False)
    assert not (tmp_path / "build").exists()


def test_subset_config_follows_the_recipe_with_the_same_epochs(tiny_setup):
    model, _ = tiny_setup
    recipe = json.loads((model / "recipe.json").read_text())
    config = subset_train_config(recipe["config"], [0, 2, 4, 6, 8], seed=3, out_dir="x")
    assert config.subset == [0, 2, 4, 6, 8] and config.seed == 3
    assert config.steps == round(8 * 5 / 20) and config.warmup_steps == round(2 * 5 / 20)
    assert (config.batch_size, config.learning_rate, config.preset) == (4, recipe["config"]["learning_rate"], "tiny")
    same_steps = subset_train_config(recipe["config"], [0, 1], 0, "x", steps_rule="steps")
    assert same_steps.steps == 8
    # A recipe that itself trained on a subset: indices compose.
    nested = subset_train_config({**recipe["config"], "subset": [10, 11, 12, 13]}, [1, 3], 0, "x", "steps")
    assert nested.subset == [11, 13]


def test_an_ensemble_model_is_the_recipe_with_another_seed(tiny_setup):
    from dataclasses import asdict

    model, _ = tiny_setup
    base = json.loads((model / "recipe.json").read_text())["config"]
    assert base["keep_checkpoints"] and base["steps"] == 8
    config = full_data_train_config(base, 5, "x", checkpoint_every=3)
    assert asdict(config) == {**base, "seed": 5, "out_dir": "x", "checkpoint_every": 3, "keep_checkpoints": False}
    assert full_data_train_config(base, 5, "x").checkpoint_every == 8  # never beyond the last step


def test_build_resumes_exactly_the_unfinished_models_then_scores_and_reports(tiny_setup, monkeypatch, tmp_path):
    model, _ = tiny_setup
    out = tmp_path / "build"
    config = _config(model, out)
    trained: list[str] = []
    resumed_from: dict[str, int] = {}
    import torch

    import dtrak_core.training as training

    original = training.train

    def recording_train(train_config, progress=True):
        # build_lds imports the trainer when it runs, so patching the module attribute records
        # every model it trains, and the step each one starts from.
        name = Path(train_config.out_dir).name
        trained.append(name)
        state = Path(train_config.out_dir) / training.STATE_FILE
        resumed_from[name] = int(torch.load(state, weights_only=True)["step"]) if state.exists() else 0
        return original(train_config, progress=False)

    monkeypatch.setattr(training, "train", recording_train)

    first = build_lds(config, progress=False, max_models=2)
    plan = SubsetPlan.load(out)
    queue = [j.name for j in job_queue(config, plan)]
    assert first == {"done": 2, "total": 5}
    assert trained == queue[:2]
    # Subset weights are deleted after measuring; outputs hold one loss per target.
    targets = Targets.load(out / "targets")
    assert len(targets.indices("validation")) == 4 and len(targets.indices("generated")) == 2
    record = json.loads(output_path(out, queue[0]).read_text())
    assert len(record["losses"]) == 6 and not (out / "runs" / queue[0]).exists()
    assert record["num_train_images"] == 10  # half of each artist's 10 training images
    before = output_path(out, queue[0]).read_bytes()

    # A model killed mid-training: its folder and a checkpoint at step 2 exist, no output. The
    # next run must train exactly the three unfinished models, in queue order, resuming that one.
    job = job_queue(config, plan)[2]
    partial = subset_train_config(json.loads((model / "recipe.json").read_text())["config"],
                                  plan.get(job.subset).indices, job.seed, out / "runs" / job.name,
                                  checkpoint_every=config.checkpoint_every)
    assert partial.steps > 2
    original(partial.__class__(**{**partial.__dict__, "steps": 2}), progress=False)
    trained.clear()
    resumed_from.clear()
    second = build_lds(config, progress=False)
    assert second == {"done": 5, "total": 5}
    assert trained == queue[2:]
    assert resumed_from == {queue[2]: 2, queue[3]: 0, queue[4]: 0}
    assert json.loads(output_path(out, queue[2]).read_text())["steps"] == partial.steps
    assert output_path(out, queue[0]).read_bytes() == before
    assert build_lds(config, progress=False) == {"done": 5, "total": 5}
    assert trained == queue[2:]  # nothing retrained

    # Settings that change the meaning of the numbers cannot be mixed into the build.
    with pytest.raises(ValueError, match="measure_timesteps"):
        build_lds(_config(model, out, measure_timesteps=5), progress=False)

    tune, report = load_outputs(out, "tune"), load_outputs(out, "report")
    assert (tune.num_subsets, report.num_subsets) == (2, 3)
    assert report.masks.shape == (3, 20) and report.losses.shape == (3, 6)
    progress = build_progress(out)
    assert progress["report"]["models_done"] == 3 and progress["median_train_seconds"] is not None

    grid = [GridEntry("dtrak-K2", "D-TRAK, K=2", "dtrak", 2), GridEntry("pixel", "raw pixel cosine", "pixel", None),
            GridEntry("random", "random", "random", None),
            GridEntry("tracin-K2", "TracIn, K=2", "tracin", 2, None, "checkpoints"),
            GridEntry("ensemble-K2", "D-TRAK ensemble, K=2", "dtrak", 2, None, "ensemble")]
    status = compute_scores(out, grid, lambdas=[0.1, 10.0], projection_dim=32, feature_root=tmp_path / "features",
                            progress=False)
    assert status == {"dtrak-K2": "written", "pixel": "written", "random": "written", "tracin-K2": "written",
                      "ensemble-K2": "skipped: no finished ensemble retrains yet"}
    # TracIn = the mean over the two kept checkpoints of target . train feature dot products.
    tracin = load_scores(out / "scores" / "tracin-K2.npz")[1]
    assert tracin.shape == (1, 6, 20) and np.isfinite(tracin).all()
    # One full-data retrain with another seed makes the ensemble: the mean of the two models' scores.
    assert build_lds(_config(model, out, ensemble_seeds=[1]), progress=False) == {"done": 6, "total": 6}
    assert (out / "runs" / "ensemble-s1" / "model_index.json").exists()  # ensemble models are kept
    assert compute_scores(out, grid[-1:], lambdas=[0.1, 10.0], projection_dim=32,
                          feature_root=tmp_path / "features", progress=False) == {"ensemble-K2": "written"}
    single = load_scores(out / "scores" / "dtrak-K2.npz")[1]
    ensemble = load_scores(out / "scores" / "ensemble-K2.npz")[1]
    assert not np.allclose(single, ensemble)
    from dtrak_core.attribution.featurizer import FeatureSettings
    from dtrak_core.attribution.methods import score_targets
    from dtrak_core.attribution.loading import load_model, load_training_set

    train_set = load_training_set(load_model(model))
    other = score_targets("dtrak", [load_model(out / "runs" / "ensemble-s1")], train_set, targets.images,
                          FeatureSettings(num_timesteps=2, projection_dim=32), [0.1], tmp_path / "features")[0.1]
    assert ensemble[0] == pytest.approx((single[0] + other) / 2, rel=1e-4, abs=1e-6)
    assert compute_scores(out, grid, lambdas=[0.1, 10.0], projection_dim=32, feature_root=tmp_path / "features",
                          progress=False)["dtrak-K2"] == "cached"
    lambdas, scores = load_scores(out / "scores" / "dtrak-K2.npz")
    assert lambdas.tolist() == [0.1, 10.0] and scores.shape == (2, 6, 20)

    results = evaluate(out, grid, num_bootstrap=20)
    val = results["entries"]["dtrak-K2"]["kinds"]["validation"]
    assert val["status"] == "measured" and val["lambda"] in (0.1, 10.0)
    assert val["report_subsets"] == 3 and len(val["per_target"]) == 4
    assert set(val["tune_lds_by_lambda"]) == {"0.1", "10"}
    assert results["entries"]["random"]["kinds"]["generated"]["lambda"] is None
    assert results["entries"]["tracin-K2"]["kinds"]["validation"]["status"] == "measured"
    with np.load(out / "results" / "predictions.npz") as predictions:
        assert predictions["pixel/generated"].shape == (2, 3)

    # The paper's ordering: the default claims name the real grid, so here they are pending; a claim
    # on this grid's entries gives the paired difference of the two per-target LDS means.
    assert results["ordering"][0]["validation"] == {"verdict": "pending"}
    with np.load(out / "results" / "predictions.npz") as stored:
        arrays = {k: stored[k] for k in stored.files}
    check = ordering_checks(load_outputs(out, "report"), Targets.load(out / "targets"), arrays, 50,
                            [("d above random", "dtrak-K2", "random")])[0]["validation"]
    d, r = (np.array(results["entries"][e]["kinds"]["validation"]["per_target"], dtype=float)
            for e in ("dtrak-K2", "random"))
    both = np.isfinite(d) & np.isfinite(r)
    assert check["difference"] == pytest.approx(np.mean(d[both] - r[both]), abs=1e-6)
    assert check["ci_low"] <= check["ci_high"] and check["verdict"] in (
        "holds", "reversed", "holds by the mean, CI includes 0", "not shown, CI includes 0")
    (out / "notes.md").write_text("## Why ours differs\n\nBecause.")

    report_path = write_report(out, tmp_path / "lds.md", "python -m dtrak_core lds report", grid)
    text = report_path.read_text()
    assert "## The paper's ordering, checked" in text and "| square above loss (D-TRAK vs TRAK), K=10 | pending |" in text
    assert "## Why ours differs\n\nBecause." in text
    assert set(results["common_factor_share"]) == {"validation", "generated"}
    assert f"{100 * results['common_factor_share']['generated']:.0f}% (generated)" in text
    assert "Ensemble retrains done: 1 of 1" in text
    assert "PARTIAL" not in text and "| D-TRAK, K=2 |" in text and "lds report" in text


def test_job_queue_orders_seeds_first_and_reaches_two_tuning_and_two_reported_subsets_early():
    from dtrak_core.evaluation.subsets import make_plan

    plan = make_plan(["a", "b"] * 10, num_report=8, num_tune=4)
    config = LdsBuildConfig(model_dir="m", out_dir="o", num_subsets=8, num_tuning_subsets=4, seeds=[0, 1],
                            ensemble_seeds=[5])
    names = [j.name for j in job_queue(config, plan)]
    assert sorted(n[:4] for n in names[:4]) == ["repo", "repo", "tune", "tune"]
    first_pass = names[:12]
    assert sorted(first_pass) == sorted(f"{s.name}-s0" for s in plan.subsets)
    assert names[12] == "ensemble-s5"
    assert sorted(names[13:]) == sorted(f"{s.name}-s1" for s in plan.subsets)


def test_a_model_locked_by_another_worker_is_left_to_it(tiny_setup, tmp_path):
    import fcntl

    model, _ = tiny_setup
    out = tmp_path / "build"
    config = _config(model, out, num_subsets=2, num_tuning_subsets=0)
    build_lds(config, progress=False, max_models=0)  # plan and targets only
    first, second = [j.name for j in job_queue(config, SubsetPlan.load(out))]
    # Another worker holds the first model: this one must train the second and leave the first.
    with open(config.work / f"{first}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert build_lds(config, progress=False) == {"done": 1, "total": 2}
        assert output_path(out, second).exists() and not output_path(out, first).exists()
    # Its lock released (the worker finished or died), the next run takes it.
    assert build_lds(config, progress=False) == {"done": 2, "total": 2}
    # Finished models leave no lock files behind; the build file's and the full model's stay.
    assert sorted(p.name for p in config.work.glob("*.lock")) == ["build.lock", "full.lock"]


def test_extra_validation_targets_extend_a_finished_build_and_keep_every_old_loss(tmp_path, monkeypatch):
    """A model of artists b and c; the held-out images of artist d are added after the build."""
    from dtrak_core.training import TrainConfig, train

    # Four artists in turn; the held-out images (every 6th from the 6th) are b's and d's.
    data = write_image_folder(tmp_path / "data", n=24, size=16, artists=("a", "b", "c", "d"))
    model = train(TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "model"), preset="tiny", image_size=16,
                              steps=8, batch_size=4, warmup_steps=2, filter_column="artist",
                              filter_values=["b", "c"]), progress=False)
    out = tmp_path / "build"
    config = _config(model, out, num_subsets=2, num_tuning_subsets=1, generated_seeds=[0])
    assert build_lds(config, progress=False) == {"done": 3, "total": 3}
    old_targets = Targets.load(out / "targets")
    assert old_targets.groups == ["selection", "selection", "generated"]
    old = {p.name: json.loads(p.read_text()) for p in (out / "outputs").glob("*.json")}

    extended = _config(model, out, num_subsets=2, num_tuning_subsets=1, generated_seeds=[0],
                       extra_validation=["artist=d"])
    assert build_lds(extended, progress=False) == {"done": 3, "total": 3}
    targets = Targets.load(out / "targets")
    assert targets.groups == ["selection", "selection", "generated", "artist=d", "artist=d"]
    assert targets.names[3:] == ["d/011.png", "d/023.png"] and targets.kinds[3:] == ["validation"] * 2
    assert np.array_equal(targets.images[:3], old_targets.images)  # old targets keep their index (and noise)
    for name, before in old.items():
        after = json.loads((out / "outputs" / name).read_text())
        assert after["losses"][:3] == before["losses"] and len(after["losses"]) == 5
        # The build's own cost stays at the top level; the addition is a note of its own.
        assert after["measure_seconds"] == before["measure_seconds"]
        extension = after["extensions"][0]
        assert extension["targets_before"] == 3 and extension["targets_after"] == 5
        assert extension["measure_seconds"] >= 0
        # Training is deterministic on CPU: the retrain reproduced the weights bit for bit.
        assert extension["reproduced"] and after["model_hash"] == before["model_hash"]
        if name != "full.json":
            assert after["train_seconds"] == before["train_seconds"] and extension["train_seconds"] > 0
    # The new targets were measured with their own noise ids: as if measured with all the others.
    from dtrak_core.tasks import load_task

    timesteps = measure_timesteps(3, load_task(model).num_train_timesteps)
    assert json.loads((out / "lds.json").read_text())["measure_timesteps_list"] == timesteps
    everything = measure_losses(model, targets.images, timesteps, config.measure_seed)
    full = json.loads(output_path(out, "full").read_text())["losses"]
    np.testing.assert_allclose(full, everything, rtol=1e-6)
    assert load_outputs(out, "report").losses.shape == (2, 5)
    assert "--extra-validation artist=d" in build_command(json.loads((out / "lds.json").read_text()), out)

    # The report splits the validation LDS by group: same lambda and subsets, fewer targets.
    from dtrak_core.evaluation.metrics import lds_summary

    grid = [GridEntry("pixel", "raw pixel cosine", "pixel", None)]
    compute_scores(out, grid, feature_root=tmp_path / "features", progress=False)
    groups = evaluate(out, grid, num_bootstrap=20)["entries"]["pixel"]["kinds"]["validation"]["groups"]
    scores = load_scores(out / "scores" / "pixel.npz")[1][0]
    report = load_outputs(out, "report")
    assert groups["artist=d"] == lds_summary(scores[3:], report.masks, report.losses[:, 3:], num_bootstrap=20).to_dict()
    assert groups["selection"]["num_targets"] == 2
    text = write_report(out, tmp_path / "lds.md", "lds report", grid).read_text()
    assert "4 validation images (all 2 held-out images of the model's selection + 2 held-out images where " \
           "artist=d)" in text
    assert "| method | the model's selection (2) | artist=d (2) |" in text

    # Asking again (or without the filter: it stays part of the build) trains nothing.
    import dtrak_core.training as training

    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("nothing should be retrained"))
    assert build_lds(config, progress=False) == {"done": 3, "total": 3}
    assert Targets.load(out / "targets").groups == targets.groups

    # A model that is not reproduced is measured again on every target (no file mixes two models).
    previous = {"model_hash": "another", "losses": [0.0, 0.0, 0.0]}
    losses, note = measure_new_targets(Path(model), "this", previous, targets, timesteps, config)
    np.testing.assert_allclose(losses, everything, rtol=1e-6)
    assert note == {"targets_before": 3, "targets_after": 5, "reproduced": False,
                    "old_targets_max_abs_change": pytest.approx(float(np.max(np.abs(everything[:3]))))}

    with pytest.raises(ValueError, match="5 targets"):
        measure_new_targets(Path(model), "this", {"model_hash": "this", "losses": [0.0] * 6}, targets, timesteps,
                            config)

    build_file = (out / "lds.json").read_text()
    for spec, message in [("artist=b", "all 2 of its images are targets of the build already"),
                          ("artist=z", "matches no 'validation' image; their artist values are b, d"),
                          ("style=x", "has no column 'style'"), ("artist", "must be COLUMN=VALUE")]:
        with pytest.raises(ValueError, match=message):
            build_lds(_config(model, out, num_subsets=2, num_tuning_subsets=1, generated_seeds=[0],
                              extra_validation=[spec]), progress=False)
    # A filter that failed left no trace in the build.
    assert (out / "lds.json").read_text() == build_file and Targets.load(out / "targets").names == targets.names


def test_a_worker_stops_when_another_adds_targets_under_it(tiny_setup, tmp_path, monkeypatch):
    model, _ = tiny_setup
    out = tmp_path / "build"
    config = _config(model, out, generated_seeds=[0])
    import dtrak_core.training as training

    original = training.train
    calls = []

    def train_then_targets_grow(train_config, progress=True):
        # While this worker trains its first model, another one adds a target to the build.
        calls.append(train_config.out_dir)
        if len(calls) == 1:
            grown = Targets.load(out / "targets")
            grown.extended(Targets(grown.images[:1], ["validation"], ["other.png"], ["artist=x"])).save(out / "targets")
        return original(train_config, progress=False)

    monkeypatch.setattr(training, "train", train_then_targets_grow)
    with pytest.raises(RuntimeError, match="now has 6 targets; this worker started with 5"):
        build_lds(config, progress=False)
    assert len(calls) == 1
