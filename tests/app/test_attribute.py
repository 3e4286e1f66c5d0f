"""The Attribute page (landing page), headless with AppTest."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image
from streamlit.testing.v1 import AppTest

from dtrak_core import jobs, registry
from tests.app.conftest import APP, FAST, PAGES, plain

PAGE = str(PAGES / "attribute.py")


def run(path: str = PAGE, **params: str) -> AppTest:
    app = AppTest.from_file(path, default_timeout=90)
    app.query_params.update({**FAST, **params})
    return app.run()


def texts(app: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "subheader", "info", "warning", "error")
             for e in getattr(app, kind)]
    return "\n".join(plain(p) for p in parts)


def calibrated(env, method: str = "dtrak"):
    """calibrate() of the tiny model's training features, called directly (what the app must show)."""
    from dtrak_core.attribution.featurizer import FeatureSettings
    from dtrak_core.attribution.loading import load_model, load_training_set
    from dtrak_core.attribution.methods import METHODS, train_features
    from dtrak_core.evaluation.calibration import calibrate
    from dtrak_core.models import pipeline_files_hash

    model = load_model(env.model_dir)
    settings = FeatureSettings(output_fn=METHODS[method].output_fn, num_timesteps=int(FAST["K"]),
                               projection_dim=int(FAST["k"]))
    features = train_features(model, load_training_set(model), settings, env.cache / "features",
                              compute_missing=False)
    return calibrate(features, method, pipeline_files_hash(env.model_dir), False, cache_root=env.cache)


def direct_scores(env, seed: int, lam: float):
    """D-TRAK scores of the gallery sample ``seed`` (the image the app generated) at ``lam``,
    computed without the app."""
    from dtrak_app.common import SAMPLER
    from dtrak_core.attribution.featurizer import FeatureSettings
    from dtrak_core.attribution.loading import load_model, load_training_set
    from dtrak_core.attribution.methods import score_targets
    from dtrak_core.models import pipeline_files_hash

    model = load_model(env.model_dir)
    sample = env.cache / "samples" / pipeline_files_hash(env.model_dir)[:16] / SAMPLER.tag / f"{seed}.png"
    image = np.asarray(Image.open(sample).convert("RGB"))
    settings = FeatureSettings(output_fn="square", num_timesteps=int(FAST["K"]), projection_dim=int(FAST["k"]))
    (matrix,) = score_targets("dtrak", [model], load_training_set(model), image[None], settings, [lam],
                              env.cache / "features", compute_missing=False).values()
    return matrix[0]


def test_landing_page_ranks_the_training_images(env):
    app = run(APP)  # the entry point opens Attribute
    assert not app.exception
    assert app.title[0].value == "Which training images made this image?"
    assert app.radio(key="target").value == "gallery"
    assert app.selectbox(key="method").value == "dtrak"
    assert app.number_input(key="K").value == 2
    heads = [s.value for s in app.subheader]
    assert heads == ["Target", "The training images that made this image most likely",
                     "Training images that made it less likely (opponents)", "No measurable effect (the most neutral)",
                     "Export"]
    assert [e.label for e in app.main.expander] == ["Generated samples (click a seed)", "Advanced: method, K, k, lambda",
                                                    "All scores (raw)"]
    assert len(app.get("plotly_chart")) == 2  # artist shares, strength histogram
    table = app.dataframe[0].value
    assert len(table) == 20 and table["rank"].tolist() == list(range(1, 21))
    assert table["score"].is_monotonic_decreasing
    assert table["relative_strength"].abs().max() == 1.0
    text = texts(app)
    assert "**What the scores mean.**" in text and "**How sure is this?** Not measured for this model" in text
    labels = [b.proto.label for b in app.get("download_button")]
    assert labels == ["Score table (CSV)", "Attribution card (PNG)"]
    assert app.query_params["method"] == "dtrak" and app.query_params["seed"] == "0"
    assert "lambda" not in app.query_params  # the calibrated lambda is the model's, not the link's


