"""Long work starts only on request: what missing features need, Start, the queue, the Jobs page,
and registration (headless with AppTest).

Every test runs on its own cache folder whose ``features/`` is the session's (the tiny model's
D-TRAK features at K=2, k=256; TRAK's are missing). Tests that start jobs hold the machine's one
job slot themselves, so the jobs stay queued and never compute anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dtrak_app import feature_jobs
from dtrak_core import jobs, registry
from dtrak_core.io import try_lock
from tests.app.conftest import APP, FAST, PAGES, plain


REQUEST_ESTIMATE = feature_jobs.request_estimate


@pytest.fixture
def cache(env, tmp_path, monkeypatch) -> Path:
    """A private cache (jobs, estimates, registry) sharing the session's feature store; no probe
    is started (a stored estimate is still read)."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "features").symlink_to(env.cache / "features")
    monkeypatch.setenv("DTRAK_CACHE", str(root))
    monkeypatch.delenv(jobs.SLOTS_VARIABLE, raising=False)
    monkeypatch.setattr(feature_jobs, "request_estimate", lambda ctx, settings, key: feature_jobs.read_estimate(key))
    return root


@contextmanager
def slot_held(root: Path):
    """Hold the queue's only slot, as a running job would: submitted jobs stay queued (and are
    cancelled before the slot is let go, so none ever runs)."""
    with try_lock(root / "jobs" / jobs.SLOTS_DIR / "slot-0.lock") as mine:
        assert mine
        try:
            yield
        finally:
            for job in jobs.list_jobs(root / "jobs"):
                if job.active:
                    jobs.cancel(job.key, root / "jobs")


def run(page: str = "attribute.py", **params: str) -> AppTest:
    app = AppTest.from_file(str(PAGES / page), default_timeout=90)
    app.query_params.update({**FAST, **params})
    return app.run()


def texts(app: AppTest, *kinds: str) -> str:
    kinds = kinds or ("markdown", "info", "warning", "error", "success", "caption")
    return "\n".join(plain(e.value) for kind in kinds for e in getattr(app, kind))


def buttons(app: AppTest) -> list[str]:
    return [b.label for b in app.button]


def start_button(app: AppTest, label: str = "Start computing"):
    (button,) = [b for b in app.button if b.label == label]
    return button


def test_no_job_starts_without_start(cache, monkeypatch):
    submitted = []
    monkeypatch.setattr(jobs, "submit", lambda *a, **k: submitted.append(a) or pytest.fail("a job was submitted"))
    app = run(method="trak")  # TRAK's features are missing
    assert not app.exception
    assert "The training features for TRAK (K=2, k=256) are not ready yet. Meanwhile: raw pixel similarity." \
        in texts(app, "info")
    assert "20 training images" in texts(app, "markdown")
    assert buttons(app).count("Start computing") == 1
    assert len(app.dataframe[0].value) == 20  # the pixel baseline meanwhile
    app.number_input(key="K").set_value(3).run()  # another setting that needs features
    app.selectbox(key="method").set_value("dtrak").run()
    assert not app.exception and "D-TRAK (K=3, k=256) are not ready yet" in texts(app, "info")
    compare = run("compare.py", compare="dtrak,trak,pixel", K="3")
    assert not compare.exception
    assert buttons(compare).count("Start computing") == 2  # one per method whose features are missing
    assert "raw pixel similarity" in [s.value for s in compare.subheader]  # the ready method still shows
    run("jobs.py")
    assert submitted == [] and jobs.list_jobs(cache / "jobs") == []


def test_start_submits_one_job_and_shows_its_place_in_the_queue(cache):
    with slot_held(cache):
        app = run(method="trak")
        start_button(app).click().run()
        assert not app.exception
        (job,) = jobs.list_jobs(cache / "jobs")
        assert job.args[job.args.index("--output-fn") + 1] == "loss" and job.state == "queued"
        assert "The training features for TRAK (K=2, k=256) are queued: position 1" in texts(app, "info")
        assert "Start computing" not in buttons(app) and "Cancel" in buttons(app)
        assert len(app.get("progress")) == 1
        # A rerun, a second tab, and Compare find the same job and start nothing.
        app.run()
        other = run("compare.py", compare="trak,pixel")
        assert "are queued: position 1" in texts(other, "info")
        assert len(jobs.list_jobs(cache / "jobs")) == 1
        # Another setting: it says it would wait behind the queued job, and queues second.
        app.number_input(key="K").set_value(3).run()
        assert "It would wait behind 1 job (one runs at a time; see Jobs)." in texts(app, "markdown")
        start_button(app).click().run()
        assert "are queued: position 2" in texts(app, "info")
        assert len(jobs.list_jobs(cache / "jobs")) == 2
        # Cancel from the notice: it says cancelled (not failed), and offers to start again.
        [b for b in app.button if b.label == "Cancel"][0].click().run()
        assert not app.exception
        assert "Computing the training features for TRAK (K=3, k=256) was cancelled." in texts(app, "warning")
        assert "failed" not in texts(app) and "being computed" not in texts(app)
        assert "Start again" in buttons(app)
        assert sorted(j.state for j in jobs.list_jobs(cache / "jobs")) == ["cancelled", "queued"]


