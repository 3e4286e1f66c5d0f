"""Benchmark and Counterfactual pages, headless with AppTest."""

from __future__ import annotations

import json

import pytest

from streamlit.testing.v1 import AppTest

from tests.app.conftest import plain
from tests.app_eval.conftest import PAGES


def run(page: str, **params: str) -> AppTest:
    app = AppTest.from_file(str(PAGES / page), default_timeout=90)
    app.query_params.update(params)
    return app.run()


def test_benchmark_shows_the_table_bars_and_a_targets_scatter(eval_vars):
    app = run("benchmark.py", lds_method="pixel", lds_kind="generated", lds_target="1")
    assert not app.exception
    assert "Complete: 4 of 4 reported subsets" in app.success[0].value
    table = app.table[0].value
    assert "raw pixel cosine" in table["method"].tolist()
    results = json.loads((eval_vars.lds_dir / "results" / "lds.json").read_text())
    expected = results["entries"]["pixel"]["kinds"]["validation"]["mean"]
    row = table[table["method"] == "raw pixel cosine"].iloc[0]
    assert row["LDS % (validation)"] == round(100 * expected, 1)
    assert table[table["method"] == "D-TRAK (square), K=10"].iloc[0]["95% CI (generated)"] == "pending"
    # The paper's ordering: one row per claim, from the stored results (this grid has neither side of
    # any claim, so every verdict is pending).
    ordering = app.table[1].value
    assert ordering["claim"].tolist() == [row["claim"] for row in results["ordering"]]
    assert set(ordering["verdict (validation)"]) == {"pending"}
    bars, scatter = app.get("plotly_chart")
    assert "error_x" in bars.proto.spec and '"orientation":"h"' in bars.proto.spec.replace(" ", "")
    assert "Spearman" in scatter.proto.spec and "over 4 subsets" in scatter.proto.spec
    per_target = results["entries"]["pixel"]["kinds"]["generated"]["per_target"][1]
    metric = app.metric[0].value
    assert metric == "undefined" if per_target is None else metric == f"{per_target:.3f}"
    assert app.query_params["lds_target"] == "1" and app.query_params["lds_method"] == "pixel"


def test_benchmark_keeps_the_table_but_not_the_scatter_when_targets_were_added_after_scoring(eval_vars, monkeypatch,
                                                                                            tmp_path):
    import shutil

    from dtrak_core.evaluation.lds.scores import results_match_targets
    from dtrak_core.evaluation.lds.targets import Targets

    build = tmp_path / "lds"
    shutil.copytree(eval_vars.lds_dir, build)
    targets = Targets.load(build / "targets")
    results = json.loads((build / "results" / "lds.json").read_text())
    assert results_match_targets(results, targets)
    added = targets.extended(Targets(targets.images[:1], ["validation"], ["new.png"], ["artist=x"]))
    added.save(build / "targets")
    assert not results_match_targets(results, added)
    monkeypatch.setenv("DTRAK_LDS_DIR", str(build))
    app = run("benchmark.py")
    assert not app.exception
    assert "raw pixel cosine" in app.table[0].value["method"].tolist()
    assert "Targets were added" in app.warning[0].value and f"{len(added)} targets now" in app.warning[0].value
    assert len(app.get("plotly_chart")) == 1                          # the bars, no per-target scatter


def test_benchmark_without_results_says_how_to_make_them(eval_vars, monkeypatch, tmp_path):
    monkeypatch.setenv("DTRAK_LDS_DIR", str(tmp_path / "empty"))
    app = run("benchmark.py")
    assert not app.exception
    assert "lds build" in app.info[0].value


def test_counterfactual_shows_stored_result_beside_the_random_baseline(eval_vars):
    app = run("counterfactual.py", seed="1", cf_method="dtrak", cf_k="4")
    assert not app.exception
    labels = [m.label for m in app.metric]
    assert labels.count("pixel L2 (higher = bigger change)") == 2  # method and random baseline
    record = json.loads((eval_vars.cf_dir / "seed-1" / "dtrak-k4.json").read_text())
    assert app.metric[0].value == f"{record['pixel_l2']:.3f}"
    assert app.metric[1].value == f"{record['ssim']:.3f}"
    summary = app.dataframe[0].value
    assert set(summary["removal"]) == {"dtrak (k=4)", "random (k=4)"}
    assert summary[summary["removal"] == "dtrak (k=4)"].iloc[0]["L2 mean"] == record["pixel_l2"]
    paired = app.dataframe[1].value                                   # D-TRAK paired with random on seed 1
    base = json.loads((eval_vars.cf_dir / "seed-1" / "random-k4.json").read_text())
    assert list(paired["removal"]) == ["dtrak"] and paired["targets"][0] == 1
    assert paired["L2 difference"][0].startswith(f"{record['pixel_l2'] - base['pixel_l2']:+.3f}")
    assert app.query_params["cf_method"] == "dtrak"