def test_the_default_lambda_is_the_models_calibration_and_a_users_lambda_is_kept(env):
    expected = calibrated(env)
    assert expected.source == "self-retrieval"  # K=2, k=256: no LDS build measures these settings
    app = run()
    assert not app.exception
    assert app.number_input(key="lambda").value == expected.lam
    text = texts(app)
    assert f"**Calibrated for this model.** {expected.detail}" in text
    assert f"lambda {expected.lam:.3g} (calibrated by self-retrieval)" in text
    assert not [b for b in app.button if b.key == "lambda_reset"]
    # ... and used: the scores shown are the kernel's at that lambda (not at the old constant).
    scored = app.dataframe[0].value.sort_values("train_index")["score"].to_numpy()
    assert np.allclose(scored, direct_scores(env, 0, expected.lam), rtol=1e-5, atol=1e-7)
    assert not np.allclose(scored, direct_scores(env, 0, 100.0), rtol=1e-3)
    # The user's lambda is kept across targets and marked as theirs, with a way back.
    app.number_input(key="lambda").set_value(7.0).run()
    app.button(key="pick_3").click().run()
    assert not app.exception and app.number_input(key="lambda").value == 7.0
    assert f"lambda 7: set by you (the calibrated value for this model is {expected.lam:g})" in texts(app)
    assert app.query_params["lambda"] == "7.0"
    app.button(key="lambda_reset").click().run()
    assert app.number_input(key="lambda").value == expected.lam and "lambda" not in app.query_params
    # A lambda from a link is the user's too.
    linked = run(**{"lambda": "25"})
    assert linked.number_input(key="lambda").value == 25.0
    assert f"lambda 25: set by you (the calibrated value for this model is {expected.lam:g})" in texts(linked)


def test_the_export_records_the_settings_lambda_source_and_names():
    import numpy as np
    import pandas as pd

    from dtrak_app.views import EXPORT_COLUMNS, ExportInfo, export_table
    from dtrak_core.attribution.results import relative_strength, score_table

    meta = pd.DataFrame({"file_name": ["a/1.png", "b/2.png"], "artist": ["a", "b"], "name": ["cat", "dog"]})
    table = score_table(np.array([0.5, 2.0]), meta, "artist", "name")
    table["relative_strength"] = relative_strength(table["score"])
    info = ExportInfo("seed 3", "tiny", {"method": "D-TRAK", "K": 10, "k": 2048, "lambda": 3.16228,
                                         "lambda_source": "calibrated on an LDS build"}, "2026-01-02")
    out = export_table(table, info)
    assert list(out.columns) == EXPORT_COLUMNS
    assert out["name"].tolist() == ["dog", "cat"] and out["file_name"].tolist() == ["b/2.png", "a/1.png"]
    assert out["relative_strength"].tolist() == [1.0, 0.25] and out["score"].tolist() == [2.0, 0.5]
    assert set(out["lambda"]) == {3.16228} and set(out["lambda_source"]) == {"calibrated on an LDS build"}
    assert set(out["date"]) == {"2026-01-02"} and set(out["model"]) == {"tiny"} and set(out["K"]) == {10}
    assert info.line() == "D-TRAK on tiny; K=10, k=2048; lambda 3.16 (calibrated on an LDS build); 2026-01-02"


def test_picking_a_target_and_a_method_updates_results_and_url(env):
    app = run()
    app.button(key="pick_3").click().run()
    assert not app.exception
    assert "DDIM 50 steps, eta 0, seed 3" in texts(app)
    before = app.dataframe[0].value.copy()
    app.selectbox(key="method").set_value("cosine").run()
    assert not app.exception
    assert "gradient cosine" in texts(app)
    after = app.dataframe[0].value
    assert len(after) == 20 and not before["score"].equals(after["score"])
    assert app.query_params["seed"] == "3" and app.query_params["method"] == "cosine"


def test_a_link_reproduces_the_view(env):
    app = run(method="pixel", seed="5", target="seed")
    assert not app.exception
    assert app.selectbox(key="method").value == "pixel"
    assert app.number_input(key="seed").value == 5
    assert "raw pixel similarity" in texts(app)


def test_a_link_with_bad_values_falls_back_to_defaults(env):
    app = run(seed="-4", K="zero", method="magic")
    assert not app.exception
    warnings = " ".join(plain(w.value) for w in app.warning)
    assert "seed=-4: expected 0.." in warnings and "K='zero': expected a whole number" in warnings
    assert "Unknown method 'magic'" in warnings
    assert app.session_state["seed"] == 0 and app.number_input(key="K").value == 10
    assert app.selectbox(key="method").value == "dtrak"