def test_a_failed_job_says_so_and_offers_to_start_again(cache, env):
    from dtrak_app import common as c
    from dtrak_core.attribution.loading import load_model, load_training_set
    from dtrak_core.attribution.dataset_features import feature_status
    from dtrak_core.attribution.methods import METHODS

    model = load_model(env.model_dir)
    settings = c.feature_settings(METHODS["trak"], 2, 256)
    key = feature_status(model, load_training_set(model), settings, cache / "features").key
    ctx = c.Context(registry.list_models(cache)[0], model, None, "")
    args = feature_jobs.featurize_args(ctx, settings)
    folder = cache / "jobs" / jobs.job_key(args, key)
    folder.mkdir(parents=True)
    (folder / jobs.SPEC_FILE).write_text(json.dumps({"args": args, "description": "trak features",
                                                     "submitted": time.time(), "identity": key}))
    (folder / jobs.STATUS_FILE).write_text(json.dumps({"state": "failed", "returncode": 1,
                                                       "message": "exit code 1; see job.log"}))
    (folder / jobs.LOG_FILE).write_text("Traceback ...\nRuntimeError: out of memory\n")
    app = run(method="trak")
    assert not app.exception
    assert ("Computing the training features for TRAK (K=2, k=256) failed: exit code 1; see job.log. "
            "Meanwhile: raw pixel similarity.") in texts(app, "error")
    assert "RuntimeError: out of memory" in app.code[0].value
    assert "background" not in texts(app) and "not ready" not in texts(app)
    assert "Start again" in buttons(app)


def test_the_estimate_is_measured_on_the_model_and_shown(cache, env, monkeypatch):
    """The probe's formulas (with fixed readings of memory and time), its file, and the notice."""
    from dtrak_app import common as c
    from dtrak_core.attribution.loading import load_model, load_training_set
    from dtrak_core.attribution.dataset_features import feature_status
    from dtrak_core.attribution.methods import METHODS

    model = load_model(env.model_dir)
    settings = c.feature_settings(METHODS["trak"], 2, 256)
    key = feature_status(model, load_training_set(model), settings, cache / "features").key
    out = feature_jobs.estimate_path(key)
    rss = iter([1_000_000_000, 1_100_000_000])
    clock = iter([10.0, 13.0])
    with monkeypatch.context() as patch:
        patch.setattr(feature_jobs, "_max_rss_bytes", lambda: next(rss))
        patch.setattr(feature_jobs.time, "perf_counter", lambda: next(clock))
        assert feature_jobs.run_probe(["--model", str(env.model_dir), "--output-fn", "loss", "-K", "2",
                                       "-k", "256", "--out", str(out)]) == 0
    estimate = feature_jobs.read_estimate(key)
    # 3 s for the warm batch of 2 at K_probe = K = 2; peak: batch 1 + 15 more samples (batch 16) + the store.
    assert estimate.seconds_per_image == 1.5 and estimate.probe_images == 2 and estimate.probe_timesteps == 2
    assert estimate.peak_bytes == 1_000_000_000 + 15 * 100_000_000 + 20 * 256 * 4
    app = run(method="trak")
    assert ("To compute: 20 training images, about 30 s on this machine now and 2.5 GB of memory at the peak "
            "(measured by featurizing 2 of them).") in texts(app, "markdown")
    # A torn or edited file is not an estimate.
    out.write_text(out.read_text().replace("1.5", "0.5"))
    assert feature_jobs.read_estimate(key) is None


