"""The Attribute page (landing page), headless with AppTest."""

from __future__ import annotations

import io
import json
import os

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


def test_landing_page_ranks_the_training_images(env):
    app = run(APP)  # the entry point opens Attribute
    assert not app.exception
    assert app.title[0].value == "Which training images made this image?"
    assert app.radio(key="target").value == "gallery"
    assert app.selectbox(key="method").value == "dtrak"
    assert app.number_input(key="K").value == 2 and app.number_input(key="lambda").value == 100.0
    assert [s.value for s in app.subheader][:4] == ["Target", "Top 10 proponents", "Top 10 opponents",
                                                    "The 5 most neutral"]
    assert len(app.get("plotly_chart")) == 2  # score histogram, artist shares
    table = app.dataframe[0].value
    assert len(table) == 20 and table["rank"].tolist() == list(range(1, 21))
    assert table["score"].is_monotonic_decreasing
    assert "What a score means" in texts(app)
    labels = [b.proto.label for b in app.get("download_button")]
    assert labels == ["Score table (CSV)", "Attribution card (PNG)"]
    assert app.query_params["method"] == "dtrak" and app.query_params["seed"] == "0"


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