def test_missing_features_show_what_they_need_and_the_pixel_baseline(env):
    app = run(method="trak")  # TRAK needs loss-gradient features, not computed by the fixture
    assert not app.exception
    assert "not ready yet" in app.info[0].value and "raw pixel similarity" in app.info[0].value
    assert "Start computing" in [b.label for b in app.button]  # nothing starts without it (test_jobs_ui.py)
    assert len(app.dataframe[0].value) == 20  # the baseline's ranking meanwhile
    assert not [j for j in jobs.list_jobs(env.cache / "jobs") if "loss" in j.args]


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_bad_and_good(env):
    app = run(target="upload")
    app.file_uploader[0].set_value(("notes.txt", b"not an image at all", "text/plain")).run()
    assert not app.exception
    assert "notes.txt is not a readable image" in plain(app.error[0].value)
    app.file_uploader[0].set_value(("big.png", png((5000, 4000)), "image/png")).run()
    assert plain(app.error[0].value) == ("big.png is 5000x4000 = 20,000,000 pixels, over the limit of 16,777,216: "
                                         "refused as a possible decompression bomb (not decoded)")
    app.file_uploader[0].set_value(("red.png", png((40, 20)), "image/png")).run()
    assert not app.exception and not app.error
    assert "padded to 40x40 on white, resized to 16x16" in texts(app)
    assert len(app.dataframe[0].value) == 20