def test_counterfactual_without_a_result_offers_a_background_job(eval_vars, monkeypatch):
    from dtrak_core import jobs

    submitted = []
    monkeypatch.setattr(jobs, "submit", lambda args, description="", root=None, **kw: submitted.append(args))
    app = run("counterfactual.py", seed="2", cf_method="trak", cf_k="3")
    assert not app.exception
    assert not app.metric  # nothing stored for seed 2
    run_buttons = [b for b in app.button if b.label.startswith("Run: ")]
    assert [b.label for b in run_buttons] == ["Run: TRAK top-k proponents", "Run: 3 random images"]
    run_buttons[0].click().run()
    assert submitted and submitted[0][:6] == ["counterfactual", "--model", str(eval_vars.model_dir),
                                              "--target-seed", "2", "--method"]
    assert submitted[0][6] == "trak" and submitted[0][-2:] == ["--k", "3"]


def test_benchmark_names_its_model_and_shows_every_method(eval_vars):
    from dtrak_core.evaluation.lds.scores import DEFAULT_GRID
    from dtrak_core.models import pipeline_files_hash

    app = run("benchmark.py")
    assert not app.exception
    weights = pipeline_files_hash(eval_vars.model_dir)[:10]
    assert plain(app.subheader[0].value) == f"Model: tiny (weights {weights})"
    assert app.table[0].value["method"].tolist() == [e.label for e in DEFAULT_GRID]  # every row


def test_benchmark_refuses_results_that_fail_their_checksum(eval_vars, monkeypatch, tmp_path):
    import shutil

    build = tmp_path / "lds"
    shutil.copytree(eval_vars.lds_dir, build)
    predictions = build / "results" / "predictions.npz"
    predictions.write_bytes(predictions.read_bytes()[:-8] + b"tampered")
    monkeypatch.setenv("DTRAK_LDS_DIR", str(build))
    app = run("benchmark.py")
    assert not app.exception
    assert plain(app.error[0].value) == (f"{build}/results/predictions.npz does not match its checksum (changed "
                                         "after it was written); run 'lds score' again to write them again")
    assert not app.table


def test_attribute_quotes_the_measured_lds_of_this_model(eval_vars):
    results = json.loads((eval_vars.lds_dir / "results" / "lds.json").read_text())
    measured = results["entries"]["pixel"]["kinds"]["validation"]
    app = run("attribute.py", method="pixel", seed="1")
    assert not app.exception
    line = next(plain(m.value) for m in app.markdown if "How sure is this?" in m.value)
    assert line.startswith("**How sure is this?** Measured on this model:")
    assert (f"raw pixel cosine predicts the outcome with a rank correlation (LDS) of {measured['mean']:.2f} "
            f"(95% CI {measured['ci_low']:.2f} to {measured['ci_high']:.2f}) on {measured['num_targets']} "
            "held-out real images") in line


def test_counterfactual_opens_on_a_model_with_results_unless_the_link_names_one(eval_vars, monkeypatch, tmp_path):
    import shutil

    from dtrak_core import registry

    # The environment's model becomes a copy whose files differ (so none of the records is its);
    # the model the records belong to is registered under another name.
    copy = tmp_path / "copy"
    shutil.copytree(eval_vars.model_dir, copy)
    (copy / "unet" / "config.json").write_text((copy / "unet" / "config.json").read_text() + "\n")
    monkeypatch.setenv("DTRAK_MODEL_DIR", str(copy))
    monkeypatch.setenv("DTRAK_MODEL_ROOTS", str(eval_vars.model_dir.parent))
    registry.register_model("measured", eval_vars.model_dir, eval_vars.model_dir.parent / "data", eval_vars.cache)
    try:
        app = run("counterfactual.py", seed="1", cf_method="dtrak", cf_k="4")
        assert not app.exception
        assert app.selectbox(key="model").value == "measured"
        assert "Showing measured, the model with stored experiments (tiny has none yet)" in plain(app.info[0].value)
        assert len(app.metric) >= 2 and set(app.dataframe[0].value["removal"]) == {"dtrak (k=4)", "random (k=4)"}
        linked = run("counterfactual.py", model="tiny", seed="1", cf_method="dtrak", cf_k="4")
        assert not linked.exception and linked.selectbox(key="model").value == "tiny"
        assert not linked.metric and any(plain(c.value).startswith("None yet in") for c in linked.main.caption)
    finally:
        registry.registry_path(eval_vars.cache).unlink(missing_ok=True)


def test_counterfactual_never_opens_an_image_outside_its_results_folder(eval_vars, monkeypatch, tmp_path):
    import shutil

    from dtrak_core.evaluation.units import write_record

    folder = tmp_path / "cf"
    shutil.copytree(eval_vars.cf_dir, folder)
    outside = tmp_path / "secret.png"
    shutil.copy(folder / "seed-1" / "dtrak-k4-before.png", outside)
    path = folder / "seed-1" / "dtrak-k4.json"
    record = {k: v for k, v in json.loads(path.read_text()).items() if k != "record_sha256"}
    record["before_png"] = "../../secret.png"  # a rewritten record, with a valid checksum
    write_record(path, record, "test")
    monkeypatch.setenv("DTRAK_COUNTERFACTUAL_DIR", str(folder))
    app = run("counterfactual.py", seed="1", cf_method="dtrak", cf_k="4")
    assert not app.exception
    # The core refuses the record before anything outside is opened (read_result), so the page
    # treats it as a corrupt record: skipped, never shown.
    from dtrak_core.evaluation.counterfactual import read_result
    from dtrak_core.evaluation.units import CorruptUnitError

    with pytest.raises(CorruptUnitError, match="is not a file beside the record"):
        read_result(path)
    assert not any("secret" in plain(w.value) for w in app.warning)
