"""Compare methods, Training data, Jobs and About pages, headless with AppTest."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from dtrak_core import jobs
from tests.app.conftest import FAST, PAGES


def run(page: str, **params: str) -> AppTest:
    app = AppTest.from_file(str(PAGES / page), default_timeout=90)
    app.query_params.update({**FAST, **params})
    return app.run()


def test_compare_shows_methods_side_by_side_with_overlap_and_ranks(env):
    app = run("compare.py", compare="dtrak,pixel,random", seed="2")
    assert not app.exception
    assert app.multiselect(key="compare").value == ["dtrak", "pixel", "random"]
    heads = [s.value for s in app.subheader]
    assert heads[:3] == ["D-TRAK", "raw pixel similarity", "random"]
    assert "Overlap of the top-10 proponent sets" in heads and "Rank against rank" in heads
    charts = app.get("plotly_chart")
    assert len(charts) == 2
    assert "Spearman rank correlation" in charts[1].proto.spec
    assert app.query_params["compare"] == "dtrak,pixel,random"


def test_compare_needs_two_methods(env):
    app = run("compare.py", compare="dtrak")
    assert not app.exception
    assert "at least two methods" in app.warning[0].value


def test_training_data_browse_search_and_reverse_lookup(env):
    # Attribute one target first, so the reverse lookup has something to find.
    attribute = AppTest.from_file(str(PAGES / "attribute.py"), default_timeout=90)
    attribute.query_params.update({**FAST, "seed": "1"})
    attribute.run()
    top = attribute.dataframe[0].value.iloc[0]

    app = run("training_data.py")
    assert not app.exception
    assert app.multiselect(key="browse_artist").value == ["a", "b"]
    assert "20 of 20 training images match" in app.caption[0].value
    app.multiselect(key="browse_artist").set_value(["a"]).run()
    assert "12 of 20 training images match" in app.caption[0].value  # validation rows are all b
    app.multiselect(key="browse_artist").set_value(["a", "b"]).run()
    app.text_input(key="browse_query").input("b/").run()
    assert "8 of 20" in app.caption[0].value
    app.text_input(key="browse_query").input("").run()
    app.selectbox(key="browse_image").set_value(int(top["train_index"])).run()
    assert not app.exception
    lookup = app.dataframe[-1].value
    assert "seed 1" in lookup["label"].tolist()
    assert int(lookup.loc[lookup["label"] == "seed 1", "rank"].iloc[0]) == 1


def test_training_data_search_without_matches(env):
    app = run("training_data.py")
    app.text_input(key="browse_query").input("no such emoji").run()
    assert not app.exception and "0 of 20" in app.caption[0].value


def test_jobs_page_lists_starts_and_cancels(env, tmp_path, monkeypatch):
    monkeypatch.setenv("DTRAK_CACHE", str(tmp_path))  # an empty job list; features of the session are elsewhere
    app = run("jobs.py")
    assert not app.exception
    assert "No jobs yet." in app.info[0].value
    app.selectbox(key="job_method").set_value("trak")
    app.form_submit_button[0].click().run()
    assert not app.exception
    listed = jobs.list_jobs(tmp_path / "jobs")
    assert len(listed) == 1 and "--training-set" in listed[0].args
    assert len(app.get("progress")) == 1
    cancel = app.button(key=f"cancel_{listed[0].key}")
    cancel.click().run()
    assert jobs.get_job(listed[0].key, tmp_path / "jobs").state == "cancelled"


def test_about_has_method_licences_and_numbers(env):
    app = run("about.py")
    assert not app.exception
    text = " ".join(m.value for m in app.markdown)
    assert "CC-BY 4.0" in text and "CC BY-SA 4.0" in text and "OFL 1.1" in text
    assert "D-TRAK" in text and "LDS" in text
    assert [s.value for s in app.subheader] == ["Data and licences", "Measured numbers"]