def test_a_folder_that_is_not_a_pipeline_is_an_error(env, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("DTRAK_MODEL_DIR", str(tmp_path / "empty"))
    app = run()
    assert not app.exception
    assert "is not a diffusers pipeline folder" in plain(app.error[0].value)


def test_an_unsupported_pipeline_type_is_an_error(env, tmp_path, monkeypatch):
    import shutil

    other = tmp_path / "sd"
    shutil.copytree(env.model_dir, other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    monkeypatch.setenv("DTRAK_MODEL_DIR", str(other))
    app = run()
    assert not app.exception
    assert "holds a KandinskyPipeline; supported pipelines: DDPMPipeline, StableDiffusionPipeline" in plain(app.error[0].value)


def test_a_dataset_that_does_not_match_the_model_is_an_error(env, tmp_path, monkeypatch):
    from tests.conftest import write_image_folder

    monkeypatch.setenv("DTRAK_DATA_DIR", str(write_image_folder(tmp_path / "other", n=6)))
    app = run()
    assert not app.exception
    assert "gives 5 training images" in plain(app.error[0].value) and "lists 20" in plain(app.error[0].value)


def register(app: AppTest, name: str, model_dir, data_dir, replace: bool = False) -> list[str]:
    """Fill and submit the sidebar's registration form; the error and success texts, as they read."""
    app.text_input(key="reg_name").input(name)
    app.text_input(key="reg_model").input(str(model_dir))
    app.text_input(key="reg_data").input(str(data_dir))
    app.checkbox(key="reg_replace").check() if replace else app.checkbox(key="reg_replace").uncheck()
    app.form_submit_button[0].click().run()
    assert not app.exception
    return [plain(e.value) for e in app.error] + [plain(e.value) for e in app.success]


def test_registering_a_bad_folder_says_why_and_the_app_keeps_working(env, tmp_path, monkeypatch):
    app = run()
    outside = register(app, "mine", tmp_path, env.data_dir)
    assert f"Not registered: model folder {str(tmp_path)!r} is not under an allowed root" in outside[0]
    monkeypatch.setenv("DTRAK_MODEL_ROOTS", os.pathsep.join([str(tmp_path), str(env.data_dir)]))
    inside = register(app, "mine", tmp_path, env.data_dir)
    assert "Not registered" in inside[0] and "is not a diffusers pipeline folder" in inside[0]
    assert len(app.dataframe[0].value) == 20


def test_registering_a_taken_name_needs_the_replace_box(env, monkeypatch):
    monkeypatch.setenv("DTRAK_MODEL_ROOTS", str(env.model_dir.parent))
    app = run()
    try:
        assert register(app, "mine", env.model_dir, env.data_dir) == ["Registered mine."]
        again = register(app, "mine", env.model_dir, env.data_dir)
        assert again[0].startswith("Not registered: a model named 'mine' is already registered")
        assert register(app, "mine", env.model_dir, env.data_dir, replace=True) == ["Registered mine."]
        assert [e.name for e in registry.list_models(env.cache)] == ["tiny", "mine"]
    finally:
        registry.registry_path(env.cache).unlink(missing_ok=True)  # the cache is shared by the session's tests


def test_all_positive_scores_leave_opponents_and_neutral_empty_and_say_why(env, monkeypatch):
    import numpy as np

    from dtrak_app import common

    # As raw pixel cosine on white-background emoji: every score positive.
    monkeypatch.setattr(common, "scores_for", lambda ctx, target, method, K, k, lam: np.linspace(2.0, 1.0, len(ctx.train)))
    app = run(method="pixel")
    assert not app.exception
    text = texts(app)
    assert "no training image lowers this image's likelihood under this method (none of the 20 scores is below 0)" in text
    assert "all 20 scores are positive, so none lies between proponents and opponents" in text
    assert "Raw pixel similarity: a baseline." in text
    strengths = [plain(c.value) for c in app.caption if c.value.startswith("#")]
    assert len(strengths) == 10 and strengths[0].startswith("#1 · strength 100%")  # ten proponents, no others
    assert strengths[-1].startswith("#10 · strength 76%")  # 2 - 9/19 = 1.526..., of 2


def test_all_negative_scores_leave_proponents_empty_and_say_why(env, monkeypatch):
    import numpy as np

    from dtrak_app import common

    monkeypatch.setattr(common, "scores_for", lambda ctx, target, method, K, k, lam: -np.linspace(1.0, 2.0, len(ctx.train)))
    app = run()
    assert not app.exception
    text = texts(app)
    assert "no training image raises this image's likelihood under this method (none of the 20 scores is above 0)" in text
    assert "all 20 scores are negative, so none lies between proponents and opponents" in text
    assert "No attribution card: no training image has a positive score." in text
    assert [b.proto.label for b in app.get("download_button")] == ["Score table (CSV)"]
    strengths = [plain(c.value) for c in app.caption if c.value.startswith("#")]
    assert strengths[0].startswith("#20 · strength -100%") and len(strengths) == 10  # the opponents only


def test_random_is_labelled_a_sanity_check(env):
    app = run(method="random")
    assert not app.exception
    assert "Random scores: a sanity check, not a result." in plain(app.warning[0].value)
    assert "**How sure is this?** Not at all, by design" in texts(app)
    assert app.selectbox(key="method").format_func("random") == "random (a sanity check, not a result)"


def test_registration_with_a_label_column_feeds_the_artist_chart(env, monkeypatch, tmp_path):
    import shutil

    import pandas as pd

    # A foreign model (no recipe.json: the whole folder is its training set) whose metadata names
    # each image's "style"; the default label column "artist" would group it otherwise.
    model = tmp_path / "model"
    shutil.copytree(env.model_dir, model, ignore=shutil.ignore_patterns("recipe.json", "train_*"))
    data = tmp_path / "data"
    shutil.copytree(env.data_dir, data)
    meta = pd.read_csv(data / "metadata.csv")
    meta["style"] = ["flat" if i % 3 else "outline" for i in range(len(meta))]
    meta.to_csv(data / "metadata.csv", index=False)
    monkeypatch.setenv("DTRAK_MODEL_ROOTS", str(tmp_path))
    app = run(method="pixel")  # needs no training features
    try:
        app.text_input(key="reg_label").input("colour")
        said = register(app, "styled", model, data)
        assert said[0] == (f"Not registered: training image folder {str(data)!r} has no metadata column 'colour' "
                           "to read labels from; its metadata.csv columns: file_name, artist, split, style")
        app.text_input(key="reg_label").input("style")
        assert register(app, "styled", model, data) == ["Registered styled."]
        assert [e.label_column for e in registry.list_models(env.cache) if e.name == "styled"] == ["style"]
        app = run(method="pixel", model="styled")
        assert not app.exception and app.selectbox(key="model").value == "styled"
        chart = app.get("plotly_chart")[0].proto.spec
        assert "outline" in chart and "flat" in chart and "By style, against their share of the data" in chart
        assert "share of the training data" in chart
        assert set(app.dataframe[0].value["label"]) == {"flat", "outline"} and len(app.dataframe[0].value) == 24
    finally:
        registry.registry_path(env.cache).unlink(missing_ok=True)  # the cache is shared by the session's tests


def test_a_link_to_an_uploaded_image_says_to_upload_it_again(env):
    app = run(target="upload")
    assert not app.exception
    assert "a link cannot carry the image itself: upload the image again" in plain(app.info[0].value)