def test_a_missing_estimate_starts_one_probe_of_the_real_command(cache, env, monkeypatch):
    from dtrak_app import common as c
    from dtrak_core.attribution.methods import METHODS

    monkeypatch.setattr(feature_jobs, "request_estimate", REQUEST_ESTIMATE)
    started = []
    settings = c.feature_settings(METHODS["trak"], 25, 256)
    ctx = c.Context(registry.list_models(cache)[0], None, None, "")
    with monkeypatch.context() as patch:
        patch.setattr(feature_jobs.subprocess, "Popen", lambda args, **kwargs: started.append(args))
        assert feature_jobs.request_estimate(ctx, settings, "k1") is None
        assert feature_jobs.request_estimate(ctx, settings, "k1") is None  # started a moment ago: not again
    assert len(started) == 1 and started[0][:4] == [sys.executable, "-m", "dtrak_app.feature_jobs", "probe"]
    # The command really measures (a fresh process: the numbers are its own).
    out = feature_jobs.estimate_path("k1")
    subprocess.run(started[0], check=True, cwd=feature_jobs.REPO_ROOT, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    estimate = feature_jobs.read_estimate("k1")
    assert estimate.error == "" and estimate.probe_timesteps == 10 and estimate.probe_images == 2
    assert estimate.seconds_per_image > 0 and estimate.peak_bytes > 20 * 256 * 4
    assert out.exists() and feature_jobs.request_estimate(ctx, settings, "k1") == estimate


def test_jobs_page_queue_restart_and_clear_finished(cache):
    with slot_held(cache):
        app = run("jobs.py")
        assert "No jobs yet." in texts(app, "info")
        app.selectbox(key="job_method").set_value("trak")
        app.form_submit_button[0].click().run()
        assert not app.exception
        assert "position 1 in the queue" in texts(app, "success")
        (job,) = jobs.list_jobs(cache / "jobs")
        assert "queued, position 1 in the queue" in plain(app.get("progress")[0].proto.text)
        app.button(key=f"cancel_{job.key}").click().run()
        assert jobs.get_job(job.key, cache / "jobs").state == "cancelled"
        assert "Cancelled: cancelled by the user." in texts(app, "caption")
        app.button(key=f"restart_{job.key}").click().run()
        assert jobs.get_job(job.key, cache / "jobs").state == "queued"
        jobs.cancel(job.key, cache / "jobs")
        app.run()
        assert "0 running, 0 queued, 1 finished." in texts(app, "markdown")
        [b for b in app.button if b.label == "Clear finished"][0].click().run()
        assert jobs.list_jobs(cache / "jobs") == [] and "No jobs yet." in texts(app, "info")


def register(app: AppTest, name: str, model_dir, data_dir) -> AppTest:
    app.text_input(key="reg_name").input(name)
    app.text_input(key="reg_model").input(str(model_dir))
    app.text_input(key="reg_data").input(str(data_dir))
    app.form_submit_button[0].click().run()
    assert not app.exception
    return app


def test_registration_refuses_an_unsupported_kind_and_shows_a_new_model_at_once(cache, env, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv(registry.ROOTS_ENV, os.pathsep.join([str(tmp_path), str(env.data_dir)]))
    other = tmp_path / "kandinsky"
    shutil.copytree(env.model_dir, other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    app = register(run(APP), "kd", other, env.data_dir)
    assert (f"holds a KandinskyPipeline; supported pipelines: DDPMPipeline, StableDiffusionPipeline"
            in plain(app.error[0].value)) and plain(app.error[0].value).startswith("Not registered: ")
    assert [e.name for e in registry.list_models(cache)] == ["tiny"]
    # A prediction type the core cannot convert is refused at registration too, with the reason.
    scheduler = json.loads((env.model_dir / "scheduler" / "scheduler_config.json").read_text())
    odd = tmp_path / "odd"
    shutil.copytree(env.model_dir, odd)
    (odd / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "prediction_type": "flow"}))
    app = register(app, "odd", odd, env.data_dir)
    assert "Not registered: " in plain(app.error[0].value) and "prediction_type 'flow' is not supported" \
        in plain(app.error[0].value)
    # A good one: registered, chosen, and never called "not registered here" in the same run.
    good = tmp_path / "good"
    shutil.copytree(env.model_dir, good)
    app = register(app, "mine", good, env.data_dir)
    assert [plain(s.value) for s in app.success] == ["Registered mine."]
    assert "not registered here" not in texts(app, "warning")
    assert app.selectbox(key="model").value == "mine" and [e.name for e in registry.list_models(cache)] == [
        "tiny", "mine"]
